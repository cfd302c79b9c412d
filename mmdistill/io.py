"""Atomic file writes (temp file + rename) and the one guarded reader for every kind of file we
load: JSON, YAML, text, images and safetensors. No pickle anywhere.

A reader that fails raises a one-line `UserError` naming the file, what is wrong with it and
the fix the caller supplies ("delete <file>, it will be rebuilt"). torch, safetensors and PIL
are imported on first use, so the CLI's config checks stay fast.

Faults of the file system are classes too: every temp file a writer is filling holds an OS lock
(flock) for as long as it is written, so `remove_stale_partials` can tell a dead writer's
leftover from a live one, and `remove_partials` drops this process's own on an interrupt. A full,
read-only or forbidden destination is one line naming the path and its free space. `confined`
is the one path policy: a path made from a config value, a data row or an artefact stays under
its root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdistill.errors import UserError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

# What a damaged file's message suggests when the caller has nothing more specific.
DEFAULT_FIX = "restore it or delete it"


# Temp files this process is writing (removed on an interrupt) and the OS errors that mean the
# destination itself is at fault, not the data.
_PARTIALS: dict[str, int] = {}
FS_FAULTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
}


def free_space(path: Path) -> str:
    """Free space on the disk holding `path` (or its nearest existing parent), for messages."""
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return f"{shutil.disk_usage(here).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def fs_fault(path: Path, err: OSError) -> UserError | None:
    """The one-line error for a destination that cannot be written, or None for other errors."""
    why = FS_FAULTS.get(err.errno or 0)
    if why is None:
        return None
    return UserError(
        f"cannot write {path}: {why} ({free_space(path)}); free space or point the output "
        "(hydra.run.dir, MMDISTILL_OUTPUTS) or cache (MMDISTILL_CACHE) at a writable disk"
    )


@contextlib.contextmanager
def partial(path: Path) -> Iterator[Path]:
    """A locked, hidden temp file beside `path` (`.<name>.<random>.tmp`), removed unless the
    caller renamed it into place; the lock tells other processes it is alive."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise fs_fault(path, err) or err from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    _PARTIALS[tmp] = fd
    try:
        yield Path(tmp)
    except OSError as err:
        raise fs_fault(path, err) or err from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a no-op once renamed: the name is gone
        _PARTIALS.pop(tmp, None)
        os.close(fd)


def remove_partials() -> None:
    """Delete every temp file this process is still writing (on SIGINT / SIGTERM)."""
    for tmp in list(_PARTIALS):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def remove_stale_partials(folder: Path, recursive: bool = False) -> int:
    """Delete temp files under `folder` whose writer is gone (killed with -9, power loss): a
    live writer holds its file's lock. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in (folder.rglob if recursive else folder.glob)(".*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink()
            removed += 1
        except OSError:
            pass  # locked: a live writer's
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Hold the lock of one shared cache entry (`.<name>.lock` beside it) while it is built, so
    two runs building the same entry do the work once: the second waits, then finds it. The
    lock file goes when released; a waiter that got the lock of a removed file tries again."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise fs_fault(lock, err) or err from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the file at that name: the lock is ours
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    with partial(path) as tmp:
        write(str(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artefacts are meant to be shared
        os.replace(tmp, path)


def confined(root: Path, rel: str | Path, what: str) -> Path:
    """`root / rel`, refused (naming `what`: a config key or a data row) when `rel` is absolute
    or climbs out of `root` with `..`. Lexical, so a dataset of symlinks keeps working."""
    text = str(rel)
    norm = os.path.normpath(text) if text else ""
    if not text or "\0" in text or os.path.isabs(text) or norm == ".." or norm.startswith("../"):
        raise UserError(
            f"{what} {text!r} points outside {root}; give a path relative to that folder"
        )
    return Path(root) / norm


def plain_name(value: object, key: str) -> str:
    """A name that becomes one file or folder name (a dataset name in cache files): no path
    separators, not `.` or `..`, not empty."""
    text = str(value)
    if not text.strip() or text in (".", "..") or any(c in text for c in "/\\\0"):
        raise UserError(
            f"{key}={text!r} is not a plain name (it names files and folders); use letters, "
            "digits, '.', '_' and '-' without '/'"
        )
    return text


def write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, w)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def damaged(path: Path, why: str, fix: str = DEFAULT_FIX) -> UserError:
    """The one-line error for a file that cannot be used."""
    return UserError(f"{path} is damaged ({_one_line(why)}): {fix}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_bytes(path: Path, fix: str = DEFAULT_FIX) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: {fix}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise damaged(path, f"cannot read it: {err.strerror or err}", fix) from None


def read_text(path: Path, fix: str = DEFAULT_FIX, encoding: str = "utf-8") -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are reported with their line number."""
    data = read_bytes(path, fix)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path} line {line} is not UTF-8 text (byte {data[err.start]:#04x}): {fix}"
        ) from None


def read_json(path: Path, fix: str = DEFAULT_FIX, kind: type | None = None) -> Any:
    """Parse a JSON file; `kind` (dict, list) is the top-level type the caller needs."""
    text = read_text(path, fix)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise damaged(path, f"not valid JSON, line {err.lineno}: {err.msg}", fix) from None
    if kind is not None and not isinstance(obj, kind):
        raise damaged(path, f"a JSON {type(obj).__name__}, not a {kind.__name__}", fix)
    return obj


def read_yaml(path: Path, fix: str = DEFAULT_FIX) -> Any:
    import yaml

    text = read_text(path, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise damaged(path, f"not valid YAML: {str(err).splitlines()[0]}", fix) from None


def read_image(source: str | Path | bytes, name: str, fix: str) -> Image.Image:
    """Decode one image (a file or its bytes) fully, as RGB. PIL reports damage in many ways
    (UnidentifiedImageError, OSError "truncated", SyntaxError for broken PNGs, ValueError),
    so every failure of the decode is this image's."""
    import io as stdio

    from PIL import Image, UnidentifiedImageError

    try:
        handle = stdio.BytesIO(source) if isinstance(source, bytes) else str(source)
        with Image.open(handle) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        empty = len(source) == 0 if isinstance(source, bytes) else Path(source).stat().st_size == 0
        why = "an empty file" if empty else "not an image format PIL can read"
    except Exception as err:  # noqa: BLE001 - any decode failure is this file's damage
        why = _one_line(err) or type(err).__name__
    raise UserError(f"image {name} is not a readable image ({why}): {fix}")


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (tensors made contiguous and detached)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(clean, tmp, metadata=metadata)
        except SafetensorError as err:  # its I/O errors carry the OS error only as text
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None

    _atomic(path, write)


def load_tensors(
    path: Path, device: str = "cpu", fix: str = DEFAULT_FIX, need: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; `need` names tensors that must be there."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: {fix}")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise damaged(path, f"not a readable safetensors file: {err}", fix) from None
    missing = [k for k in need if k not in tensors]
    if missing:
        raise damaged(path, f"it has no tensor {', '.join(missing)}", fix)
    return tensors


@contextlib.contextmanager
def open_tensors(path: Path, fix: str = DEFAULT_FIX) -> Iterator[Any]:
    """A lazily read safetensors file (safe_open), its read errors reported as damage."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, KeyError) as err:
        raise damaged(path, f"not a readable safetensors file: {err}", fix) from None


@contextlib.contextmanager
def reading(path: Path, fix: str = DEFAULT_FIX) -> Iterator[None]:
    """Use what was read from `path` (a checkpoint being restored, say): a missing field or a
    value of the wrong type or shape means the file is damaged. `UserError`s pass through."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        why = f"missing {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise damaged(path, why, fix) from None
