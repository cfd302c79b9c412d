"""Typed settings: a unit's dataclass gives the schema's rules and the cast object the code
reads; the schema loads no torch; a method preset is one YAML file naming its family."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmdistill import config, schema
from mmdistill import settings as s
from mmdistill.errors import UserError
from mmdistill.methods import settings as method_settings

REPO = Path(__file__).resolve().parents[1]


@s.settings
class Inner:
    """A nested unit."""

    rate: float = s.setting(s.POSITIVE)
    optional: int | None = s.setting(s.Int(0, optional=True))


@s.settings
class Outer:
    """A unit with an aliased keyword key, a word, a choice and a nested unit."""

    steps: int | str = s.setting(s.Int(0, words=("auto",)))
    lam: float = s.setting(s.NON_NEGATIVE, key="lambda")
    mode: str = s.setting(s.Choice("a", "b"))
    inner: Inner = s.group(Inner)


def test_rules_are_dotted_keys_under_a_prefix() -> None:
    rules = s.rules(Outer, "method.")
    assert list(rules) == [
        "method.steps",
        "method.lambda",
        "method.mode",
        "method.inner.rate",
        "method.inner.optional",
    ]
    assert rules["method.inner.rate"] == s.POSITIVE


def test_from_cfg_checks_casts_and_reads_aliases() -> None:
    cfg = OmegaConf.create({"steps": "12", "lambda": 1, "mode": "b", "inner": {"rate": "${x}"}})
    cfg.inner.rate = 2  # an int where a number is asked: cast to float
    out = s.from_cfg(Outer, cfg, "method.")
    assert out == Outer(steps=12, lam=1.0, mode="b", inner=Inner(rate=2.0, optional=None))
    assert isinstance(out.lam, float) and isinstance(out.steps, int)
    assert s.from_cfg(Outer, {**cfg, "steps": "auto"}).steps == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.lam = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lambda": -1}, "method.lambda=-1 is out of range: it must be 0 or more"),
        ({"mode": "c"}, "method.mode='c' is not a valid choice; choose one of: a, b"),
        ({"steps": "x"}, "method.steps='x' is not a whole number or auto"),
        ({"inner": {}}, "method.inner.rate is missing from the config; set method.inner.rate="),
    ],
)
def test_from_cfg_fails_with_the_schemas_one_line(change: dict, message: str) -> None:
    cfg = {"steps": 1, "lambda": 0.5, "mode": "a", "inner": {"rate": 1.0}, **change}
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        s.from_cfg(Outer, cfg, "method.")


def test_registered_units_give_each_choice_its_rules() -> None:
    assert s.choices("method.family") == (
        "random",
        "herding",
        "kcenter",
        "forgetting",
        "trajectory",
        "lors",
        "mdw",
        "covmatch",
    )
    covmatch = schema.table("method.family", "covmatch")
    assert "method.lambda" in covmatch and "method.robust.dual.folds" in covmatch
    assert "method.sim_rank" in schema.table("method.family", "lors")
    assert "method.sim_rank" not in schema.table("method.family", "trajectory")
    assert "expert.epochs" in schema.table("method.family", "mdw")


def test_a_composed_config_reads_as_its_typed_settings() -> None:
    cfg = config.compose("distill", ["method=covmatch", "budget.pairs=10"])
    typed = s.from_cfg(method_settings.CovMatch, cfg.method, "method.")
    assert typed.lam == "auto" and typed.robust.dual.folds == int(cfg.method.robust.dual.folds)
    assert isinstance(typed.online.lr, float)


def test_schema_check_imports_no_torch() -> None:
    """The CLI checks every job before it starts: that must not load torch (seconds)."""
    code = (
        "import sys; import mmdistill.cli; from mmdistill import config\n"
        "for m in ('covmatch', 'mdw', 'lors', 'kcenter', 'random'):\n"
        "    config.job_configs('distill', ['method=' + m, 'noise=shuffle'])\n"
        "heavy = [m for m in ('torch', 'datasets', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_a_new_preset_is_one_yaml_file(tmp_path: Path) -> None:
    """A preset in a copy of the config tree composes, passes the schema, runs its family's
    code and is labelled by its own name, with no Python change."""
    conf = tmp_path / "conf"
    shutil.copytree(config.conf_dir(), conf)
    (conf / "method" / "covmatch_quick.yaml").write_text(
        "defaults:\n  - covmatch\n  - _self_\n\nname: covmatch_quick\nsteps: 20\n"
    )
    config.register_resolvers()
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("distill", ["method=covmatch_quick", "budget.pairs=10"])
    schema.check(cfg, "distill")
    label = (cfg.method.name, cfg.method.family, cfg.method.steps)
    assert label == ("covmatch_quick", "covmatch", 20)
    from mmdistill.methods import get_method
    from mmdistill.methods.covmatch import CovMatch

    assert get_method(cfg.method.family) is CovMatch
    assert config.method_presets(conf)["covmatch_quick"] == "covmatch"
    with initialize_config_dir(str(conf), version_base="1.3"):
        bad = compose("distill", ["method=covmatch_quick", "method.family=nope"])
    with pytest.raises(UserError, match="method.family='nope' is not a valid choice"):
        schema.check(bad, "distill")


def test_hydras_exclude_keys_are_the_one_neutral_list() -> None:
    """Run-folder names (Hydra's override_dirname), sweep names and relaunch checks ignore the
    same keys: conf/hydra/default.yaml must list exactly config.NEUTRAL."""
    hydra = OmegaConf.load(config.conf_dir() / "hydra" / "default.yaml")
    assert list(hydra.job.config.override_dirname.exclude_keys) == list(config.NEUTRAL)


def test_neutral_keys_name_no_sweep_and_block_no_relaunch() -> None:
    from mmdistill import relaunch, sweeps

    base = ["method=random", "budget.pairs=10"]
    assert sweeps.sweep_name(base) == sweeps.sweep_name([*base, "data_workers=2", "logger=none"])
    old = {"data_workers": 0, "logger": {"name": "none"}, "method": {"name": "random"}}
    new = {"data_workers": 2, "logger": {"name": "wandb"}, "method": {"name": "random"}}
    assert relaunch.differences(old, new) == {}
    assert relaunch.differences(old, {**new, "seed": 1}) == {"seed": (None, 1)}


def test_a_folder_made_before_families_is_the_same_run() -> None:
    """Run folders saved before `method.family` existed relaunch as before."""
    from mmdistill import relaunch

    new = {"method": {"name": "covmatch", "family": "covmatch"}}
    assert relaunch.differences({"method": {"name": "covmatch"}}, new) == {}
    other = {"method": {"name": "covmatch", "family": "lors"}}
    assert relaunch.differences(other, new) == {"method.family": ("lors", "covmatch")}
