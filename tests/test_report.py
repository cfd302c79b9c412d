"""`mmdistill report`: run pages (written by `distill` itself) and sweep pages, self-contained
and complete; bad input costs one line per problem and the rest still builds; the page loads in
headless Chromium with no console error and every image decoded.

Two short real runs on shapes: CovMatch in pixel space with val checks (curves, a captioned grid
of synthetic images), and LoRS on frozen tiny trunks (experts, learned step sizes, the learned
similarity, nearest real images for feature-space pairs). A random run and a full-data `train`
run in an outputs-shaped tree give the CovMatch run its reference rows; copies of the two runs
at five budgets make a sweep whose table must wrap rather than run off the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import escape
from pathlib import Path

import pytest
from PIL import Image

from mmdistill import metrics
from mmdistill.report import curves, pages, references
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


# ------------------------------------------------------------- references, notes, layout

BUDGETS = (4, 9, 16, 25, 50)
STAMP = "2026-01-01_00-00-00"


def subtitle(page: str) -> str:
    found = re.search(r'<p class="sub">(.*?)</p>', page)
    assert found, "no subtitle"
    return found.group(1)


def r_mean(run: Path) -> float:
    return json.loads((run / "results.json").read_text())["summary"]["r_mean"]["mean"]


@pytest.fixture(scope="module")
def outputs(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outputs tree as the CLI lays it out: the CovMatch run (a copy, its page removed),
    a random run of its budget and a full-data `train` run, both with its protocol."""
    root = tmp_path_factory.mktemp("tree") / "outputs"
    shutil.copytree(sweep / "covmatch", root / "distill" / "shapes" / "covmatch-9" / STAMP)
    (root / "distill" / "shapes" / "covmatch-9" / STAMP / pages.PAGE).unlink()
    train = [a for a in SMALL if not a.startswith("budget.")]
    for verb, args, where in (
        ("distill", [*SMALL, "method=random"], root / "distill" / "shapes" / "random-9" / STAMP),
        ("train", train, root / "train" / "shapes" / "full" / STAMP),
    ):
        p = mmdistill(verb, *args, f"hydra.run.dir={where}")
        assert p.returncode == 0, p.stderr[-3000:]
    return root


def test_run_page_shows_random_and_full_data_references_found_in_the_tree(
    outputs: Path, sweep: Path
) -> None:
    run = outputs / "distill" / "shapes" / "covmatch-9" / STAMP
    rand = outputs / "distill" / "shapes" / "random-9" / STAMP
    full = outputs / "train" / "shapes" / "full" / STAMP
    # Another evaluation protocol is no reference, whatever its method and budget.
    other = outputs / "distill" / "shapes" / "random-9" / "other-protocol"
    shutil.copytree(rand, other)
    res = json.loads((other / "results.json").read_text())
    res["protocol"]["steps"], res["seed"] = 99, 1
    (other / "results.json").write_text(json.dumps(res))

    p = mmdistill("report", str(run))
    assert p.returncode == 0, p.stderr
    page = (run / pages.PAGE).read_text()
    pairs = json.loads((full / "results.json").read_text())["pairs"]
    line = f"random at 9 pairs: {r_mean(rand):.1f}, full data ({pairs} pairs): {r_mean(full):.1f}"
    assert f"References: {line}</h3>" in page
    assert page.count("2 students of 1 run(s)") == 2  # the other protocol's run left out
    assert f'href="../../random-9/{STAMP}/report.html"' in page  # where each came from
    assert f"../../../../train/shapes/full/{STAMP}" in page
    assert "other-protocol" not in page
    assert f"dashed: test r_mean of this run {r_mean(run):.1f}" in page  # on the val curve
    assert subtitle(page).startswith(f"outputs/distill/shapes/covmatch-9/{STAMP} · distill")

    # Beside the CovMatch run in the test sweep there is only LoRS: no reference, no line.
    alone = (sweep / "covmatch" / pages.PAGE).read_text()
    assert "References" not in alone and "dashed" not in alone
    assert references.find(sweep / "covmatch") == []


def test_each_plotted_loss_term_gets_a_note_on_its_scale(sweep: Path) -> None:
    def note(scope: str, term: str) -> str:
        return f"<b>{term}</b>: {escape(curves.TERM_NOTES[(scope, term)])}"

    covmatch = (sweep / "covmatch" / pages.PAGE).read_text()
    for term in ("loss", "cov", "mean", "online"):
        assert note("covmatch", term) in covmatch, term
    assert note("student", "loss") in covmatch
    assert escape(curves.TERM_NOTES[("covmatch", "within")]) not in covmatch  # not recorded
    lors = (sweep / "lors" / pages.PAGE).read_text()
    for scope, term in (
        ("trajectory", "loss"),
        ("trajectory", "step_image"),
        ("trajectory", "step_text"),
        ("expert", "loss"),
        ("student", "loss"),
    ):
        assert note(scope, term) in lors, (scope, term)
    assert escape(curves.TERM_NOTES[("covmatch", "cov")]) not in lors


def test_no_page_names_its_folder_by_an_absolute_path(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (sweep / pages.PAGE).is_file():
        pages.folder_report(sweep)
    for page, name in (
        (sweep / "covmatch" / pages.PAGE, "covmatch"),
        (sweep / "lors" / pages.PAGE, "lors"),
        (sweep / pages.PAGE, sweep.name),
    ):
        text = subtitle(page.read_text())
        assert text.startswith(f"{name} · ") and str(sweep) not in text, text
    inside = tmp_path / "work" / "runs" / "a"
    job = tmp_path / "x" / "outputs" / "multirun" / "distill" / "s" / "job"
    run = tmp_path / "x" / "outputs" / "distill" / "shapes" / "r" / STAMP
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside.parents[1])
    assert references.shown_path(inside) == "runs/a"  # below the working directory
    assert references.shown_path(job) == "outputs/multirun/distill/s/job"
    assert references.shown_path(run) == f"outputs/distill/shapes/r/{STAMP}"
    assert references.shown_path(tmp_path / "loose" / "run") == "run"


@pytest.fixture(scope="module")
def wide_sweep(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two test runs copied to five budgets each: 35 recall columns, wider than a page."""
    root = tmp_path_factory.mktemp("wide")
    for name in ("covmatch", "lors"):
        for b in BUDGETS:
            run = root / f"{name}-{b}"
            shutil.copytree(sweep / name, run)
            res = json.loads((run / "results.json").read_text())
            res["budget"]["pairs"], res["pairs"] = b, b
            (run / "results.json").write_text(json.dumps(res))
    pages.folder_report(root)
    return root


def test_sweep_table_wraps_by_budget_each_part_in_a_scrolling_wrapper(wide_sweep: Path) -> None:
    page = (wide_sweep / pages.PAGE).read_text()
    found = re.search(r'<section id="table">(.*?)</section>', page, re.S)
    assert found
    section = found.group(1)
    parts = re.findall(r'<div class="wide"><table>(.*?)</table></div>', section)
    assert section.count("<table>") == len(parts) == len(BUDGETS)
    for b, part in zip(BUDGETS, parts, strict=True):
        assert f">{b} pairs (" in part and part.count("r_mean") == 1
    assert '<div class="budgets"><div class="wide"><table>' in section
    assert ".wide{overflow-x:auto" in page and "flex-wrap:wrap" in page


@pytest.mark.skipif(
    find_browser() is None, reason="Chromium is not installed (apt-get install chromium)"
)
def test_pages_fit_a_1400_px_window(wide_sweep: Path, outputs: Path, tmp_path: Path) -> None:
    run = outputs / "distill" / "shapes" / "covmatch-9" / STAMP
    if not (run / pages.PAGE).is_file():
        pages.folder_report(run)
    for page in (wide_sweep / pages.PAGE, run / pages.PAGE):
        shot = tmp_path / f"{page.parent.name}.png"
        check = load_page(page, screenshot=shot, width=1400)
        assert check.errors == [] and check.broken == [] and check.overflow == [], (page, check)
        with Image.open(shot) as im:
            assert im.size[0] == 1400
    # The check itself can fail: a wrapper narrower than its table is reported by section.
    cut = tmp_path / "cut.html"
    cut.write_text(
        "<!DOCTYPE html><html><head><style>.wide{overflow-x:auto;width:200px}</style></head>"
        '<body><section id="table"><div class="wide"><table><tr><td style="min-width:900px">'
        "x</td></tr></table></div></section></body></html>"
    )
    assert load_page(cut, width=1400).overflow == ["table"]
