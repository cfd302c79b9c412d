"""Optional experiment loggers (`logger=none|tensorboard|wandb`): the run's metrics records,
sent on to TensorBoard or Weights & Biases as they are written.

Files come first: `metrics.jsonl` is always written and is what `mmdistill report` reads; a
logger only replays the same records (tag `<stream>/<value>` at the record's step), so nothing
is logged that the file does not hold. A logger attached to a run that already has records (a
resumed run) first replays those, unless its own earlier output is there (TensorBoard's event
files). The logger's package is imported only when it is chosen, and a missing one is one line
naming the install command.

So that runs can be compared, a job that ends with a `results.json` also sends its final
recalls (the summary means, `final/<metric>`) with the flattened run config (`method.lr`,
`result.pairs`, ...): TensorBoard's HParams dashboard (`add_hparams`), W&B's run config and
summary. They are read from the files the job wrote, like everything else a logger sends.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.metrics import FILE, add_sink, read, remove_sink, values
from mmdistill.settings import BOOL, MAYBE_TEXT, TEXT, NoKeys, register, setting, settings

LOGGERS = ("none", "tensorboard", "wandb")
RESULTS = "results.json"  # the job's final summary, written by every evaluating verb
FINAL = ("r_mean", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")  # summary means sent
FACTS = ("pairs", "train_pairs", "precision")  # results.json values the config cannot know
Hparam = int | float | str | bool
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

    def final(self, hparams: dict[str, Hparam], metrics: dict[str, float]) -> None:
        """The run's row in the HParams dashboard, written into this same run folder (`.`) so
        that the dashboard's row and the curves are one TensorBoard run."""
        self.writer.add_hparams(hparams, metrics, run_name=".")

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
            config=flat_config(config),  # dotted keys, as overrides spell them
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

    def final(self, hparams: dict[str, Hparam], metrics: dict[str, float]) -> None:
        """The run's columns in the W&B runs table: the config with what only the end knows
        (`result.pairs`, ...), and the final recalls as its summary."""
        self.run.config.update(hparams, allow_val_change=True)
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Hparam]:
    """A nested config as one level of dotted keys (`method.lr`), each value one that
    TensorBoard's hparams take: lists, None and empty groups as JSON text (`[60,20,30]`,
    `null`), the way an override spells them."""
    out: dict[str, Hparam] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, separators=(",", ":"), default=str)
    return out


def final_row(
    config: dict[str, Any], results: dict[str, Any]
) -> tuple[dict[str, Hparam], dict[str, float]]:
    """What a finished run is compared by: the flattened config plus the facts only its
    results know (the resolved budget, precision), and the summary's recall means."""
    hparams = flat_config(config)
    facts = {k: results[k] for k in FACTS if isinstance(results.get(k), Hparam)}
    hparams.update({f"result.{k}": v for k, v in facts.items()})
    summary = results.get("summary") or {}
    metrics = {f"final/{m}": float(summary[m]["mean"]) for m in FINAL if m in summary}
    if "r_mean" in summary:
        metrics["final/r_mean_std"] = float(summary["r_mean"]["std"])
    return hparams, metrics


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
    """Feed the run's metrics records to the chosen logger while the job runs, and its final
    results when it ends with them (not when it fails: a failed run has no row to compare)."""
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
        results = Path(run_dir) / RESULTS
        if results.is_file():
            logger.final(*final_row(config(), io.read_json(results, kind=dict)))
    finally:
        remove_sink(path, logger)
        logger.close()
