"""Job configs: where the Hydra config tree lives, its resolvers, composing a job's config in
code (tests, scripts), and reading back the config a run folder was made with."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmdistill.errors import UserError


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


def run_config(run_dir: Path) -> DictConfig:
    """The composed config a run folder was made with (`.hydra/config.yaml`)."""
    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir} has no .hydra/config.yaml; point at a run folder")
    register_resolvers()
    return OmegaConf.load(saved)
