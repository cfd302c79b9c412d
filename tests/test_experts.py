"""Expert buffers: build, cache hit, fan-out, key identity and mismatch errors (shapes + tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mmdistill.config import compose
from mmdistill.errors import UserError
from mmdistill.jobs import Prepared, prepare
from mmdistill.runs import Run
from mmdistill.training.experts import (
    Buffer,
    ExpertSettings,
    ExpertSource,
    ParamLayout,
    buffer_key,
    build_student,
    train_expert,
)

SMALL = ["dataset.split_sizes=[40,20,20]", "expert.num_experts=2", "expert.epochs=2", "device=cpu"]
# The tiny encoder with frozen (random) trunks: feature space, heads only, fast.
FEATURE = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(*overrides: str) -> DictConfig:
    return compose("buffer", [*SMALL, *overrides])


def prepared(tmp_path: Path, cfg: DictConfig) -> Prepared:
    return prepare(cfg, "cpu", Run(tmp_path / "run", "buffer", "cpu", 0), None)


def build(cfg: DictConfig, prep: Prepared, cache: Path, **kw) -> tuple[Buffer, list[str]]:
    said: list[str] = []
    source = ExpertSource(
        cfg.expert,
        prep.encoder,
        prep.train,
        prep.val,
        cfg.dataset.name,
        cfg.noise,
        cache,
        "cpu",
        say=said.append,
    )
    buf = source.buffer(**kw)
    return buf, said


def test_buffer_builds_then_hits_cache(tmp_path: Path) -> None:
    cfg = compose_cfg(*FEATURE)
    prep = prepared(tmp_path, cfg)
    buf, said = build(cfg, prep, tmp_path / "cache")
    assert buf.indices() == [0, 1]
    assert any("training 2" in s for s in said)
    settings = ExpertSettings.from_cfg(cfg.expert)
    for i in buf.indices():
        traj = buf.segment(i, 0, settings.epochs)
        assert traj.shape[0] == settings.epochs + 1
        # Snapshot 0 is the seeded fresh student; training moved it every epoch.
        init = build_student(prep.encoder, settings.seed + i, None)
        layout = ParamLayout.of(init)
        assert buf.layout(i) == layout
        assert torch.equal(traj[0], layout.flatten(init))
        assert (traj[1:] - traj[:-1]).norm(dim=1).min() > 0
        assert "val_r_mean" in json.loads(buf.metadata(i)["stats"])
    stamps = [buf.expert_path(i).stat().st_mtime_ns for i in buf.indices()]
    again, said = build(cfg, prep, tmp_path / "cache")
    assert again.path == buf.path
    assert any("using expert buffer" in s for s in said)
    assert [again.expert_path(i).stat().st_mtime_ns for i in again.indices()] == stamps


def test_fan_out_builds_the_same_experts(tmp_path: Path) -> None:
    cfg = compose_cfg(*FEATURE)
    prep = prepared(tmp_path, cfg)
    one, _ = build(cfg, prep, tmp_path / "a", indices=[1])
    assert one.indices() == [1]
    both, _ = build(cfg, prep, tmp_path / "b")
    assert torch.equal(one.segment(1, 0, 2), both.segment(1, 0, 2))
    assert not torch.equal(both.segment(0, 0, 2), both.segment(1, 0, 2))


def test_key_tracks_what_shapes_the_experts(tmp_path: Path) -> None:
    def key(*overrides: str) -> str:
        cfg = compose_cfg(*FEATURE, *overrides)
        prep = prepared(tmp_path, cfg)
        settings = ExpertSettings.from_cfg(cfg.expert)
        return buffer_key(prep.encoder, prep.train, cfg.dataset.name, cfg.noise, settings)[0]

    base = key()
    assert key("encoder.recipe.lr=0.5", "expert.num_experts=7", "expert.index=3") == base
    assert key("dataset.split_sizes=[41,20,20]") != base  # other data
    assert key("encoder.head.dim=32") != base  # other encoder head
    assert key("expert.lr=0.05") != base  # other expert settings
    assert key("encoder.train_image_trunk=true") != base  # pixel space: other data and trunk


def test_explicit_buffer_from_another_encoder_is_an_error(tmp_path: Path) -> None:
    cfg = compose_cfg(*FEATURE)
    buf, _ = build(cfg, prepared(tmp_path, cfg), tmp_path / "cache")
    other = compose_cfg(*FEATURE, "encoder.head.dim=32")
    prep = prepared(tmp_path, other)
    with pytest.raises(UserError) as err:
        build(other, prep, tmp_path / "cache", explicit=str(buf.path))
    msg = str(err.value)
    settings = ExpertSettings.from_cfg(other.expert)
    want = buffer_key(prep.encoder, prep.train, "shapes", other.noise, settings)[0]
    assert buf.key in msg and want in msg and str(buf.path) in msg
    # Without an explicit path the other encoder gets its own entry, never this one.
    own, _ = build(other, prep, tmp_path / "cache")
    assert own.path != buf.path
    with pytest.raises(UserError, match="not an expert buffer"):
        build(other, prep, tmp_path / "cache", explicit=str(tmp_path))


def test_lora_experts_train_adapters_and_heads_only(tmp_path: Path) -> None:
    cfg = compose_cfg("expert.lora=true", "expert.epochs=1")
    prep = prepared(tmp_path, cfg)
    settings = ExpertSettings.from_cfg(cfg.expert)
    traj, layout, _ = train_expert(prep.encoder, prep.train, None, settings, 0, "cpu")
    trunk = [n for n in layout.names if "trunk" in n]
    assert trunk and all("lora_" in n for n in trunk)
    assert any(n.startswith("image_head") for n in layout.names)
    full = ParamLayout.of(prep.encoder.new_student(0))
    assert layout.numel < full.numel
    moved = traj[1] - traj[0]
    assert moved.abs().max() > 0


def test_buffer_verb_fans_out_into_one_cache(tmp_path: Path) -> None:
    env = dict(os.environ, MMDISTILL_CACHE=str(tmp_path / "cache"))
    env["MMDISTILL_OUTPUTS"] = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "mmdistill.cli", "buffer", "-m", "expert.index=0,1", "threads=1"]
    done = subprocess.run(
        cmd + SMALL + FEATURE, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folders = list((tmp_path / "cache" / "buffers").iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].glob("expert_*")) == [
        "expert_000.safetensors",
        "expert_001.safetensors",
    ]
    records = list((tmp_path / "out").rglob("buffer.json"))
    assert len(records) == 2
    assert {json.loads(r.read_text())["path"] for r in records} == {str(folders[0])}
