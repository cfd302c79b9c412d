"""The front door: mmdistill.load / mmdistill.run (their docstring examples run here),
`python -m mmdistill`, --version, per-verb --help, pipe-safe output and tab completion."""

from __future__ import annotations

import doctest
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmdistill
from mmdistill import api
from mmdistill.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, doctest.DocTest]:
    out = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        mp.setenv("MMDISTILL_OUTPUTS", str(out / "outputs"))
        mp.setenv("MMDISTILL_CACHE", str(out / "cache"))
        tests = {t.name.rsplit(".", 1)[-1]: t for t in doctest.DocTestFinder().find(api)}
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)  # log lines vary
        runner.run(tests["run"], clear_globs=False)  # makes `folder`, which load's reads
        tests["load"].globs["folder"] = tests["run"].globs["folder"]
        runner.run(tests["load"], clear_globs=False)
        assert runner.failures == 0 and runner.tries >= 8, runner.summarize()
    return tests


def test_docstring_examples_run(examples: dict[str, doctest.DocTest]) -> None:
    folder = examples["run"].globs["folder"]
    assert (folder / "done").is_file() and folder.is_relative_to(folder.parents[3])


def test_load_reads_a_run_and_its_hf_export_alike(
    examples: dict[str, doctest.DocTest], tmp_path: Path
) -> None:
    folder = examples["run"].globs["folder"]
    run_set = mmdistill.load(folder)
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill", "export", str(folder), "--format", "hf",
         "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    hf_set = mmdistill.load(tmp_path / "hf")
    assert len(hf_set) == len(run_set) == 10 and hf_set.encoder == run_set.encoder == "tiny"
    for i in (0, 9):
        for a, b in zip(run_set[i], hf_set[i], strict=True):
            assert torch.equal(a, b)
    assert run_set.encoder_config["name"] == "tiny" and "DistilledSet(10 pairs" in repr(run_set)
    assert run_set.to_pair_set().texts.shape[0] == 10


def test_load_and_run_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        mmdistill.load(tmp_path / "missing")
    with pytest.raises(UserError, match="no distilled.safetensors"):
        mmdistill.load(tmp_path)
    with pytest.raises(UserError, match=r"mmdistill distill failed \(exit 2\)"):
        mmdistill.run("distill", ["method=nope"])
    with pytest.raises(UserError, match="ran no job"):
        mmdistill.run("distill", [], "--help")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill", *args], capture_output=True, text=True, cwd=REPO
    )


def test_python_m_version_and_help() -> None:
    p = cli("--version")
    assert p.returncode == 0 and p.stdout == f"mmdistill {mmdistill.__version__}\n"
    p = cli("--help")
    assert p.returncode == 0 and "job verbs" in p.stdout and "export" in p.stdout
    p = cli("distill", "--help")
    assert p.returncode == 0
    assert "method     *covmatch" in p.stdout and "budget.pairs=100" in p.stdout
    assert "device=auto                   auto | cpu | cuda" in p.stdout
    assert "method.steps=" in p.stdout and "eval.students=5" in p.stdout
    p = cli("nope")
    assert p.returncode == 2 and p.stderr.startswith("error: unknown verb 'nope'")


def test_help_piped_to_head_ends_quietly() -> None:
    for verb in ("distill", "train", "table"):
        p = subprocess.run(
            f"{sys.executable} -m mmdistill {verb} --help | head -1",
            shell=True, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert p.returncode == 0 and p.stdout.startswith("usage: mmdistill"), p
        assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_tab_completion_completes_verbs_groups_and_keys(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mmdistill").write_text(f'#!/bin/sh\nexec {sys.executable} -m mmdistill "$@"\n')
    (bin_dir / "mmdistill").chmod(0o755)
    script = cli("-sc", "install=bash").stdout
    assert "complete -o nospace -o default -F _mmdistill_complete mmdistill" in script
    assert "mmdistill-distill" not in script
    probe = (
        script
        + """
t() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
      COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _mmdistill_complete; echo "${COMPREPLY[*]}"; }
t "mmdistill di"; t "mmdistill distill method=covmatch_i"; t "mmdistill train budg"
t "mmdistill distill encoder=lite0"
"""
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    lines = p.stdout.splitlines()
    assert lines[:2] == ["distill", "method=covmatch_int8"], p
    assert "budget" not in lines[2]  # train has no budget
    assert lines[3] == "encoder=lite0_minilm"
    assert cli("-sc", "install=zsh").stdout.startswith("autoload -Uz bashcompinit")
    p = cli("-sc", "install=fish")
    assert p.returncode == 2 and "choose bash or zsh" in p.stderr


def test_the_readme_snippet_trains_heads_on_a_feature_set(tmp_path: Path) -> None:
    """The README's "train your own CLIP" code, on a frozen-trunk (feature-space) set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        folder = mmdistill.run(
            "distill",
            {"method": "random", "budget.pairs": 20, "debug": "tiny", "device": "cpu",
             "encoder.train_image_trunk": False, "encoder.train_text_trunk": False,
             "hydra.run.dir": tmp_path / "run"},
        )  # fmt: skip
    readme = (REPO / "README.md").read_text()
    code = readme.split("## Using a set in your own code", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    code = code.replace('"outputs/distill/flickr8k/covmatch-100/<time>"', repr(str(folder)))
    code = code.replace("range(50)", "range(5)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["ds"].image_space == scope["ds"].text_space == "features"
    assert torch.isfinite(scope["loss"]) and len(code.splitlines()) <= 12
