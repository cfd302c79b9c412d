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

from mmdistill import io, loggers, metrics
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


CONFIG = {
    "seed": 0,
    "method": {"name": "covmatch", "lr": 0.1, "frozen": True, "layers": [1, 2]},
    "budget": {"pairs": 100, "ratio": None},
    "monitor": {},
}
FLAT = {
    "seed": 0,
    "method.name": "covmatch",
    "method.lr": 0.1,
    "method.frozen": True,
    "method.layers": "[1,2]",
    "budget.pairs": 100,
    "budget.ratio": "null",
    "monitor": "{}",
}
SUMMARY = {
    m: {"mean": 10.0 + i, "std": 0.5 + i}
    for i, m in enumerate(("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean"))
}
RESULTS = {"pairs": 96, "train_pairs": 300, "precision": "fp32", "summary": SUMMARY}
FINAL = {f"final/{m}": v["mean"] for m, v in SUMMARY.items()} | {"final/r_mean_std": 6.5}


def finish_a_run(run_dir: Path) -> None:
    """What a job leaves behind: a metrics record and its results.json."""
    metrics.Metrics(run_dir / metrics.FILE).write("method", 3, loss=1.0)
    io.write_json(run_dir / "results.json", {**RESULTS, "students": [], "method": "covmatch"})


def test_the_config_flattens_to_dotted_keys_and_hparam_values() -> None:
    assert loggers.flat_config(CONFIG) == FLAT
    hparams, final = loggers.final_row(CONFIG, RESULTS)
    assert hparams == FLAT | {
        "result.pairs": 96,
        "result.train_pairs": 300,
        "result.precision": "fp32",
    }
    assert final == FINAL


def test_tensorboard_gets_the_final_recalls_and_the_run_config(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    cfg = OmegaConf.create({"name": "tensorboard", "dir": "tb"})
    with loggers.attached(cfg, tmp_path, lambda: CONFIG):
        finish_a_run(tmp_path)
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))  # one run: curves and row
    events.Reload()
    content = events.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    got = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert got == {k: float(v) if isinstance(v, bool) else v for k, v in FLAT.items()} | {
        "result.pairs": 96,
        "result.train_pairs": 300,
        "result.precision": "fp32",
    }  # torch's add_hparams keeps a bool as the number 0/1
    assert "method/loss" in events.Tags()["scalars"]
    for tag, value in FINAL.items():
        assert [e.value for e in events.Scalars(tag)] == [pytest.approx(value)], tag


def test_a_failed_job_sends_no_final_row(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = OmegaConf.create({"name": "tensorboard", "dir": "tb"})
    with pytest.raises(RuntimeError), loggers.attached(cfg, tmp_path, lambda: CONFIG):
        finish_a_run(tmp_path)
        raise RuntimeError("the report failed")
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["method/loss"]
    with pytest.raises(KeyError):  # no hparams data at all
        events.PluginTagToContent("hparams")


class Recorder:
    """W&B's run.config / run.summary: what `update` was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, dict]] = []

    def update(self, values: dict, **options: object) -> None:
        self.calls.append((values, options))


class FakeRun:
    def __init__(self, **init: object) -> None:
        self.init, self.defined, self.rows, self.finished = init, [], [], False
        self.config, self.summary = Recorder(), Recorder()

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def finish(self) -> None:
        self.finished = True


def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[FakeRun]:
    """A `wandb` module whose init records each run it starts, in the returned list."""
    runs: list[FakeRun] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return runs


def test_wandb_is_offline_by_default_and_replays_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = fake_wandb(monkeypatch)
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
    assert run.config.calls == run.summary.calls == []  # no results.json: no final row
    with loggers.attached(OmegaConf.merge(cfg, {"online": True}), tmp_path, dict):
        pass
    assert runs[-1].init["mode"] == "online"


def test_wandb_gets_the_flat_config_and_the_final_recalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = fake_wandb(monkeypatch)
    cfg = OmegaConf.create({"name": "wandb", "online": False, "project": "p", "entity": None})
    with loggers.attached(cfg, tmp_path, lambda: CONFIG):
        finish_a_run(tmp_path)
    (run,) = runs
    assert run.init["config"] == FLAT  # comparable from the start, even if the job fails
    hparams = FLAT | {"result.pairs": 96, "result.train_pairs": 300, "result.precision": "fp32"}
    assert run.config.calls == [(hparams, {"allow_val_change": True})]
    assert run.summary.calls == [(FINAL, {})] and run.finished


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
