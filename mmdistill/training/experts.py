"""Expert trajectories (`mmdistill buffer`): what trajectory-matching methods imitate.

An expert is a fresh student trained on the real training pairs with plain SGD (paper: lr 0.1,
batch 128, 10 epochs); its trainable parameters are snapshot as one flat vector after every
epoch. Experts live in a cache folder keyed by a hash of everything that shapes them: the
training data as the student sees it (so noise and the frozen trunks are covered), the encoder
config (trunks, heads, temperature), the noise config and the expert settings. A buffer built
for another dataset or encoder therefore has another key and is never picked up by accident.

Layout: `<cache_dir>/buffers/<dataset>-<encoder>-<key>/buffer.json` (what the key hashes) and
`expert_<i>.safetensors` (tensor `trajectory` `[epochs + 1, P]`, the parameter layout and the
expert's val recall in the metadata). Expert `i` is seeded from `expert.seed + i`, so parallel
jobs (`mmdistill buffer -m expert.index=0,1,2,3`) fill one folder without clashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.metrics import Metrics
from mmdistill.models.encoders import Encoder
from mmdistill.models.lora import LoraSettings, lora_student
from mmdistill.models.student import Student
from mmdistill.training.features import RealSplit, encoder_identity
from mmdistill.training.protocol import evaluate
from mmdistill.training.trainer import Batches, BatchLoss, LogHook, Recipe, Trainer, pair_loss

log = logging.getLogger(__name__)
# Bumped when expert training changes, so buffers from older code are rebuilt, not reused.
BUFFER_VERSION = 1
BRANCHES = ("image", "text")


# --------------------------------------------------------------------------- parameter layout


@dataclass(frozen=True)
class ParamLayout:
    """Which student parameters form the matched vector, in order: image branch, then text."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    branches: tuple[str, ...]

    @classmethod
    def of(cls, student: Student) -> ParamLayout:
        entries = []
        for name, p in student.named_parameters():
            if not p.requires_grad:
                continue
            branch = name.split("_", 1)[0]
            if branch not in BRANCHES:
                raise ValueError(f"trainable parameter {name} belongs to no branch")
            entries.append((BRANCHES.index(branch), name, tuple(p.shape)))
        entries.sort(key=lambda e: e[0])  # stable: keeps module order inside a branch
        return cls(
            names=tuple(e[1] for e in entries),
            shapes=tuple(e[2] for e in entries),
            branches=tuple(BRANCHES[e[0]] for e in entries),
        )

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def branch_numel(self, branch: str) -> int:
        return sum(n for n, b in zip(self.sizes, self.branches, strict=True) if b == branch)

    def branch_slices(self) -> dict[str, slice]:
        n_img = self.branch_numel("image")
        return {"image": slice(0, n_img), "text": slice(n_img, self.numel)}

    def flatten(self, student: Student) -> Tensor:
        params = dict(student.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).float()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat` shaped like the parameters (keeps autograd through `flat`)."""
        parts = torch.split(flat, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def load_into(self, student: Student, flat: Tensor) -> None:
        params = dict(student.named_parameters())
        with torch.no_grad():
            for n, v in self.unflatten(flat).items():
                params[n].copy_(v)

    def to_json(self) -> str:
        return json.dumps(
            [
                [n, list(s), b]
                for n, s, b in zip(self.names, self.shapes, self.branches, strict=True)
            ]
        )

    @classmethod
    def from_json(cls, text: str) -> ParamLayout:
        rows = json.loads(text)
        return cls(
            names=tuple(r[0] for r in rows),
            shapes=tuple(tuple(r[1]) for r in rows),
            branches=tuple(r[2] for r in rows),
        )


def build_student(encoder: Encoder, seed: int, lora: LoraSettings | None) -> Student:
    """The student whose trainable parameters experts and matching share (LoRA or plain)."""
    if lora is None:
        return encoder.new_student(seed)
    return lora_student(encoder, seed, lora)


# ----------------------------------------------------------------------------- settings, key


@dataclass(frozen=True)
class ExpertSettings:
    """How experts train; all of it is part of the buffer key."""

    epochs: int
    lr: float
    momentum: float
    batch_size: int
    seed: int
    lora: LoraSettings | None

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ExpertSettings:
        epochs, batch = int(cfg.epochs), int(cfg.batch_size)
        if epochs < 1 or batch < 2:
            raise UserError(
                f"expert.epochs={epochs} and expert.batch_size={batch}: need >= 1 epoch and >= 2 "
                "pairs per batch"
            )
        return cls(
            epochs=epochs,
            lr=float(cfg.lr),
            momentum=float(cfg.momentum),
            batch_size=batch,
            seed=int(cfg.seed),
            lora=LoraSettings.from_cfg(cfg),
        )

    @property
    def recipe(self) -> Recipe:
        """The papers' expert optimiser: plain SGD with momentum, one rate for every part."""
        return Recipe(optimizer="sgd", lr=self.lr, trunk_lr=self.lr, momentum=self.momentum)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "momentum": self.momentum,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "lora": None if self.lora is None else self.lora.as_dict(),
            "loss": "infonce",
            "optimizer": "sgd",
        }


FINGERPRINT_CHUNK = 256  # rows hashed at a time
FINGERPRINT_FULL = 1 << 26  # tensors with more elements are hashed every k-th row


def split_fingerprint(split: RealSplit) -> str:
    """Content hash of a split as the student sees it (features or pixels, captions, index).

    Rows are hashed a chunk at a time, so a pixel store is read in pieces, never whole; the
    bytes hashed (and so the key) are those of the whole tensor's rows in order.
    """
    h = hashlib.sha1()
    for t in (split.images, split.texts, split.text_mask, split.caption_image):
        if t is None:
            h.update(b"none")
            continue
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        n = t.shape[0]
        # Hash every row of ordinary splits; stride through very large pixel sets.
        step = max(1, n * math.prod(t.shape[1:]) // FINGERPRINT_FULL)
        for s in range(0, n, step * FINGERPRINT_CHUNK):
            rows = t[s : s + step * FINGERPRINT_CHUNK : step]
            h.update(rows.contiguous().cpu().numpy().tobytes())
    h.update("\n".join(split.captions).encode())
    return h.hexdigest()[:16]


def buffer_key(
    encoder: Encoder,
    train: RealSplit,
    dataset_name: str,
    noise: DictConfig,
    settings: ExpertSettings,
) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes): data content, encoder config, noise and expert settings."""
    enc = encoder_identity(encoder)
    enc.pop("recipe", None)  # the evaluation recipe does not shape experts
    parts = {
        "version": BUFFER_VERSION,
        "dataset": dataset_name,
        "data": split_fingerprint(train),
        "encoder": enc,
        "noise": OmegaConf.to_container(noise, resolve=True),
        "expert": settings.as_dict(),
    }
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16], parts


def _describe(parts: dict[str, Any]) -> str:
    enc = parts.get("encoder", {})
    return (
        f"dataset {parts.get('dataset')} (data {parts.get('data')}), encoder {enc.get('name')}, "
        f"noise {parts.get('noise', {}).get('name')}, experts {parts.get('expert')}"
    )


# ------------------------------------------------------------------------------ training


def train_expert(
    encoder: Encoder,
    train: RealSplit,
    val: RealSplit | None,
    settings: ExpertSettings,
    index: int,
    device: str,
    on_epoch: Callable[[int], None] | None = None,
    batch_loss: BatchLoss | None = None,
    on_log: LogHook | None = None,
) -> tuple[Tensor, ParamLayout, dict[str, Any]]:
    """Train expert `index`; returns its trajectory `[epochs + 1, P]`, layout and stats.

    `batch_loss(student, pair_indices)` replaces the symmetric InfoNCE of the batch (MDW's
    dual-track experts pass theirs); `on_log` receives the trainer's loss records."""
    seed = settings.seed + index
    student = build_student(encoder, seed, settings.lora).to(device).train()
    layout = ParamLayout.of(student)
    steps_per_epoch = math.ceil(train.n_pairs / settings.batch_size)
    trainer = Trainer(
        student,
        settings.recipe,
        batch_loss or pair_loss(train.pairset(), "infonce", device),
        total_steps=settings.epochs * steps_per_epoch,  # the length of its curve, not a schedule
        what=f"expert {index}",
        hint=f"lower expert.lr (now {settings.lr})",
        on_log=on_log,
    )
    gen = torch.Generator().manual_seed(seed)
    snapshots = [layout.flatten(student).cpu()]

    def snapshot(epoch: int) -> None:
        snapshots.append(layout.flatten(student).cpu())
        if on_epoch:
            on_epoch(epoch)

    t0 = time.perf_counter()
    batches = Batches(train.n_pairs, settings.batch_size, gen, order="epoch", min_last=2)
    trainer.run_epochs(batches, settings.epochs, snapshot)
    stats: dict[str, Any] = {"index": index, "seed": seed, "seconds": time.perf_counter() - t0}
    if val is not None:
        stats["val_r_mean"] = evaluate(student, val, device)["r_mean"]
        if on_log is not None:
            on_log({"step": trainer.step_count, "val_r_mean": stats["val_r_mean"]})
    return torch.stack(snapshots), layout, stats


def expert_curve(metrics: Metrics | None, stream: str) -> LogHook | None:
    """A trainer hook that writes an expert's records to the run's metrics under `stream`."""
    if metrics is None:
        return None
    metrics.start(stream)
    return lambda record: metrics.write(stream, **record)


# ------------------------------------------------------------------------------ the buffer


class Buffer:
    """A folder of expert trajectories sharing one key; reads epoch ranges on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        info_path = self.path / "buffer.json"
        if not info_path.is_file():
            raise UserError(
                f"{self.path} is not an expert buffer (no buffer.json); build one with "
                "`mmdistill buffer` or leave method.buffer unset"
            )
        fix = f"delete the folder {self.path}; its experts are trained again"
        self.info: dict[str, Any] = io.read_json(info_path, fix=fix, kind=dict)
        if not isinstance(self.info.get("key"), str):
            raise io.damaged(info_path, "no buffer key", fix)
        self.key: str = self.info["key"]

    def expert_path(self, index: int) -> Path:
        return self.path / f"expert_{index:03d}.safetensors"

    def _fix(self, index: int) -> str:
        return f"delete it; expert {index} is trained again"

    def indices(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("expert_*.safetensors"))

    def metadata(self, index: int) -> dict[str, str]:
        with io.open_tensors(self.expert_path(index), self._fix(index)) as f:
            return f.metadata() or {}

    def layout(self, index: int) -> ParamLayout:
        with io.reading(self.expert_path(index), self._fix(index)):
            return ParamLayout.from_json(self.metadata(index)["layout"])

    def epochs(self, index: int) -> int:
        with io.open_tensors(self.expert_path(index), self._fix(index)) as f:
            return f.get_slice("trajectory").get_shape()[0] - 1

    def segment(self, index: int, start: int, end: int) -> Tensor:
        """Snapshots `start..end` (inclusive) of expert `index`, `[end - start + 1, P]`."""
        with io.open_tensors(self.expert_path(index), self._fix(index)) as f:
            return f.get_slice("trajectory")[start : end + 1]

    def write_expert(
        self, index: int, trajectory: Tensor, layout: ParamLayout, stats: dict[str, Any]
    ) -> None:
        meta = {"layout": layout.to_json(), "key": self.key, "stats": json.dumps(stats)}
        io.save_tensors(self.expert_path(index), {"trajectory": trajectory}, metadata=meta)


def buffer_dir(cache_dir: Path, dataset_name: str, encoder: Encoder, key: str) -> Path:
    return Path(cache_dir).expanduser() / "buffers" / f"{dataset_name}-{encoder.name}-{key}"


@dataclass(frozen=True)
class ExpertSource:
    """Where a run's expert trajectories come from: the real data and encoder they imitate,
    the expert settings and noise node their key covers, the device that trains missing ones
    and the cache that keeps them; plus where that work reports (log lines, progress bars and
    the run's curves)."""

    expert: DictConfig
    encoder: Encoder
    train: RealSplit
    val: RealSplit | None
    dataset: str
    noise: DictConfig
    cache_dir: Path
    device: str
    say: Callable[[str], None] = print
    progress: Any = None
    metrics: Metrics | None = None

    @property
    def settings(self) -> ExpertSettings:
        return ExpertSettings.from_cfg(self.expert)

    def cached(self, key: str, parts: dict[str, Any]) -> Buffer:
        """The cache folder of `key`, created with what the key hashes when it is new."""
        path = buffer_dir(self.cache_dir, self.dataset, self.encoder, key)
        if not (path / "buffer.json").is_file():
            io.write_json(path / "buffer.json", {"key": key, "parts": parts})
        return Buffer(path)

    def named(self, explicit: str, key: str, parts: dict[str, Any]) -> Buffer:
        """The buffer folder the user named; it must carry this run's key."""
        path = Path(explicit).expanduser()
        buf = Buffer(path)
        if buf.key != key:
            raise UserError(
                f"method.buffer={path} was built for {_describe(buf.info.get('parts', {}))} "
                f"(key {buf.key}), but this run needs {_describe(parts)} (key {key}); point "
                "method.buffer at a matching buffer or leave it unset to build one"
            )
        return buf

    @contextlib.contextmanager
    def progress_task(self, label: str, epochs: int) -> Iterator[Callable[[int], None]]:
        """A progress bar for one expert's epochs while it trains: yields its epoch hook."""
        bar = self.progress.add_task(label, total=epochs) if self.progress else None

        def on_epoch(epoch: int) -> None:
            if bar is not None:
                self.progress.update(bar, completed=epoch)

        yield on_epoch
        if bar is not None:
            self.progress.remove_task(bar)

    def buffer(self, explicit: str | None = None, indices: list[int] | None = None) -> Buffer:
        """The buffer matching this data/encoder/expert config, training missing experts first.

        `explicit` is a buffer folder the user named: it must carry this run's key, else the
        error names both. `indices` (default: all `expert.num_experts`) are the experts to
        ensure. Experts trained here write their curves (stream `expert/<i>`) to `metrics`.
        """
        settings = self.settings
        key, parts = buffer_key(self.encoder, self.train, self.dataset, self.noise, settings)
        buf = self.named(explicit, key, parts) if explicit else self.cached(key, parts)
        wanted = list(range(int(self.expert.num_experts))) if indices is None else list(indices)
        if not wanted:
            raise UserError("expert.num_experts must be at least 1")
        missing = [i for i in wanted if not buf.expert_path(i).is_file()]
        if missing:
            self.say(
                f"expert buffer {buf.path}: {len(wanted) - len(missing)}/{len(wanted)} experts "
                f"cached; training {len(missing)} ({settings.epochs} epochs each) first"
            )
        for i in missing:
            curve = expert_curve(self.metrics, f"expert/{i}")
            with self.progress_task(f"expert {i}", settings.epochs) as on_epoch:
                traj, layout, stats = train_expert(
                    self.encoder,
                    self.train,
                    self.val,
                    settings,
                    i,
                    self.device,
                    on_epoch,
                    on_log=curve,
                )
                buf.write_expert(i, traj, layout, stats)
            self.say(f"expert {i}: {_trained(stats)}")
        if not missing:
            self.say(f"using expert buffer {buf.path} ({len(wanted)} experts)")
        return buf


def _trained(stats: dict[str, Any]) -> str:
    """An expert's time (and val r_mean) for its log line."""
    shown = f"{stats['seconds']:.1f}s"
    return shown + (f", val r_mean {stats['val_r_mean']:.2f}" if "val_r_mean" in stats else "")
