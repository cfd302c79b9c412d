"""Shared fixtures: an isolated cache/output dir per test session, and the real-data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def flickr8k_root() -> Path:
    env = os.environ.get("MMDISTILL_FLICKR8K")
    return Path(env) if env else REPO.parent / "shared" / "data" / "flickr8k-1k"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared flickr8k-1k benchmark data; tests using it skip where it is absent."""
    root = flickr8k_root()
    if not (root / "captions.txt").is_file():
        why = f"real data not found at {root} (set MMDISTILL_FLICKR8K)"
        if os.environ.get("MMDISTILL_REQUIRE_REAL_DATA") == "1":  # CI: missing data is a failure
            pytest.fail(why)
        pytest.skip(why)
    return root


@pytest.fixture(autouse=True, scope="session")
def _isolated_outputs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs write to a temp folder, and the session has a cache of its own (features, expert
    buffers, detection scores), shared across its tests: a persistent cache could feed them
    artefacts made by older code."""
    os.environ["MMDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["MMDISTILL_OUTPUTS"] = str(tmp_path_factory.mktemp("outputs"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-data tests first: they are the longest file, so with pytest-xdist handing out
    whole files in collection order (scripts/test.sh) one worker starts them at once while the
    others share the rest."""
    items.sort(key=lambda item: item.path.name != "test_real_data.py")


@pytest.fixture(autouse=True, scope="session")
def _threads_per_worker() -> None:
    """Parallel test workers (pytest-xdist) share the cores instead of each taking all."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def one_thread():
    """One torch thread for small workloads: faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
