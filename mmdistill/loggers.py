"""Optional experiment loggers (`logger=none|tensorboard|wandb`): the run's metrics records,
sent on to TensorBoard or Weights & Biases as they are written.

Files come first: `metrics.jsonl` is always written and is what `mmdistill report` reads; a
logger only replays the same records (tag `<stream>/<value>` at the record's step), so nothing
is logged that the file does not hold. A logger attached to a run that already has records (a
resumed run) first replays those, unless its own earlier output is there (TensorBoard's event
files). The logger's package is imported only when it is chosen, and a missing one is one line
naming the install command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmdistill.errors import UserError
from mmdistill.metrics import FILE, add_sink, read, remove_sink, values
from mmdistill.settings import BOOL, MAYBE_TEXT, TEXT, NoKeys, register, setting, settings

LOGGERS = ("none", "tensorboard", "wandb")
register("logger.", "logger.name", "none")(NoKeys)


@register("logger.", "logger.name", "tensorboard")
@settings
class TensorBoardSettings:
    """Where in the run folder TensorBoard writes its event files."""

    dir: str = setting(TEXT)


@register("logger.", "logger.name", "wandb")
@settings
class WandbSettings:
    """The Weights & Biases project a run logs to, and whether it syncs as it runs."""

    online: bool = setting(BOOL)
    project: str = setting(TEXT)
    entity: str | None = setting(MAYBE_TEXT)


class TensorBoard:
    """Scalars in `<run>/<dir>` through `torch.utils.tensorboard`, at each record's wall time."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "logger=tensorboard needs the tensorboard package: "
                "pip install 'mmdistill[tensorboard]'"
            ) from None
        self.fresh = not any(Path(folder).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(folder))

    def __call__(self, record: dict[str, Any]) -> None:
        for key, value in values(record).items():
            self.writer.add_scalar(
                f"{record['stream']}/{key}",
                value,
                global_step=int(record["step"]),
                walltime=record.get("time"),
            )

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per job, offline unless `logger.online=true`; each stream has its own step
    axis (`<stream>/step`), since streams count steps of their own."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "logger=wandb needs the wandb package: pip install 'mmdistill[wandb]'"
            ) from None
        self.fresh = True  # every job start is a new W&B run
        self.defined: set[str] = set()
        self.run = wandb.init(
            project=str(cfg.get("project") or "mmdistill"),
            entity=cfg.get("entity"),
            name=Path(run_dir).name,
            dir=str(run_dir),
            mode="online" if bool(cfg.get("online", False)) else "offline",
            config=config,
        )

    def __call__(self, record: dict[str, Any]) -> None:
        stream = record["stream"]
        if stream not in self.defined:
            self.run.define_metric(f"{stream}/step")
            self.run.define_metric(f"{stream}/*", step_metric=f"{stream}/step")
            self.defined.add(stream)
        row = {f"{stream}/{k}": v for k, v in values(record).items()}
        row[f"{stream}/step"] = int(record["step"])
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()


def build(
    cfg: Any, run_dir: Path, config: Callable[[], dict[str, Any]]
) -> TensorBoard | WandB | None:
    """The chosen logger (None for `none`); fails in one line before the job does any work.
    `config()` gives the job's config (W&B records it with the run)."""
    name = "none" if cfg is None else str(cfg.get("name", "none"))
    if name not in LOGGERS:
        raise UserError(f"unknown logger {name!r}; choose one of: {', '.join(LOGGERS)}")
    if name == "tensorboard":
        return TensorBoard(Path(run_dir) / str(cfg.get("dir") or "tensorboard"))
    if name == "wandb":
        return WandB(cfg, run_dir, config())
    return None


@contextlib.contextmanager
def attached(cfg: Any, run_dir: Path, config: Callable[[], dict[str, Any]]) -> Iterator[None]:
    """Feed the run's metrics records to the chosen logger while the job runs."""
    logger = build(cfg, run_dir, config)
    if logger is None:
        yield
        return
    path = Path(run_dir) / FILE
    try:
        if logger.fresh and path.is_file():
            for record in read(path)[0]:
                logger(record)
        add_sink(path, logger)
        yield
    finally:
        remove_sink(path, logger)
        logger.close()
