"""Every config file composes (Hydra compose API), for every verb that can use it, and passes
the typed schema the CLI checks before every job (a key added to a config must be added there)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmdistill import schema
from mmdistill.config import conf_dir, register_resolvers
from mmdistill.methods import settings as _units  # noqa: F401  (registers the schema's units)

CONF = conf_dir()
GROUPS = ("dataset", "encoder", "method", "noise", "eval", "debug")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(verb: str, overrides: list[str], hydra: bool = False) -> OmegaConf:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=verb, overrides=overrides, return_hydra_config=hydra)


@pytest.mark.parametrize(("group", "choice"), OPTIONS, ids=[f"{g}={c}" for g, c in OPTIONS])
def test_every_group_option_composes(group: str, choice: str) -> None:
    required = ["dataset.path=some/hub-id"] if (group, choice) == ("dataset", "hf") else []
    cfg = composed("distill", [f"{group}={choice}", *required])
    schema.check(cfg, "distill")
    # Resolve everything a job reads (interpolations into other groups included).
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["verb"] == "distill"
    assert cfg.eval.students >= 1 and cfg.encoder.recipe.steps >= 1


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name: str) -> None:
    cfg = composed("distill", [f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    schema.check(cfg, "distill")


@pytest.mark.parametrize("verb", ["distill", "train", "evaluate", "buffer"])
def test_verbs_compose_with_defaults(verb: str) -> None:
    if not (CONF / f"{verb}.yaml").is_file():
        pytest.skip(f"conf/{verb}.yaml not present")
    overrides = ["source=some/run"] if verb == "evaluate" else []
    cfg = composed(verb, overrides)
    assert cfg.verb == verb and cfg.dataset.name == "shapes" and cfg.encoder.name == "tiny"
    schema.check(cfg, verb)


def test_run_dir_layout() -> None:
    cfg = composed("distill", ["method=random", "budget.pairs=50"], hydra=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert "distill/shapes/random-50/" in run_dir
