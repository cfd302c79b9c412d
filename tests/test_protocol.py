"""The evaluation protocol's student training: parallel students, dropout, optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.data import build_dataset
from mmdistill.models.factory import build_encoder
from mmdistill.models.student import FeatureDropout
from mmdistill.training import protocol
from mmdistill.training.features import real_split
from mmdistill.training.protocol import run_protocol, student_workers, train_student
from mmdistill.training.retrieval import NonFiniteEmbeddings
from mmdistill.training.trainer import Recipe

REPO = Path(__file__).resolve().parents[1]


def eval_cfg(**over):
    cfg = OmegaConf.load(REPO / "conf" / "eval" / "default.yaml")
    recipe = {"steps": 60, "batch_size": 32, "lr": 1e-3, "trunk_lr": 1e-4}
    recipe |= {"weight_decay": 0.1, "feature_dropout": 0.5}
    cfg = OmegaConf.merge({"encoder": {"recipe": recipe}}, {"eval": cfg}).eval
    OmegaConf.resolve(cfg)
    return OmegaConf.merge(cfg, {"students": 3}, over)


def test_parallel_students_match_sequential_ones(tmp_path: Path, one_thread) -> None:
    """Forked students give the same records, in the same order, as students in turn: each
    seeds every draw it makes. Resuming from finished students continues the same list."""
    data_cfg = OmegaConf.load(REPO / "conf" / "dataset" / "shapes.yaml")
    data_cfg.split_sizes = [40, 10, 20]
    data = build_dataset(data_cfg)
    enc_cfg = OmegaConf.load(REPO / "conf" / "encoder" / "tiny.yaml")
    enc_cfg.train_image_trunk = enc_cfg.train_text_trunk = False
    encoder = build_encoder(enc_cfg)
    train, test = (
        real_split(encoder, data.split(s), "shapes", tmp_path) for s in ("train", "test")
    )
    pairs = train.pairset()
    seen = []
    sequential = run_protocol(encoder, pairs, eval_cfg(workers=1), test, None, "cpu", 0)
    parallel = run_protocol(
        encoder,
        pairs,
        eval_cfg(workers=2),
        test,
        None,
        "cpu",
        0,
        on_student=lambda s: seen.append([r["student"] for r in s]),
    )
    assert parallel.students == sequential.students
    assert seen == [[0], [0, 1], [0, 1, 2]]  # the resume file grows in student order
    resumed = run_protocol(
        encoder, pairs, eval_cfg(workers=2), test, None, "cpu", 0, done=sequential.students[:1]
    )
    assert resumed.students == sequential.students


def test_workers_follow_threads_on_cpu_only(one_thread) -> None:
    assert student_workers(eval_cfg(), "cpu", 5) == 1  # one thread: one student at a time
    torch.set_num_threads(2)
    assert student_workers(eval_cfg(), "cpu", 5) == 2
    assert student_workers(eval_cfg(), "cpu", 1) == 1
    assert student_workers(eval_cfg(workers=4), "cpu", 3) == 3
    assert student_workers(eval_cfg(), "cuda", 5) == 1


def test_feature_dropout_is_inverted_dropout() -> None:
    drop = FeatureDropout(0.7)
    x = torch.ones(200, 500)
    y = drop(x)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.3)
    assert (y == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)  # expectation kept
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="dropout"):
        FeatureDropout(1.0)


def _shapes_heads_only(tmp_path: Path):
    data_cfg = OmegaConf.load(REPO / "conf" / "dataset" / "shapes.yaml")
    data_cfg.split_sizes = [40, 10, 20]
    data = build_dataset(data_cfg)
    enc_cfg = OmegaConf.load(REPO / "conf" / "encoder" / "tiny.yaml")
    enc_cfg.train_image_trunk = enc_cfg.train_text_trunk = False
    encoder = build_encoder(enc_cfg)
    splits = {s: real_split(encoder, data.split(s), "shapes", tmp_path) for s in ("train", "val")}
    return encoder, splits["train"], splits["val"]


def test_a_blown_up_student_is_refused_not_scored_100(tmp_path: Path, one_thread) -> None:
    """SGD at lr 1e37 for 2 steps once scored 100.0 on every metric (ties counted as hits and
    the loss was checked only before each step). Now its embeddings are refused in one line."""
    encoder, train, val = _shapes_heads_only(tmp_path)
    cfg = eval_cfg(optimizer="sgd", lr=1e37, steps=2, students=1, workers=1, feature_dropout=0.0)
    with pytest.raises(NonFiniteEmbeddings, match="student 0") as err:
        run_protocol(encoder, train.pairset(), cfg, val, None, "cpu", 0)
    assert "\n" not in str(err.value) and "eval.lr" in str(err.value)


def test_selection_never_picks_a_diverged_checkpoint(
    tmp_path: Path, one_thread, monkeypatch
) -> None:
    """best_val skips checkpoints whose embeddings are not finite (scored None in the history)
    and keeps the best finite one."""
    encoder, train, val = _shapes_heads_only(tmp_path)
    student = encoder.new_student(0)
    cfg = eval_cfg(selection="best_val", eval_every=1, steps=3, lr=1e-3)
    real_evaluate = protocol.evaluate
    calls = []

    def flaky(student, split, device):
        calls.append(1)
        if len(calls) == 2:  # the second check sees a diverged student
            raise NonFiniteEmbeddings("not finite")
        return real_evaluate(student, split, device)

    monkeypatch.setattr(protocol, "evaluate", flaky)
    _, hist = train_student(student, train.pairset(), cfg, 0, "cpu", select_on=val)
    scores = [h["r_mean"] for h in hist["history"]]
    assert scores[1] is None and all(s is not None for s in scores[::2])
    assert hist["selected_r_mean"] == max(s for s in scores if s is not None)


def test_learned_image_lr_serves_both_branches(tmp_path: Path) -> None:
    """MTT-VL's evaluation trains both encoders at the learned image step size (paper_mtt);
    LoRS's gives each branch its own (`learned`)."""
    encoder, train, _ = _shapes_heads_only(tmp_path)
    pairs = train.pairset()
    pairs.step_sizes = {"image": 0.25, "text": 0.5}
    student = encoder.new_student(0)
    per_branch = Recipe.from_cfg(eval_cfg(lr="learned")).optimizer_for(student, pairs)
    shared = Recipe.from_cfg(eval_cfg(lr="learned_image")).optimizer_for(student, pairs)
    assert {g["name"]: g["lr"] for g in per_branch.param_groups} == {
        "image_head": 0.25,
        "text_head": 0.5,
    }
    assert {g["lr"] for g in shared.param_groups} == {0.25}


@pytest.mark.parametrize("loss", ["auto", "wbce"])
def test_students_trained_together_match_students_trained_alone(
    tmp_path: Path, one_thread, loss: str
) -> None:
    """Head-only students stacked into one batched model (the GPU path, forced here on CPU)
    see the same batches and dropout draws as alone: the same heads to float tolerance and the
    same records."""
    encoder, train, val = _shapes_heads_only(tmp_path)
    pairs = train.pairset()
    cfg = eval_cfg(workers=1, loss=loss, steps=40)
    alone = run_protocol(
        encoder, pairs, OmegaConf.merge(cfg, {"together": "false"}), val, None, "cpu", 0
    )
    together = run_protocol(
        encoder, pairs, OmegaConf.merge(cfg, {"together": "true"}), val, None, "cpu", 0
    )
    for a, b in zip(alone.students, together.students, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert (
        protocol.train_together(OmegaConf.merge(cfg, {"together": "auto"}), "cpu", encoder) is False
    )
    assert protocol.train_together(OmegaConf.merge(cfg, {"together": "auto"}), "cuda", encoder)
    best = OmegaConf.merge(cfg, {"together": "true", "selection": "best_val"})
    assert protocol.train_together(best, "cuda", encoder) is False  # selection needs each alone
