"""The evaluation protocol's student training: parallel students, dropout, optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.data import build_dataset
from mmdistill.data.features import real_split
from mmdistill.models.encoders import build_encoder
from mmdistill.models.student import FeatureDropout
from mmdistill.protocol import run_protocol, student_workers

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
