"""logger=tensorboard|wandb replay the metrics records: TensorBoard's event files read back with
TensorBoard's own reader; W&B through a stand-in module (the real package is an optional extra
this suite does not install); a missing package is one line naming the install command."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmdistill import loggers, metrics
from mmdistill.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_some(path: Path) -> list[dict]:
    log = metrics.Metrics(path)
    log.write("method", 0, loss=4.0, cov=3.5)
    log.write("method", 10, loss=2.0, cov=1.5, val_r_mean=31.25)
    log.write("student/0", 5, wall=0.5, loss=1.25, lr=1e-3)
    return metrics.read(path)[0]


def test_tensorboard_event_files_hold_the_metrics_records(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = OmegaConf.create({"name": "tensorboard", "dir": "tb"})
    before = write_some(tmp_path / metrics.FILE)[:1]  # a record from before a resume: replayed
    first = (tmp_path / metrics.FILE).read_text().splitlines()[0]
    (tmp_path / metrics.FILE).write_text(first + "\n")
    with loggers.attached(cfg, tmp_path, dict):
        log = metrics.Metrics(tmp_path / metrics.FILE)
        log.write("method", 10, loss=2.0, cov=1.5, val_r_mean=31.25)
        log.write("student/0", 5, wall=0.5, loss=1.25, lr=1e-3)
    log.write("method", 20, loss=9.0)  # after the job: not the logger's any more
    records = metrics.read(tmp_path / metrics.FILE)[0]
    assert records[0] == before[0]
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    expected = {}
    for r in records[:-1]:
        for key, value in metrics.values(r).items():
            expected.setdefault(f"{r['stream']}/{key}", []).append((r["step"], value, r["time"]))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
        assert [(s, pytest.approx(v), pytest.approx(t)) for s, v, t in points] == got, tag


class FakeRun:
    def __init__(self, **init: object) -> None:
        self.init, self.defined, self.rows, self.finished = init, [], [], False

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def finish(self) -> None:
        self.finished = True


def test_wandb_is_offline_by_default_and_replays_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = write_some(tmp_path / metrics.FILE)  # a resumed run: all of it is replayed
    cfg = OmegaConf.create({"name": "wandb", "online": False, "project": "p", "entity": None})
    with loggers.attached(cfg, tmp_path, lambda: {"seed": 0}):
        metrics.Metrics(tmp_path / metrics.FILE).write("method", 20, loss=1.0)
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path)
    assert run.init["config"] == {"seed": 0} and run.init["project"] == "p" and run.finished
    assert ("method/*", "method/step") in run.defined
    assert ("student/0/*", "student/0/step") in run.defined
    assert run.rows[1] == {
        "method/loss": 2.0,
        "method/cov": 1.5,
        "method/val_r_mean": 31.25,
        "method/step": 10,
    }
    assert len(run.rows) == len(records) + 1 and run.rows[-1]["method/step"] == 20
    with loggers.attached(OmegaConf.merge(cfg, {"online": True}), tmp_path, dict):
        pass
    assert runs[-1].init["mode"] == "online"


def test_a_missing_logger_package_is_one_line_naming_the_install(tmp_path: Path) -> None:
    """`import wandb` fails in the job (a stand-in package that raises ImportError, so the
    check does not depend on whether wandb is installed here)."""
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "method=random", "logger=wandb",
         "dataset.split_sizes=[60,20,30]", "eval.students=1", "eval.steps=2", "budget.pairs=8",
         "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert (
        lines[-1] == "error: logger=wandb needs the wandb package: pip install 'mmdistill[wandb]'"
    )
    assert not (tmp_path / "run" / "distilled.safetensors").exists()  # failed before any work
    with pytest.raises(UserError, match="unknown logger 'nope'"):
        loggers.build(OmegaConf.create({"name": "nope"}), tmp_path, dict)
