"""Decoded-image cache and streaming of real pixels: no split is ever held whole as floats.

Preprocessing a split into one float32 tensor costs 4 bytes per pixel in RAM (Flickr30K and
COCO do not fit) and repeats the decode on every run. Instead every image is decoded and resized
once, by DataLoader workers, into a uint8 `[N, 3, s, s]` file under the cache dir; runs read
rows from it on demand and normalise them per batch, giving the same floats, bit for bit, as the
encoder's per-image transform (`clip_preprocess`).

The file is a 4 KiB header (magic + JSON: format version, content key, shape, a digest of sampled
rows) followed by the rows. Its name holds the split's image fingerprint and the resize rule, so
it is keyed by content like the feature cache; it is written to a locked temp file and renamed,
so a killed build never leaves a file that looks finished (its temp file is removed on an
interrupt, or by the next build once no process holds its lock), and a corrupt file or one from
another format version is rebuilt with one warning line. A build holds the entry's lock, so two
runs that need the same file decode the images once: the second waits and reads it. Rows are
read with positioned reads, not a memory map: mapped pages count toward the process's resident
set, so a run that touches every row of a mapped cache would grow its peak RSS with the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmdistill import io
from mmdistill.data.base import ImageTextSplit
from mmdistill.errors import UserError

log = logging.getLogger(__name__)

# Bumped when the bytes a cache file holds for the same images change.
VERSION = 1
MAGIC = b"MMDIMG\x00\x00"
HEADER_BYTES = 4096
SAMPLED_ROWS = 16  # rows hashed into the header and checked on every open
LOOKUP_CHUNK = 1 << 16  # pixels per table lookup in `PixelRule.normalise`
SMALL_SPLIT = 512  # below this many images, starting workers costs more than decoding
MAX_WORKERS = 8


# ----------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class PixelRule:
    """An encoder's image preprocessing: bicubic resize to `size` x `size`, RGB, x / 255, then
    per channel (x - mean) / std (torchvision's Resize, ToTensor, Normalize). The cache holds the
    output of the first two steps, so it depends on `size` alone."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.size}px-bicubic"

    def resize(self, image: Image.Image) -> np.ndarray:
        """One RGB image (as `ImageTextSplit.images` gives them) as uint8 `[3, s, s]`."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 `[..., 3, s, s]` -> float32, bit for bit what ToTensor + Normalize give.

        On the CPU each value is looked up in a table of the 256 levels per channel, computed
        by those same elementwise operations: one pass instead of four, with the same floats.
        Elsewhere (a GPU) the operations run on the batch itself.
        """
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalise takes uint8 pixels, not {pixels.dtype}")
        if pixels.device.type != "cpu":
            return self._elementwise(pixels)
        src = pixels.contiguous().numpy()
        channels, h, w = src.shape[-3:]
        planes = src.reshape(-1, channels, h * w)
        out = np.empty(planes.shape, dtype=np.float32)
        group = max(1, LOOKUP_CHUNK // (h * w))  # images per lookup, to stay in cache
        for i in range(0, len(planes), group):
            for c in range(channels):
                np.take(self._levels[c], planes[i : i + group, c], out=out[i : i + group, c])
        return torch.from_numpy(out).reshape(src.shape)

    def _elementwise(self, pixels: Tensor) -> Tensor:
        """ToTensor's x / 255, then Normalize's in-place (x - mean) / std."""
        x = pixels.to(torch.float32, copy=True).div_(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    @functools.cached_property
    def _levels(self) -> np.ndarray:
        """float32 `[channels, 256]`: every uint8 level of every channel, normalised."""
        levels = torch.arange(256, dtype=torch.uint8).expand(len(self.mean), 256)
        return self._elementwise(levels[..., None])[..., 0].numpy()


def default_workers(n_images: int, workers: int | str = "auto") -> int:
    """Decoding processes: `auto` is one per usable core (at most 8), none for small splits."""
    if str(workers) != "auto":
        value = int(workers) if str(workers).isdigit() else -1
        if value < 0:
            raise UserError(f"data_workers={workers} must be a number >= 0 or auto")
        return value
    if n_images < SMALL_SPLIT:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(cores or 1, MAX_WORKERS))


# ------------------------------------------------------------------------- decoding


def _as_is(batch: Any) -> Any:
    """collate_fn: the dataset already returns whole batches."""
    return batch


class _Decoded(Dataset):
    """A split's images resized by the rule; a DataLoader worker decodes one batch per call."""

    def __init__(self, split: ImageTextSplit, rule: PixelRule) -> None:
        self.split = split
        self.rule = rule

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(self.rule.resize(self.split.image(i)))

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        images = self.split.images(indices)
        return torch.from_numpy(np.stack([self.rule.resize(im) for im in images]))


def decoded_batches(
    split: ImageTextSplit, rule: PixelRule, batch: int, workers: int
) -> Iterator[Tensor]:
    """uint8 batches of consecutive images, in order, decoded by `workers` processes."""
    loader = DataLoader(
        _Decoded(split, rule), batch_size=batch, num_workers=workers, collate_fn=_as_is
    )
    yield from loader


# ---------------------------------------------------------------------------- the file


def _header(version: int, key: str, shape: Sequence[int], sample: str) -> bytes:
    body = json.dumps(
        {"version": version, "key": key, "shape": list(shape), "dtype": "uint8", "sample": sample}
    ).encode()
    head = MAGIC + struct.pack("<Q", len(body)) + body
    if len(head) > HEADER_BYTES:
        raise ValueError("image cache header too long")
    return head.ljust(HEADER_BYTES, b"\0")


def _sampled_rows(n: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, SAMPLED_ROWS))})


def _read_exact(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], offset + done)
        if got == 0:
            raise EOFError("image cache file ended early")
        done += got


class _Rows:
    """Positioned reads of uint8 rows from an open cache file (safe after fork and in threads)."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path = path
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:]))
        self._file = open(path, "rb")  # closed when the reader is collected

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the order asked (repeats allowed); runs of consecutive rows are one read."""
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        sorted_out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        cuts = np.flatnonzero(np.diff(ranked) != 1) + 1
        fd = self._file.fileno()
        for lo, hi in zip(
            np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]]), strict=True
        ):
            view = memoryview(sorted_out[lo:hi]).cast("B")
            _read_exact(fd, view, HEADER_BYTES + int(ranked[lo]) * self.row_bytes)
        out = np.empty_like(sorted_out)
        out[order] = sorted_out
        return out.reshape(len(rows), *self.shape[1:])

    def close(self) -> None:
        self._file.close()


def _digest(rows: _Rows, n: int) -> str:
    return hashlib.sha1(rows.read(np.asarray(_sampled_rows(n))).tobytes()).hexdigest()[:16]


class ImageCache:
    """One split's decoded images on disk, found by content, built when missing or unusable."""

    def __init__(
        self,
        split: ImageTextSplit,
        rule: PixelRule,
        cache_dir: Path,
        dataset_name: str,
        workers: int | str = "auto",
    ) -> None:
        self.split = split
        self.rule = rule
        self.shape = (split.n_images, 3, rule.size, rule.size)
        self.key = f"{split.image_fingerprint}-{rule.key}"
        folder = Path(cache_dir).expanduser() / "images"
        self.path = folder / f"{dataset_name}-{split.name}-{self.key}.u8"
        self.workers = default_workers(split.n_images, workers)

    def problem(self) -> str | None:
        """Why the file on disk cannot be used ('missing' when there is none), or None."""
        if not self.path.is_file():
            return "missing"
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
                return "corrupt (no image-cache header)"
            (length,) = struct.unpack("<Q", head[len(MAGIC) : len(MAGIC) + 8])
            info = json.loads(head[len(MAGIC) + 8 : len(MAGIC) + 8 + length])
            if not isinstance(info, dict):
                return "corrupt (its header is not a record)"
            if info.get("version") != VERSION:
                return f"from format version {info.get('version')} (this mmdistill reads {VERSION})"
            if info.get("key") != self.key or tuple(info.get("shape", ())) != self.shape:
                return "corrupt (its header describes other images)"
            row_bytes = int(np.prod(self.shape[1:]))
            if self.path.stat().st_size != HEADER_BYTES + self.shape[0] * row_bytes:
                return "corrupt (wrong length)"
            rows = _Rows(self.path, self.shape)
            try:
                if _digest(rows, self.shape[0]) != info.get("sample"):
                    return "corrupt (sampled rows do not match their digest)"
            finally:
                rows.close()
        except (OSError, ValueError, TypeError, EOFError) as err:  # JSON errors are ValueErrors
            return f"corrupt ({type(err).__name__})"
        return None

    def _remove_stale_builds(self) -> None:
        """Temp files of builds that were killed (no process holds their lock); they may be as
        large as the cache itself."""
        io.remove_stale_partials(self.path.parent)

    def _check_space(self) -> None:
        need = HEADER_BYTES + int(np.prod(self.shape))
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            raise UserError(
                f"the image cache of split {self.split.name!r} needs {need / 2**30:.1f} GiB but "
                f"{self.path.parent} has {free / 2**30:.1f} GiB free; point MMDISTILL_CACHE "
                "(paths.cache_dir) at a larger disk"
            )

    def batches(
        self, batch: int, on_batch: Callable[[int], None] | None = None
    ) -> Iterator[Tensor]:
        """uint8 batches of consecutive images from the start: read from the file, or decoded
        (and written) while the caller consumes them when the file is missing or unusable."""
        if self.problem() is None:
            yield from self._stored(batch, on_batch)
            return
        with io.entry_lock(self.path):  # another run may be building it: wait, then read it
            problem = self.problem()
            if problem is None:
                yield from self._stored(batch, on_batch)
            else:
                yield from self._build(problem, batch, on_batch)

    def _stored(self, batch: int, on_batch: Callable[[int], None] | None) -> Iterator[Tensor]:
        store = self.store()
        for s in range(0, len(store), batch):
            chunk = store.pixels(slice(s, s + batch))
            if on_batch:
                on_batch(len(chunk))
            yield chunk

    def build(self, on_batch: Callable[[int], None] | None = None, batch: int = 64) -> None:
        """Make sure a usable file exists, decoding every image when it does not."""
        if self.problem() is not None:
            for _ in self.batches(batch, on_batch):
                pass

    def _build(
        self, problem: str, batch: int, on_batch: Callable[[int], None] | None
    ) -> Iterator[Tensor]:
        if problem != "missing":
            log.warning("image cache %s is %s; rebuilding it", self.path, problem)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_builds()
        self._check_space()
        with io.partial(self.path) as tmp, open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            written = 0
            for chunk in decoded_batches(self.split, self.rule, batch, self.workers):
                f.write(np.ascontiguousarray(chunk.numpy()).data)
                written += len(chunk)
                if on_batch:
                    on_batch(len(chunk))
                yield chunk
            if written != self.shape[0]:
                raise RuntimeError(f"decoded {written} of {self.shape[0]} images")
            f.flush()
            rows = _Rows(tmp, self.shape)
            try:
                sample = _digest(rows, self.shape[0])
            finally:
                rows.close()
            f.seek(0)
            f.write(_header(VERSION, self.key, self.shape, sample))
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)

    def store(self) -> PixelStore:
        """The split's pixels, read from the file (which must be usable: see `build`)."""
        return PixelStore(self.path, self.shape, self.rule)


# ---------------------------------------------------------------------------- the store


class PixelStore:
    """A split's pixels as the encoder's students read them, fetched from the image cache by row.

    Indexing (an int, a slice, or index tensors / arrays / lists) returns normalised float32
    `[..., 3, s, s]` equal, bit for bit, to the encoder's per-image transform; `len`, `shape`,
    `dtype`, `dim()` and `is_floating_point()` answer as the whole split's tensor would, so code
    written for an in-memory pixel tensor reads it unchanged without holding the split.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], rule: PixelRule) -> None:
        self.path = Path(path)
        self.rule = rule
        self._shape = tuple(shape)
        self._rows = _Rows(self.path, self._shape)

    def __reduce__(self) -> tuple[type, tuple[Path, tuple[int, ...], PixelRule]]:
        return PixelStore, (self.path, self._shape, self.rule)  # reopened by path, not copied

    def __len__(self) -> int:
        return self._shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def dim(self) -> int:
        return len(self._shape)

    def is_floating_point(self) -> bool:
        return True

    def _rows_of(self, key: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        """Row numbers for an index, and the leading shape of the result."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n)[key], (len(range(n)[key]),)
        if isinstance(key, Tensor):
            if key.dtype == torch.bool or key.is_floating_point():
                raise TypeError(f"PixelStore takes integer indices, not {key.dtype}")
            arr = key.detach().cpu().numpy()
        elif isinstance(key, int | np.integer | list | tuple | np.ndarray):
            arr = np.asarray(key)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"PixelStore takes integer indices, not {arr.dtype}")
        else:
            raise TypeError(f"PixelStore cannot be indexed by {type(key).__name__}")
        flat = arr.astype(np.int64).reshape(-1)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for a split of {n} images")
        return np.where(flat < 0, flat + n, flat), arr.shape

    def pixels(self, key: Any) -> Tensor:
        """The uint8 rows of an index, `[..., 3, s, s]`, before normalisation."""
        rows, lead = self._rows_of(key)
        return torch.from_numpy(self._rows.read(rows)).reshape(*lead, *self._shape[1:])

    def __getitem__(self, key: Any) -> Tensor:
        return self.rule.normalise(self.pixels(key))


# --------------------------------------------------------------------- training batches


def augment(pixels: Tensor, gen: torch.Generator) -> Tensor:
    """The papers' train augmentation of real images, per image: RandomResizedCrop (scale
    0.5-1, bicubic) back to the same size, horizontal flip, RandAugment. uint8 in and out.

    torchvision draws from the global generator, so one seed is drawn from `gen` and the global
    state is forked around the transforms: the result depends on `gen` alone and the caller's
    own draws do not move.
    """
    from torchvision.transforms import v2

    size = pixels.shape[-1]
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(),
        ]
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in pixels])


@dataclass(frozen=True)
class _Request:
    """One batch a worker reads: row numbers, and the seed of its augmentation (None: off)."""

    rows: Tensor
    seed: int | None


class _StoreBatches(Dataset):
    """Rows of a PixelStore by batch: a worker reads (and augments) one uint8 batch per call."""

    def __init__(self, store: PixelStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> Tensor:
        return self.store.pixels(i)

    def __getitems__(self, request: _Request) -> Tensor:
        pixels = self.store.pixels(request.rows)
        if request.seed is not None:
            pixels = augment(pixels, torch.Generator().manual_seed(request.seed))
        return pixels


class _Requests(Sampler):
    """Batch sampler: the given index batches, each with an augmentation seed drawn in order
    from one generator, so the pixels do not depend on the number of workers."""

    def __init__(self, batches: Iterable[Tensor], augment_seed: int | None) -> None:
        self.batches = batches
        self.augment_seed = augment_seed

    def __iter__(self) -> Iterator[_Request]:
        gen = None
        if self.augment_seed is not None:
            gen = torch.Generator().manual_seed(self.augment_seed)
        for rows in self.batches:
            seed = None if gen is None else int(torch.randint(0, 2**62, (1,), generator=gen))
            yield _Request(rows, seed)


def pixel_loader(
    store: PixelStore,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    workers: int | str = "auto",
    augment_seed: int | None = None,
) -> Iterator[Tensor]:
    """Normalised float32 pixel batches of `store` for the given row-index batches, in order.

    Workers read (and, with `augment_seed`, augment) uint8 rows; the batch travels pinned when
    the device is CUDA, is copied `non_blocking`, and is normalised on the device. On CPU the
    result equals `store[rows]` bit for bit when augmentation is off.
    """
    device = torch.device(device)
    loader = DataLoader(
        _StoreBatches(store),
        batch_sampler=_Requests(batches, augment_seed),
        num_workers=default_workers(len(store), workers),
        collate_fn=_as_is,
        pin_memory=device.type == "cuda",
    )
    for pixels in loader:
        yield store.rule.normalise(pixels.to(device, non_blocking=True))
