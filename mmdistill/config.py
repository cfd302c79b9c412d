"""Job configs: where the Hydra config tree lives, its resolvers, composing a job's config in
code (tests, scripts), composing and checking every job of a command before it launches, and
reading back the config a run folder was made with."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmdistill import io, schema
from mmdistill.errors import UserError

MULTIRUN_FLAGS = ("-m", "--multirun")
# THE list of neutral keys: settings that do not change what a job computes (where it runs,
# how many threads and workers, where files go, what watches it), so they name no run or
# sweep folder (sweeps.sweep_name, conf/hydra/default.yaml's exclude_keys, which
# tests/test_settings.py checks against this) and a relaunch may change them (relaunch.py);
# tables do not split columns by them. `hydra.*` overrides are neutral too (sweeps.py).
NEUTRAL = (
    "device",
    "resume",
    "threads",
    "data_workers",
    "run_name",
    "paths.output_dir",
    "paths.cache_dir",
    "paths.data_dir",
    "eval.workers",
    "eval.together",
    "logger",
    "logger.name",
    "logger.online",
    "logger.project",
    "logger.entity",
    "logger.dir",
    "monitor.val_every",
)


def conf_dir() -> Path:
    """Configs ship inside the wheel (mmdistill/conf); a source checkout has them at top level."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "distill.yaml").is_file():
            return cand
    raise UserError("mmdistill's conf/ folder is missing; reinstall the package")


def register_resolvers() -> None:
    """The interpolations our configs use; idempotent, and needed in every process (joblib
    workers are fresh ones)."""
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda p: Path(str(p)).name)
    if not OmegaConf.has_resolver("budget_name"):
        # `100` for budget.pairs=100, `r0.003` for budget.ratio=0.003 (folder names).
        OmegaConf.register_new_resolver(
            "budget_name", lambda pairs, ratio: f"r{ratio}" if pairs is None else str(pairs)
        )


def compose(verb: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `mmdistill <verb> <overrides>` would run with, without launching a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose(verb, overrides=list(overrides))


def _one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _composition_error(
    verb: str, err: Exception, overrides: list[str], suggest: bool = True
) -> UserError:
    """Hydra's multi-line composition errors as one line naming the fix."""
    text = str(err)
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        if key.startswith("hydra."):
            return UserError(f"unknown key {key}; see `mmdistill {verb} --hydra-help`")
        known: list[str] = []
        if suggest:  # the keys this config does have, for a "did you mean"
            rest = [o for o in overrides if schema_key(o) != key]
            try:
                tree = OmegaConf.to_container(_compose_one(verb, rest, suggest=False))
                known = sorted(schema.rules_for(tree, verb))
            except UserError:
                pass
        return schema.unknown_key(key, known, verb)
    if m := re.search(r"An item is already at '([^']+)'", text):
        return UserError(f"+{m.group(1)}=... adds a key that exists; drop the + to change it")
    if m := re.search(r"Could not delete from config. '([^']+)' does not exist", text):
        return UserError(f"~{m.group(1)} deletes a key this config does not have")
    if m := re.search(r"Ambiguous value for argument '([^']+)'", text):
        return UserError(
            f"{m.group(1)} lists several values: add -m to sweep over them, or write "
            "key=[a,b] for a list"
        )
    return UserError(f"cannot compose the config: {_one_line(err)}")


def is_override(arg: str) -> bool:
    """A config override (`k=v`, `+k=v`, `~k`), as opposed to a flag (`-m`, `--cfg`, `job`)."""
    return ("=" in arg and not arg.startswith("-")) or arg.startswith("~")


def schema_key(override: str) -> str:
    """The config key an override sets (`+eval.x=1` -> `eval.x`)."""
    return override.split("=", 1)[0].lstrip("+~")


def _compose_one(verb: str, overrides: list[str], suggest: bool = True) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return hydra_compose(verb, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise _composition_error(verb, err, overrides, suggest) from None


def _expand(verb: str, overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command launches (Hydra's basic sweeper's product)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as err:
        bad = next((o for o in overrides if _unparsable(parser, o)), overrides[0])
        raise UserError(f"cannot read the override {bad!r}: {_one_line(err)}") from None
    lists = []
    for o in parsed:
        key = o.get_key_element()
        if not (multirun and o.is_sweep_override()):
            lists.append([o.input_line])
        elif o.is_discrete_sweep():
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            raise UserError(
                f"{o.input_line}: a sweep takes a list of values, range(...) or glob(...)"
            )
    return [list(job) for job in itertools.product(*lists)]


def _unparsable(parser: object, override: str) -> bool:
    from hydra.errors import HydraException

    try:
        parser.parse_overrides([override])  # type: ignore[attr-defined]
    except HydraException:
        return True
    return False


def limited(cfg: DictConfig) -> DictConfig:
    """`cfg` with the dry-run caps (`limits.experts`, `limits.expert_epochs`) applied to its
    expert settings, so the saved config says what ran (a method's steps are capped where the
    method resolves them, DistillContext.steps)."""
    limits, expert = cfg.get("limits"), cfg.get("expert")
    if limits is None or expert is None:
        return cfg
    for key, cap in (("num_experts", limits.experts), ("epochs", limits.expert_epochs)):
        if cap is not None and int(expert[key]) > int(cap):
            expert[key] = int(cap)
    return cfg


def job_configs(verb: str, args: list[str], check: bool = True) -> list[DictConfig]:
    """Compose and check (`schema.check`) the config of every job `mmdistill <verb> <args>`
    would run, before any of them starts: a bad value in one job of a sweep stops the sweep
    before its first job."""
    from hydra import initialize_config_dir

    overrides = [a for a in args if is_override(a)]
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    register_resolvers()
    configs = []
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for job in _expand(verb, overrides, multirun):
            cfg = limited(_compose_one(verb, job))
            if check:
                schema.check(cfg, verb)
            configs.append(cfg)
    return configs


def method_presets(conf: Path | None = None) -> dict[str, str]:
    """Every method preset of the config tree (conf/method/*.yaml): its label (`name`) and the
    family it runs, each read from the file or, where the file leaves it to a preset it
    extends (`defaults: [covmatch]`), from that one, as Hydra composes them. Tables and shared
    sets accept these labels."""
    folder = (conf or conf_dir()) / "method"
    fix = "repair the method preset"
    raw = {p.stem: io.read_yaml(p, fix=fix) or {} for p in sorted(folder.glob("*.yaml"))}

    def value(stem: str, key: str, seen: tuple[str, ...] = ()) -> str | None:
        tree = raw.get(stem, {})
        if key in tree or stem in seen:
            return tree.get(key)
        bases = [d for d in tree.get("defaults", []) if isinstance(d, str) and d in raw]
        return value(bases[-1], key, (*seen, stem)) if bases else None

    return {str(value(s, "name") or s): str(value(s, "family")) for s in raw}


def run_config(run_dir: Path) -> DictConfig:
    """The composed config a run folder was made with (`.hydra/config.yaml`)."""
    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir} has no .hydra/config.yaml; point at a run folder")
    register_resolvers()
    tree = io.read_yaml(saved, fix="the run's config cannot be recovered; run it again")
    if not isinstance(tree, dict):
        raise io.damaged(saved, "not a config mapping", "the run's config cannot be recovered")
    return OmegaConf.create(tree)
