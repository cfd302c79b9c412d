"""metrics.jsonl: records append and read back, damaged lines cost one warning each, a resumed
stream continues its clock, and logging never changes what a student or CovMatch computes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmdistill import metrics
from mmdistill.config import compose
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods.covmatch import CovMatch
from mmdistill.runs import Run
from mmdistill.training.losses import LOSSES
from mmdistill.training.trainer import Batches, Recipe, Trainer


def test_records_round_trip_and_damaged_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / metrics.FILE
    log = metrics.Metrics(path)
    log.write("method", 0, loss=torch.tensor(2.5), cov=1.0)
    log.write("student/0", 10, wall=1.5, loss=0.7, lr=1e-3)
    log.write("method", 5, val_r_mean=30.0, note="text values are kept but not plotted")
    with open(path, "a") as f:
        f.write('{"stream": "method", "step": 7, "loss": 1.0}\n')
        f.write("not json at all\n")
        f.write('{"step": 3}\n')
        f.write('{"stream": "method", "ste')  # a torn last line: the run was killed mid-write
    records, problems = metrics.read(path)
    assert [(r["stream"], r["step"]) for r in records] == [
        ("method", 0),
        ("student/0", 10),
        ("method", 5),
        ("method", 7),
    ]
    assert records[0]["loss"] == 2.5 and records[1]["wall"] == 1.5
    assert len(problems) == 3 and all(str(path) in p for p in problems)
    assert "line 5" in problems[0] and "line 6" in problems[1] and "line 7" in problems[2]
    curves = metrics.series(records)
    assert curves["method"]["loss"].steps == [0.0, 7.0]
    assert "note" not in curves["method"] and curves["method"]["val_r_mean"].values == [30.0]


def test_a_repeated_step_keeps_the_later_record(tmp_path: Path) -> None:
    """A resumed run repeats the steps after its last checkpoint."""
    log = metrics.Metrics(tmp_path / metrics.FILE)
    for step, loss in ((0, 3.0), (10, 2.0), (10, 1.5), (20, 1.0)):
        log.write("method", step, loss=loss)
    s = metrics.series(metrics.read(log.path)[0])["method"]["loss"]
    assert (s.steps, s.values) == ([0.0, 10.0, 20.0], [3.0, 1.5, 1.0])


def test_a_resumed_stream_continues_its_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / metrics.FILE
    metrics.Metrics(path).write("method", 100, wall=42.0, loss=1.0)
    again = metrics.Metrics(path)  # a new process on the same run folder
    again.start("method")
    again.write("method", 101, loss=0.9)
    again.write("expert/0", 1, loss=2.0)  # a stream with no earlier record starts at 0
    records, _ = metrics.read(path)
    assert records[1]["wall"] >= 42.0 and records[2]["wall"] < 5.0


def _student_weights(on_log) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    student = torch.nn.Module()
    student.image_trunk, student.text_trunk = None, None
    student.image_head = torch.nn.Linear(6, 4)
    student.text_head = torch.nn.Linear(5, 4)
    images, texts = torch.randn(40, 6), torch.randn(40, 5)

    def loss(s: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        zi = torch.nn.functional.normalize(s.image_head(images[idx]), dim=-1)
        zt = torch.nn.functional.normalize(s.text_head(texts[idx]), dim=-1)
        return LOSSES.get("infonce")(10 * zi @ zt.T, None)

    recipe = Recipe(lr=1e-2, schedule="cosine")
    trainer = Trainer(student, recipe, loss, total_steps=30, on_log=on_log, log_every=7)
    trainer.run(Batches(40, 8, torch.Generator().manual_seed(1)), 30)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_logging_changes_no_weight_and_reads_the_loss_on_logged_steps_only() -> None:
    seen: list[dict] = []
    logged = _student_weights(seen.append)
    plain = _student_weights(None)
    for k in plain:
        assert torch.equal(logged[k], plain[k]), k
    assert [r["step"] for r in seen] == [7, 14, 21, 28, 30]  # every 7, and the last step
    assert all(r["loss"] > 0 for r in seen)
    assert seen[0]["lr"] > seen[-1]["lr"]  # the cosine schedule shows in the head's rate


def test_covmatch_set_is_the_same_with_val_checks_and_writes_its_curve(tmp_path: Path) -> None:
    """Val checks (monitor.val_every) train students in the middle of distillation; they must
    leave the distilled set bit for bit as it is without them."""
    base = [
        "device=cpu",
        "method=covmatch",
        "dataset.split_sizes=[60,20,30]",
        "eval.students=1",
        "eval.steps=5",
        "method.steps=6",
        "method.reset_every=3",
        "method.checkpoint_every=6",
        "monitor.val_students=1",
    ]
    torch.set_num_threads(1)
    sets = {}
    for every in (0, 2):
        cfg = compose("distill", [*base, f"monitor.val_every={every}"])
        run = Run(tmp_path / str(every), "distill", "cpu", 0)
        prep = prepare(cfg, "cpu", run, None)
        sets[every] = CovMatch(cfg.method).distill(distill_context(cfg, prep, 8, "cpu", run, None))
    for key in ("images", "texts"):
        assert torch.equal(getattr(sets[0], key), getattr(sets[2], key)), key
    lines = (tmp_path / "2" / metrics.FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    checks = [r["step"] for r in records if "val_r_mean" in r]
    assert checks == [0, 2, 4, 6]
    losses = [r["step"] for r in records if "cov" in r]
    assert losses == list(range(6)) and all(r["stream"] == "method" for r in records)
    assert not any("val_r_mean" in json.loads(x) for x in (tmp_path / "0" / metrics.FILE).open())
