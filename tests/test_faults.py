"""Faults by class: signals, a second process, shared cache entries, paths that escape their
root, file systems that cannot be written, and artefacts edited by hand.

Signals go to a real `mmdistill distill` process at each stage (image cache build, distillation,
students), the way a terminal's Ctrl-C (the whole process group) or a scheduler's SIGTERM (the
process alone) sends them; each case checks the one line, the exit status, meta.json, that no
temp file is left and that the run resumes. The rest runs in this process where it can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmdistill import io, relaunch, runs
from mmdistill.cli import main
from mmdistill.errors import UserError
from mmdistill.report import share
from mmdistill.training import features
from mmdistill.training.pairs import PairSet

REPO = Path(__file__).resolve().parents[1]
FAST = ["dataset.split_sizes=[40,10,20]", "budget.pairs=10", "device=cpu", "threads=1"]
STUDENTS = ["eval.students=2", "eval.steps=10"]
# CovMatch for a few checkpointed steps: long enough to be interrupted between checkpoints.
DISTILL = ["method.steps=40", "method.reset_every=10", "method.checkpoint_every=20"]
DISTILL += ["method.log_every=5"]


def launch(run: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`mmdistill distill` in its own session (so a group signal reaches it and its workers)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmdistill.cli", "distill", *FAST, *args, f"hydra.run.dir={run}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 240) -> None:
    deadline = time.time() + limit
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached {what}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)


def stopped(proc: subprocess.Popen, sig: int, group: bool) -> str:
    """Send `sig` (to the group, as a terminal does, or to the process) and its one line."""
    (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def meta(run: Path) -> dict:
    return json.loads((run / "meta.json").read_text())


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob(".*.tmp")]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def resume(run: Path, env: dict | None = None) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", f"resume={run}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert p.returncode == 0, p.stderr
    assert (run / "done").is_file() and meta(run)["status"] == "done"


# ------------------------------------------------------------------------------ signals


def test_ctrl_c_during_the_image_cache_build(tmp_path: Path) -> None:
    """The group's SIGINT while images are decoded: the partial cache file goes, resume works."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    env = {"MMDISTILL_CACHE": str(cache)}
    args = ["dataset.split_sizes=[3000,20,20]", "data_workers=0", "method=random", *STUDENTS]
    proc = launch(run, *args, env=env)
    wait_for(proc, lambda: bool(temp_files(cache)), "the image cache build")
    line = stopped(proc, signal.SIGINT, group=True)
    assert line == f"interrupted at data; resume with resume={run}"
    assert meta(run)["status"] == "interrupted" and meta(run)["signal"] == "SIGINT"
    assert not temp_files(cache, run)
    resume(run, env)


def test_sigterm_during_distillation_resumes_byte_identical(tmp_path: Path) -> None:
    straight, run = tmp_path / "straight", tmp_path / "run"
    proc = launch(run, *DISTILL, *STUDENTS)

    def past_a_checkpoint() -> bool:
        log = run / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        steps = [json.loads(x)["step"] for x in lines[:-1] if '"method"' in x]
        return bool(steps) and max(steps) >= 25

    wait_for(proc, past_a_checkpoint, "distillation step 25")
    line = stopped(proc, signal.SIGTERM, group=False)
    assert line.startswith("interrupted at distill, method step ") and f"resume={run}" in line
    assert meta(run)["status"] == "interrupted" and not temp_files(run)
    assert not (run / "distilled.safetensors").exists()
    resume(run)
    assert launch(straight, *DISTILL, *STUDENTS).wait() == 0
    for name in ("distilled.safetensors", "students.json"):
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(("sig", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_during_the_students_stops_their_workers(
    tmp_path: Path, sig: int, group: bool
) -> None:
    run = tmp_path / "run"
    proc = launch(run, "method=random", "eval.students=4", "eval.workers=2", "eval.steps=100000")
    wait_for(proc, lambda: len(children(proc.pid)) >= 2, "the students")
    workers = children(proc.pid)
    line = stopped(proc, sig, group)
    assert line == f"interrupted at evaluate, 0 student(s) finished; resume with resume={run}"
    assert meta(run)["status"] == "interrupted" and meta(run)["signal"] == signal.Signals(sig).name
    deadline = time.time() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "student workers outlived the interrupt"


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    argv = list(sys.argv)
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_ctrl_c_in_a_folder_verb_is_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mmdistill.report import tables

    monkeypatch.setattr(tables, "collect", lambda *a: signal.raise_signal(signal.SIGINT))
    code, err = run_cli(capsys, "table", str(tmp_path))
    assert code == 130
    one_line(code, err, "interrupted during `table`")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_leftovers_of_a_killed_writer_go_and_live_ones_stay(tmp_path: Path) -> None:
    """kill -9 leaves temp files; the next start removes those no live writer holds."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dead = [run / ".meta.json.x1.tmp", run / "checkpoints" / ".covmatch.safetensors.x2.tmp"]
    for p in dead:
        p.write_bytes(b"half")
    with io.partial(run / "results.json") as live:
        runs.Run(run, "distill", "cpu", 0)
        assert live.exists()
    assert not any(p.exists() for p in dead) and not temp_files(run)


# ------------------------------------------------------------------------------ concurrency


def test_a_second_process_in_a_run_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = launch(run, "method=random", "eval.students=2", "eval.steps=100000")
    try:
        lock = run / relaunch.LOCK
        wait_for(first, lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "")
        second = subprocess.run(
            [sys.executable, "-m", "mmdistill.cli", "distill", *FAST, "method=random"]
            + ["eval.students=2", "eval.steps=100000", f"hydra.run.dir={run}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        one_line(second.returncode, second.stderr, f"pid {first.pid}", str(run))
        assert second.returncode == 2 and meta(run)["status"] == "running"  # not marked failed
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)


def test_the_run_folder_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with relaunch.held(tmp_path):
        with pytest.raises(relaunch.FolderBusy, match=f"pid {os.getpid()}"):
            with relaunch.held(tmp_path):
                pass
    with relaunch.held(tmp_path):  # released when the block (or the process) ends
        pass


def test_two_builders_of_one_cache_entry_compute_it_once(tmp_path: Path) -> None:
    calls, out = [], []
    path = tmp_path / "shapes-train-x-image-y.safetensors"

    def compute() -> torch.Tensor:
        calls.append(1)
        time.sleep(0.3)  # the other builder arrives meanwhile
        return torch.ones(4, 3)

    threads = [
        threading.Thread(target=lambda: out.append(features._cached(path, compute, 4)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 2 and all(torch.equal(x, out[0]) for x in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no lock or temp file


def test_two_builders_of_one_image_cache_decode_once(tmp_path: Path, monkeypatch) -> None:
    from mmdistill.config import compose
    from mmdistill.data import images
    from mmdistill.data.shapes import read_shapes
    from mmdistill.models.encoders import CLIP_MEAN, CLIP_STD

    split = read_shapes(compose("distill", ["dataset.split_sizes=[12,2,2]"]).dataset).train
    decoded = images.decoded_batches
    calls = []

    def counted(*a, **k):
        calls.append(1)
        time.sleep(0.3)
        yield from decoded(*a, **k)

    monkeypatch.setattr(images, "decoded_batches", counted)
    rule = images.PixelRule(16, CLIP_MEAN, CLIP_STD)
    caches = [images.ImageCache(split, rule, tmp_path, "s") for _ in "ab"]
    threads = [threading.Thread(target=c.build) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(c.problem() is None for c in caches)


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["hydra.run.dir="], ["hydra.run.dir is empty"]),
        (["hydra.run.dir=''"], ["hydra.run.dir is empty"]),
        (["dataset.name=../../x"], ["dataset.name='../../x' is not a plain name"]),
        (["dataset.name=a/b"], ["dataset.name='a/b'"]),
        (["run_name=../../../x"], ["run_name '../../../x' points outside"]),
        (["-m", "seed=0,1", "hydra.sweep.subdir=../../x"], ["hydra.sweep.subdir '../../x'"]),
        (["-m", "seed=0,1", "hydra.sweep.subdir=/abs"], ["hydra.sweep.subdir '/abs'"]),
    ],
)
def test_a_path_setting_that_escapes_is_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch, args: list[str], needles
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "distill", *FAST, "method=random", *args)
    one_line(code, err, *needles)
    assert code == 2 and not list(tmp_path.iterdir())  # nothing was written anywhere


def flickr_folder(root: Path, image: str) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{i}.png")
    Image.new("RGB", (8, 8)).save(root / "outside.jpg")
    rows = [f"{i}.png,a caption {i}" for i in range(3)] + [f"{image},a sneaky caption"]
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("image", ["../outside.jpg", "/etc/hostname", "images/../../outside.jpg"])
def test_a_caption_row_outside_the_image_folder_is_refused(tmp_path: Path, image: str) -> None:
    from omegaconf import OmegaConf

    from mmdistill.data.readers import read_flickr8k

    root = flickr_folder(tmp_path / "f8k", image)
    cfg = OmegaConf.create({"root": str(root), "split_sizes": [2, 1, 1]})
    with pytest.raises(UserError, match=r"captions.txt line 5 image .* points outside"):
        read_flickr8k(cfg)
    cfg.captions_file = "../elsewhere.txt"
    with pytest.raises(UserError, match="dataset.captions_file '../elsewhere.txt'"):
        read_flickr8k(cfg)


# ------------------------------------------------------------------------------ file systems


@pytest.mark.parametrize("env", ["MMDISTILL_CACHE", "MMDISTILL_OUTPUTS"])
def test_an_env_folder_that_is_a_file_is_refused_first(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch, env: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(env, str(blocker))
    code, err = run_cli(capsys, "distill", *FAST, "method=random")
    one_line(code, err, f"{blocker} is a file, not a folder")
    monkeypatch.setenv(env, "")
    key = {"MMDISTILL_CACHE": "paths.cache_dir", "MMDISTILL_OUTPUTS": "paths.output_dir"}[env]
    one_line(*run_cli(capsys, "distill", *FAST, "method=random"), f"{key}=''")


def mounted(where: Path, *options: str) -> bool:
    """Mount a tmpfs at `where`; False where this machine does not let us."""
    where.mkdir()
    try:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", *options, "tmpfs", str(where)], capture_output=True
        )
    except OSError:  # no mount(8)
        return False
    return p.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only); skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not mounted(disk, "-o", "size=1m"):
        pytest.skip("needs root and tmpfs mounts to make a small or read-only disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Write a file until the disk is full."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_is_one_line_naming_the_file_and_free_space(small_disk: Path) -> None:
    fill(small_disk)
    with pytest.raises(UserError, match="disk is full") as err:
        io.save_tensors(small_disk / "run" / "x.safetensors", {"x": torch.zeros(1 << 16)})
    assert str(small_disk / "run" / "x.safetensors") in str(err.value) and "MiB free" in str(
        err.value
    )
    assert not temp_files(small_disk)


def test_a_run_into_a_full_disk_is_one_line(
    capsys: pytest.CaptureFixture, small_disk: Path
) -> None:
    fill(small_disk)
    code, err = run_cli(capsys, "distill", *FAST, "method=random", f"hydra.run.dir={small_disk}/r")
    one_line(code, err, "disk is full", "MiB free", str(small_disk / "r"))


def test_a_run_into_a_read_only_folder_is_refused_first(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    disk = tmp_path / "ro"
    if os.geteuid() != 0 or not mounted(disk, "-o", "ro,size=1m"):
        pytest.skip("needs root and tmpfs mounts to make a read-only disk")
    try:
        code, err = run_cli(capsys, "distill", *FAST, "method=random", f"hydra.run.dir={disk}/s")
        one_line(code, err, f"hydra.run.dir={disk}/s", "read-only", "MiB free")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------ artefacts


def saved_set(folder: Path, **meta: object) -> Path:
    pairs = PairSet(images=torch.rand(4, 3, 8, 8), texts=torch.randint(0, 50, (4, 6)))
    pairs.meta.update({"method": "random", "dataset": "shapes", **meta})
    folder.mkdir(parents=True, exist_ok=True)
    pairs.save(folder / "distilled")
    return folder


def retyped(folder: Path, name: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "distilled.safetensors"
    tensors = load_file(str(path))
    tensors[name] = value
    save_file(tensors, str(path))


def test_an_unknown_method_label_is_refused_not_scored(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="names method 'my_secret_method'"):
        share.read_set(saved_set(tmp_path, method="my_secret_method"))
    with pytest.raises(UserError, match="dataset label '../x'"):
        share.read_set(saved_set(tmp_path / "b", dataset="../x"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_other_float_widths_are_read_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = saved_set(tmp_path)
    retyped(folder, "images", torch.rand(4, 3, 8, 8).to(dtype))
    retyped(folder, "texts", torch.randint(0, 50, (4, 6), dtype=torch.int32))
    pairs = share.read_set(folder)
    assert pairs.images.dtype == torch.float32 and pairs.texts.dtype == torch.int64


def test_a_float64_image_beyond_float32_or_a_bool_text_is_refused(tmp_path: Path) -> None:
    folder = saved_set(tmp_path)
    retyped(folder, "images", torch.full((4, 3, 8, 8), 1e300, dtype=torch.float64))
    with pytest.raises(UserError, match="not finite"):
        share.read_set(folder)
    folder = saved_set(tmp_path / "b")
    retyped(folder, "texts", torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(UserError, match="texts are bool"):
        share.read_set(folder)


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    from mmdistill.config import compose
    from mmdistill.jobs import _check_tokens
    from mmdistill.models.factory import build_encoder

    encoder = build_encoder(compose("distill").encoder)
    _check_tokens(torch.zeros(2, 5, dtype=torch.long), encoder)
    with pytest.raises(UserError, match="vocabulary has 49408 tokens"):
        _check_tokens(torch.full((2, 5), 10**6, dtype=torch.long), encoder)


def results(folder: Path, seed: int = 0, recall: float = 50.0) -> Path:
    metrics = {m: recall for m in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean")}
    data = {"verb": "distill", "method": "random", "pairs": 10, "dataset": "shapes"}
    data.update(encoder="tiny", seed=seed, budget={"pairs": 10}, students=[metrics])
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(data))
    return folder / "results.json"


@pytest.mark.parametrize("recall", [-3.0, 100.5, float("nan"), float("inf")])
def test_table_never_publishes_an_impossible_recall(
    capsys: pytest.CaptureFixture, tmp_path: Path, recall: float
) -> None:
    bad = results(tmp_path / "bad", recall=recall)
    one_line(*run_cli(capsys, "table", str(tmp_path)), "no readable results.json", str(bad))
    results(tmp_path / "good", seed=1)
    code, err = run_cli(capsys, "table", str(tmp_path))
    assert code == 0 and any(line.startswith(f"skipped {bad}") for line in err.splitlines())
    assert "nan" not in (tmp_path / "table.md").read_text().lower()


def test_a_seed_twice_is_refused_naming_both_files(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    one_line(*run_cli(capsys, "table", str(tmp_path)), str(a), str(b), "seed 0")
    assert not (tmp_path / "table.md").exists()


def test_report_refuses_a_folder_without_runs(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    one_line(*run_cli(capsys, "report", str(tmp_path)), "no runs here")
    assert not list(tmp_path.iterdir())


def test_a_destination_that_is_a_run_artefact_or_a_file_is_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    res = results(tmp_path / "a")
    before = res.read_bytes()
    table = ("table", str(tmp_path), "--into", str(res))
    one_line(*run_cli(capsys, *table), "not a Markdown document")
    one_line(*run_cli(capsys, "report", str(tmp_path), "--out", str(res)), "not an .html page")
    export = ("export", str(tmp_path / "a"), "--out", str(res))
    one_line(*run_cli(capsys, *export), f"{res} is a file, not a folder")
    one_line(*run_cli(capsys, "table", str(tmp_path), "--out", str(res)), "is a file")
    assert res.read_bytes() == before and sorted(p.name for p in tmp_path.rglob("*")) == [
        "a",
        "results.json",
    ]
