"""`mmdistill report`: run pages (written by `distill` itself) and sweep pages, self-contained
and complete; bad input costs one line per problem and the rest still builds; the page loads in
headless Chromium with no console error and every image decoded.

Two short real runs on shapes: CovMatch in pixel space with val checks (curves, a captioned grid
of synthetic images), and LoRS on frozen tiny trunks (experts, learned step sizes, the learned
similarity, nearest real images for feature-space pairs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmdistill import metrics
from mmdistill.report import pages
from mmdistill.report.browser import find_browser, load_page

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "dataset.split_sizes=[60,20,30]",
    "eval.students=2",
    "eval.steps=10",
    "budget.pairs=9",
    "device=cpu",
    "threads=1",
]
COVMATCH = [
    "method=covmatch",
    "method.steps=6",
    "method.reset_every=3",
    "method.checkpoint_every=6",
    "monitor.val_every=3",
    "monitor.val_students=1",
]
LORS = [
    "method=lors",
    "encoder.train_image_trunk=false",
    "encoder.train_text_trunk=false",
    "expert.num_experts=1",
    "expert.epochs=2",
    "method.iterations=4",
    "method.syn_steps=2",
    "method.max_start_epoch=1",
    "method.eval_every=2",
    "method.batch_syn=4",
    # tiny's frozen random trunks give O(1) features: the feature-space step sizes of
    # test_trajectory's FEATURE runs (tiny's own trajectory_lr is for its pixels)
    "method.lr_img=1",
    "method.lr_txt=1",
    "method.lr_lr=1e-4",
]


def mmdistill(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache is not None:
        env["MMDISTILL_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    # A cache of its own: with the session's, an expert buffer another test built would be
    # reused and the LoRS run would train (and log) no expert.
    cache = tmp_path_factory.mktemp("report-cache")
    for name, extra in (("covmatch", COVMATCH), ("lors", LORS)):
        p = mmdistill("distill", *SMALL, *extra, f"hydra.run.dir={root / name}", cache=cache)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "report: " in p.stderr
    return root


def sources(page: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', page)


def test_distill_writes_a_complete_self_contained_run_page(sweep: Path) -> None:
    page = (sweep / "covmatch" / pages.PAGE).read_text()
    for section in ("recall", "curves", "set", "cost", "config"):
        assert f'<section id="{section}">' in page, section
    assert 'id="problems"' not in page and "<script" not in page and "<link" not in page
    assert sources(page) and all(s.startswith("data:image/") for s in sources(page))
    assert 'href="http' not in page
    # One captioned tile per pair, each caption the nearest real caption export found.
    captions = [
        line.split("\t")[2]
        for line in (sweep / "covmatch" / "captions.txt").read_text().splitlines()
    ]
    figures = re.findall(r"<figure>(.*?)</figure>", page)
    assert len(figures) == 9 and "repeat(3," in page  # a square grid
    for fig, caption in zip(figures, captions, strict=True):
        assert caption.replace("&", "&amp;") in fig
    assert "val_r_mean peaked at" in page  # the val checks became a curve
    assert "evaluation students" in page and "distillation step" in page


def test_lors_page_shows_experts_step_sizes_and_the_similarity(sweep: Path) -> None:
    run = sweep / "lors"
    page = (run / pages.PAGE).read_text()
    assert '<section id="similarity">' in page
    assert "step_image" in page and "experts" in page and "val_r_mean peaked at" in page
    assert "nearest real image" in page  # feature-space images read as real photos
    streams = {r["stream"] for r in metrics.read(run / metrics.FILE)[0]}
    assert {"method", "expert/0", "student/0", "student/1"} <= streams


def test_sweep_page_has_the_table_the_plot_and_a_link_per_run(sweep: Path) -> None:
    p = mmdistill("report", str(sweep))
    assert p.returncode == 0, p.stderr
    page = (sweep / pages.PAGE).read_text()
    links = re.findall(r'<a href="([^"#]+)">', page)
    assert sorted(links) == ["covmatch/report.html", "lors/report.html"]
    assert all((sweep / link).is_file() for link in links)
    assert "Retrieval recall (%)" in page and "9 pairs" in page
    assert page.count("<details>") >= 2  # every row's full settings
    assert sum(s.startswith("data:image/png") for s in sources(page)) == 1  # recall vs pairs


def test_bad_input_is_one_line_per_problem_and_the_rest_builds(sweep: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    p = mmdistill("report", str(empty))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{empty}: no runs here (no folder with meta.json" in p.stderr
    assert not (empty / pages.PAGE).exists()  # no page that would pass for a report

    run = tmp_path / "damaged"
    shutil.copytree(sweep / "covmatch", run)
    lines = (run / metrics.FILE).read_text().splitlines()
    lines.insert(3, "{not json")
    (run / metrics.FILE).write_text("\n".join(lines) + '\n{"stream": "method", "st')
    (run / pages.PAGE).unlink()
    p = mmdistill("report", str(run))
    assert p.returncode == 0, p.stderr
    problems = [line for line in p.stderr.splitlines() if "metrics.jsonl line" in line]
    assert len(problems) == 2
    assert "line 4" in problems[0] and f"line {len(lines) + 1}" in problems[1]
    page = (run / pages.PAGE).read_text()
    assert '<section id="curves">' in page and "val_r_mean peaked at" in page
    assert '<section id="set">' in page and '<section id="problems">' in page

    folder = tmp_path / "sweep"
    shutil.copytree(sweep / "covmatch", folder / "finished")
    shutil.copytree(sweep / "lors", folder / "unfinished")
    (folder / "unfinished" / "results.json").unlink()
    (folder / "never-started" / ".hydra").mkdir(parents=True)
    p = mmdistill("report", str(folder))
    assert p.returncode == 0, p.stderr
    missing = [line for line in p.stderr.splitlines() if "no results.json" in line]
    assert len(missing) == 2 and any("never-started" in m for m in missing)
    page = (folder / pages.PAGE).read_text()
    assert "finished/report.html" in page and "Retrieval recall (%)" in page


@pytest.mark.skipif(
    find_browser() is None, reason="Chromium is not installed (apt-get install chromium)"
)
def test_pages_load_in_chromium_with_no_error_and_every_image(sweep: Path, tmp_path: Path) -> None:
    if not (sweep / pages.PAGE).is_file():
        pages.folder_report(sweep)
    for page in (sweep / "covmatch" / pages.PAGE, sweep / "lors" / pages.PAGE, sweep / pages.PAGE):
        shot = tmp_path / f"{page.parent.name}.png"
        check = load_page(page, screenshot=shot)
        assert check.errors == [] and check.requests == [], (page, check)
        assert check.images > 0 and check.broken == [], (page, check)
        with Image.open(shot) as im:
            assert im.size[0] == 1280 and im.size[1] > 600
