"""The CLI end to end on tiny settings: run folder contents, errors, resume, installed configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmdistill import io
from mmdistill.training.pairs import PairSet

REPO = Path(__file__).resolve().parents[1]
# Small shapes data, short students and random pairs: the runner's code path in seconds (the
# default method, CovMatch, is tested in test_covmatch.py and test_report.py).
FAST = [
    "dataset.split_sizes=[60,20,30]",
    "eval.students=2",
    "eval.steps=20",
    "budget.pairs=20",
    "device=cpu",
    "threads=1",
    "method=random",
]


def mmdistill(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_distill_writes_a_complete_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = mmdistill("distill", *FAST, f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr
    for name in (
        "meta.json",
        "distilled.safetensors",
        "distilled.json",
        "results.json",
        "recall.md",
        "done",
        ".hydra/config.yaml",
        "metrics.jsonl",
        "report.html",
    ):
        assert (run / name).exists(), name
    res = io.read_json(run / "results.json")
    assert len(res["students"]) == 2
    assert set(res["summary"]) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean"}
    assert 0 <= res["summary"]["r_mean"]["mean"] <= 100
    meta = io.read_json(run / "meta.json")
    assert meta["status"] == "done" and meta["git"]["sha"] and "torch" in meta["versions"]
    assert len(PairSet.load(run / "distilled")) == 20
    assert "r_mean" in p.stderr and str(run) in p.stderr.replace("\n", "")


def test_unknown_choice_is_one_line_naming_the_choices() -> None:
    p = mmdistill("distill", "method=nope")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown method 'nope'" in lines[0] and "random" in lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget.pairs=100000", "larger than the training set"),
        ("dataset=flickr8k", "flickr8k"),
        ("device=tpu", "unknown device"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, override: str, message: str) -> None:
    env = {"MMDISTILL_FLICKR8K": str(tmp_path / "missing")}
    p = mmdistill("distill", *FAST, override, f"hydra.run.dir={tmp_path / 'r'}", env=env)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, p.stderr


def test_resume_keeps_the_distilled_set_and_finished_students(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert mmdistill("distill", *FAST, f"hydra.run.dir={run}").returncode == 0
    students = io.read_json(run / "students.json")
    # Simulate a run killed after its first student.
    io.write_json(run / "students.json", students[:1])
    (run / "done").unlink()
    (run / "results.json").unlink()
    stamp = (run / "distilled.safetensors").stat().st_mtime_ns
    p = mmdistill("distill", f"resume={run}")
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout  # a log line; stderr is kept for what went wrong
    assert (run / "distilled.safetensors").stat().st_mtime_ns == stamp
    res = io.read_json(run / "results.json")
    assert res["students"][0] == students[0] and len(res["students"]) == 2
    assert io.read_json(run / "meta.json")["resumed"] == 1


def test_done_run_is_skipped_and_foreign_run_format_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert mmdistill("distill", *FAST, f"hydra.run.dir={run}").returncode == 0
    p = mmdistill("distill", *FAST, f"hydra.run.dir={run}")
    assert p.returncode == 0 and "already done" in p.stderr
    meta = io.read_json(run / "meta.json")
    meta["format"] = 999
    io.write_json(run / "meta.json", meta)
    (run / "done").unlink()
    p = mmdistill("distill", f"resume={run}")
    assert p.returncode == 2 and "another mmdistill version" in p.stderr
    assert (run / "distilled.safetensors").is_file()  # nothing lost


def test_evaluate_rescores_a_saved_set(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert mmdistill("distill", *FAST, f"hydra.run.dir={src}").returncode == 0
    out = tmp_path / "eval"
    keep = [a for a in FAST if not a.startswith(("budget.", "eval.students", "method="))]
    p = mmdistill("evaluate", f"source={src}", *keep, "eval.students=1", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert len(io.read_json(out / "results.json")["students"]) == 1
    p = mmdistill("evaluate", f"source={tmp_path}", f"hydra.run.dir={tmp_path / 'x'}")
    assert p.returncode == 2 and "no distilled.safetensors" in p.stderr


def test_cfg_job_and_help() -> None:
    p = mmdistill("distill", "method=random", "--cfg", "job")
    assert p.returncode == 0 and "budget:" in p.stdout and "method:" in p.stdout
    p = mmdistill("distill", "--help")
    assert p.returncode == 0 and "method" in p.stdout
    p = mmdistill()
    assert p.returncode == 0 and "distill" in p.stdout


def test_wheel_ships_the_configs(tmp_path: Path) -> None:
    """A non-editable install must find conf/ inside the package."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0 and "hatchling" in p.stderr:
        pytest.skip("hatchling not installed (pip install -e '.[dev]')")
    assert p.returncode == 0, p.stderr
    wheel = next(tmp_path.glob("mmdistill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmdistill/conf/distill.yaml" in names
    assert "mmdistill/models/model_configs/mmd-tiny.json" in names
    # the submitit launchers, in Hydra's plugin namespace, which stays a namespace package
    assert "hydra_plugins/mmdistill_launchers/submitit.py" in names
    assert "hydra_plugins/__init__.py" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from mmdistill.config import conf_dir; print(conf_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "mmdistill" / "conf"
    compose = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert compose.returncode == 0 and "budget" in compose.stdout, compose.stderr
    json.dumps(names)  # the listing is plain data
