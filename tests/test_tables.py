"""`mmdistill table`: the golden folder's expected table, and bad input one line per problem.

tests/golden/runs holds results.json files (+ .hydra/config.yaml) from a real tiny sweep
(random and herding x 10/20 pairs x seeds 0/1, two students each, plus a full-data run);
tests/golden/expected holds the table it must produce, checked by hand once.
"""

from __future__ import annotations

import csv
import io as stdio
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdistill.errors import UserError
from mmdistill.jobs import table
from mmdistill.report import pages, stored, table_files, tables
from mmdistill.training import cost
from mmdistill.training.pairs import PairSet
from mmdistill.training.storage import Float16, Float32, Int8, LowRank, PairStorage

GOLDEN = Path(__file__).parent / "golden"
RUNS = GOLDEN / "runs"


def copy_runs(tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(RUNS, dst)
    return dst


def edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "table.csv") as f:
        return list(csv.DictReader(f))


def test_golden_folder_gives_the_expected_table(tmp_path: Path) -> None:
    table([str(RUNS), "--out", str(tmp_path)])
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / name).read_text() == (GOLDEN / "expected" / name).read_text(), name
    with Image.open(tmp_path / "recall_vs_pairs.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_cells_pool_every_student_of_every_seed(tmp_path: Path) -> None:
    table([str(RUNS), "--out", str(tmp_path)])
    rows = {(r["method"], r["pairs"]): r for r in csv_rows(tmp_path)}
    for method, pairs in (("random", 10), ("herding", 20)):
        values = [
            s["r_mean"]
            for seed in (0, 1)
            for s in json.loads(
                (RUNS / f"{method}-{pairs}-seed{seed}" / "results.json").read_text()
            )["students"]
        ]
        row = rows[(method, str(pairs))]
        assert row["seeds"] == "0 1" and row["students"] == "4"
        assert float(row["r_mean_mean"]) == pytest.approx(statistics.mean(values), abs=1e-4)
        assert float(row["r_mean_std"]) == pytest.approx(statistics.pstdev(values), abs=1e-4)
    assert rows[("full data", "300")]["ratio"] == "1"


def test_cli_prints_and_writes_into_the_first_folder(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "table", str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "herding" in p.stdout and "20 pairs" in p.stdout
    assert (runs / "table.md").is_file() and (runs / "recall_vs_pairs.png").is_file()


def test_no_results_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmdistill.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["table", str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable results.json")
    with pytest.raises(UserError, match="not a folder"):
        table([str(tmp_path / "missing")])


def test_corrupt_files_are_skipped_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = copy_runs(tmp_path)
    bad_json = runs / "random-10-seed0" / "results.json"
    bad_json.write_text(bad_json.read_text()[:200])
    no_students = runs / "herding-20-seed1" / "results.json"
    edit(no_students, students=[])
    nan_metric = runs / "herding-10-seed0" / "results.json"
    data = json.loads(nan_metric.read_text())
    del data["students"][0]["IR@5"]
    nan_metric.write_text(json.dumps(data))
    (tmp_path / "nothing").mkdir()
    table([str(runs), str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("skipped")]
    assert len(skipped) == 3
    assert any(str(bad_json) in s and "not valid JSON" in s for s in skipped)
    assert any(str(no_students) in s and "students" in s for s in skipped)
    assert any(str(nan_metric) in s and "IR@5" in s for s in skipped)
    assert any("no results.json under" in line and "nothing" in line for line in err)
    rows = {(r["method"], r["pairs"]): r for r in csv_rows(tmp_path / "out")}
    assert rows[("random", "10")]["seeds"] == "1" and rows[("random", "10")]["students"] == "2"
    assert rows[("random", "20")]["students"] == "4"  # the readable ones are all there
    assert rows[("herding", "20")]["seeds"] == "0"


def test_mixed_protocols_stay_apart_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = copy_runs(tmp_path)
    path = runs / "herding-10-seed1" / "results.json"
    protocol = json.loads(path.read_text())["protocol"]
    edit(path, protocol={**protocol, "steps": 30})
    other = runs / "herding-20-seed1" / "results.json"  # workers do not change the numbers
    edit(other, protocol={**json.loads(other.read_text())["protocol"], "workers": 2})
    table([str(runs), "--out", str(tmp_path / "out")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "differ" in line]
    assert len(warnings) == 1 and "eval.steps" in warnings[0] and "30" in warnings[0]
    rows = csv_rows(tmp_path / "out")
    herding = sorted(
        (r["setting"], r["pairs"], r["seeds"]) for r in rows if r["method"] == "herding"
    )
    assert herding == [
        ("eval.steps=30", "10", "1"),
        ("eval.steps=5", "10", "0"),
        ("eval.steps=5", "20", "0 1"),
    ]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| Method | Draws | Setting |" in md
    line = next(x for x in md.splitlines() if x.startswith("| herding | 1 | eval.steps=30"))
    assert line.count(" - ") == len(tables.METRICS)  # no 20-pair result for that protocol


def set_method_param(run: Path, name: str, line: str) -> None:
    cfg = run / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(f"  name: {name}\n", f"  name: {name}\n  {line}\n"))


def test_method_hyper_parameters_split_rows_of_one_method(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    set_method_param(runs / "random-20-seed1", "random", "alpha: 2")
    table = tables.build(*tables.collect([runs]))
    assert table.varying == [] and table.method_varying["random"] == ["method.alpha"]
    assert sum(row[0] == "random" for row in table.rows) == 2
    assert any("random runs differ in method.alpha" in w for w in table.warnings)


def test_different_methods_may_have_different_hyper_parameters(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    for run in runs.glob("herding-*"):
        set_method_param(run, "herding", "steps: 7")
    table = tables.build(*tables.collect([runs]))
    assert not table.has_setting and not [w for w in table.warnings if "differ" in w]
    # The table says where the settings are instead of listing them all (a line of thousands
    # of characters with the published methods); table.csv has every value.
    line = tables.method_line(table)
    assert line.startswith("herding hyper-parameters in full: table.csv") and len(line) < 120
    assert f"Method settings: {line}" in table_files.markdown(table)
    herding = [r for r in csv.DictReader(stdio.StringIO(table_files.csv_text(table)))]
    assert all("method.steps=7" in r["protocol"] for r in herding if r["method"] == "herding")


def test_percentages_never_print_in_exponent_form(tmp_path: Path) -> None:
    assert [tables.percent(p) for p in (2.857, 14.28, 99.7, 100.0, 150.0)] == [
        "2.9%",
        "14%",
        "100%",
        "100%",
        "150%",
    ]
    runs = copy_runs(tmp_path)
    for path in runs.glob("*/results.json"):
        edit(path, train_pairs=20)
    table = tables.build(*tables.collect([runs]))
    assert [table.budget_label(b) for b in table.budgets] == ["10 pairs (50%)", "20 pairs (100%)"]


def test_pairs_axis_labels_budgets_without_overprinting() -> None:
    """LoRS's 99 + S and MDW's 94 + P sit at their budget (100); budgets spanning decades get
    a log axis; labels too close to the previous one are left out."""
    assert table_files.budget_ticks([100, 200, 500]) == ([100, 200, 500], True)
    assert table_files.budget_ticks([100, 200, 300]) == ([100, 200, 300], False)
    assert table_files.budget_ticks([100, 100, 3500, 1000]) == ([100, 1000, 3500], True)
    assert table_files.budget_ticks([100, 110, 400]) == ([100, 400], True)
    assert table_files.budget_ticks([100, 102, 150]) == ([100, 150], False)
    assert table_files.budget_ticks([]) == ([], False)


def test_sets_smaller_than_their_budget_are_plotted_at_it(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    for seed in (0, 1):
        edit(runs / f"herding-20-seed{seed}" / "results.json", pairs=19)
    table = tables.build(*tables.collect([runs]))
    assert [table_files._x(table, b) for b in table.budgets] == [10, 20]


def test_ratio_budgets_and_duplicate_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = copy_runs(tmp_path)
    for path in runs.glob("*/results.json"):
        edit(path, train_pairs=300)
    for seed in (0, 1):
        path = runs / f"random-20-seed{seed}" / "results.json"
        edit(path, budget={"pairs": None, "ratio": 0.05}, pairs=15)
    table = tables.build(*tables.collect([runs]))
    labels = [table.budget_label(b) for b in table.budgets]
    assert labels == ["10 pairs (3.3%)", "20 pairs (6.7%)", "ratio 0.05 (15 pairs)"]
    # A seed twice: which one counts is not the table's to guess, so both files are named.
    shutil.copytree(runs / "herding-10-seed0", runs / "again")
    with pytest.raises(UserError, match="repeats herding seed 0") as err:
        tables.build(*tables.collect([runs]))
    assert "again" in str(err.value) and "herding-10-seed0" in str(err.value)


def test_into_replaces_only_its_generated_section(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nHand-written intro.\n")
    table([str(RUNS), "--out", str(tmp_path), "--into", str(doc), "--section", "f8k"])
    first = doc.read_text()
    assert first.startswith("# Results\n\nHand-written intro.\n")
    assert first.count("BEGIN generated: f8k") == 1 and "### Retrieval recall" in first
    doc.write_text(first + "\nHand-written outro.\n")
    table([str(RUNS), "--out", str(tmp_path), "--into", str(doc), "--section", "f8k"])
    again = doc.read_text()
    assert again == first + "\nHand-written outro.\n"  # replaced in place, nothing duplicated


def test_sets_smaller_than_their_budget_sit_in_the_budget_column(tmp_path: Path) -> None:
    """LoRS distils N-1 pairs + S within an N-pair budget: same column as N, with a note."""
    runs = copy_runs(tmp_path)
    for seed in (0, 1):
        edit(runs / f"herding-20-seed{seed}" / "results.json", pairs=19)
    table([str(runs), "--out", str(tmp_path / "out")])
    rows = {(r["method"], r["budget"]) for r in csv_rows(tmp_path / "out")}
    md = (tmp_path / "out" / "table.md").read_text()
    assert any(m == "herding" and "20" in b for m, b in rows), rows
    assert "herding at 20 pairs: 19 pairs (storage not recorded) in 20 pairs' bytes" in md
    assert "| 19 pairs" not in md  # no column of its own


def test_rows_from_different_commits_get_a_warning(tmp_path: Path, capsys) -> None:
    """A sweep relaunched after a code change keeps its finished jobs: the table says so."""
    runs = copy_runs(tmp_path)
    for i, folder in enumerate(sorted(p.parent for p in runs.rglob("results.json"))):
        sha = "a" * 40 if i % 2 else "b" * 40
        (folder / "meta.json").write_text(json.dumps({"git": {"sha": sha, "dirty": i == 2}}))
    table([str(runs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "commits" in x)
    assert "3 commits" in line and "aaaaaaa" in line and "bbbbbbb-dirty" in line


def test_one_commit_gives_no_commit_warning(tmp_path: Path, capsys) -> None:
    runs = copy_runs(tmp_path)
    for folder in {p.parent for p in runs.rglob("results.json")}:
        (folder / "meta.json").write_text(json.dumps({"git": {"sha": "c" * 40, "dirty": False}}))
    table([str(runs), "--out", str(tmp_path / "out")])
    assert "commits" not in capsys.readouterr().err


COST_COLUMNS = "r_mean,cost.bytes,cost.pairs_equiv,cost.wall_s"


def test_cost_columns_render_and_old_results_leave_them_blank(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    # one seed of one cell records cost; the golden results predate the block
    edit(
        runs / "random-10-seed0" / "results.json",
        cost={"bytes": 101376, "pairs_equiv": 8.0, "wall_s": 4.4, "stages_s": {"data": 4.0}},
    )
    table([str(runs), "--out", str(tmp_path / "t"), f"columns={COST_COLUMNS}"])
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| r_mean | cost.bytes | cost.pairs_equiv | cost.wall_s |" in md
    cells = {
        row[0]: row
        for line in md.splitlines()
        if line.startswith("| ")
        for row in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }
    # Method, Draws, then r_mean and three cost cells per budget (10 pairs, 20 pairs)
    assert cells["random"][3:6] == ["101 kB", "8.00", "4.4"]
    assert cells["random"][7:] == ["", "", ""] and cells["herding"][3:6] == ["", "", ""]
    assert "TR@1" not in md.split("|---", 1)[1]  # the chosen columns replace the recalls
    rows = {(r["method"], r["pairs"]): r for r in csv_rows(tmp_path / "t")}
    assert rows[("random", "10")]["cost.bytes"] == "101376"
    assert rows[("herding", "10")]["cost.bytes"] == ""
    assert rows[("random", "10")]["TR@1_mean"]  # csv keeps every recall
    tex = (tmp_path / "t" / "table.tex").read_text()
    assert "cost.pairs\\_equiv" in tex and "101 kB" in tex


def test_cost_columns_through_the_cli_and_by_group(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    edit(runs / "herding-20-seed1" / "results.json", cost={"stages_s": {"data": 2.0}})
    edit(runs / "herding-20-seed0" / "results.json", cost={"stages_s": {"data": 4.0}})
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "table", str(runs), "--out", str(tmp_path / "t"),
         "--columns", "r_mean,cost.stages_s.data"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "cost.stages_s.data" in p.stdout
    rows = {(r["method"], r["pairs"]): r for r in csv_rows(tmp_path / "t")}
    assert rows[("herding", "20")]["cost.stages_s.data"] == "3"  # mean over the two seeds


def test_unknown_column_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown table column 'cost.byts'; choose from"):
        table([str(RUNS), "--out", str(tmp_path), "--columns", "r_mean,cost.byts"])
    with pytest.raises(UserError, match="--columns is empty"):
        table([str(RUNS), "--out", str(tmp_path), "columns=,"])


def test_every_cost_field_has_a_format_and_bytes_read_in_decimal_units() -> None:
    from mmdistill.training import cost

    assert set(tables.COLUMN_FORMATS) == set(cost.FIELDS) | set(cost.GROUPS)
    shown = [tables.COLUMN_FORMATS["bytes"](n) for n in (936, 3832, 66_600_000, 2.5e12)]
    assert shown == ["936 B", "3.83 kB", "66.6 MB", "2.5 TB"]


# ----------------------------------------------------------------------- cross-architecture


def write_result(
    path: Path, verb: str, method: str, encoder: str, r_means: list[float], **extra: object
) -> None:
    """A results.json whose students' recalls all equal their r_mean."""
    students = [{m: r for m in tables.METRICS} for r in r_means]
    path.mkdir(parents=True)
    data = {
        "verb": verb,
        "dataset": "flickr8k",
        "encoder": encoder,
        "method": method,
        "pairs": 100,
        "budget": {"pairs": 100, "ratio": None},
        "seed": 0,
        "protocol": {"steps": 1000},
        "students": students,
        **extra,
    }
    (path / "results.json").write_text(json.dumps(data))


def test_cross_arch_matrix_rows_sources_columns_evaluators(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    decoded = {
        "source_encoder": "lite0_minilm",
        "target_encoder": "lite1_minilm",
        "images": "decoded: nearest real training image",
        "distinct_images": 97,
        "texts": "kept: both text trunks give the same features",
        "decoded_coreset": True,
        "budget": 100,
    }
    write_result(runs / "a", "distill", "covmatch", "lite0_minilm", [46.0, 48.0])
    write_result(runs / "b", "distill", "random", "lite0_minilm", [24.0, 24.0])
    write_result(runs / "c", "evaluate", "covmatch", "lite1_minilm", [40.0, 42.0], transfer=decoded)
    # An evaluate run records no budget of its own; LoRS's 99 pairs + S sit at the source's 100.
    edit(runs / "c" / "results.json", budget=None, pairs=99)
    write_result(  # a second draw of the same set: one note, a count per draw
        runs / "c1",
        "evaluate",
        "covmatch",
        "lite1_minilm",
        [40.0, 42.0],
        transfer={**decoded, "distinct_images": 90},
        seed=1,
    )
    write_result(
        runs / "f",
        "evaluate",
        "covmatch",
        "lite1_minilm",
        [30.0, 30.0],
        transfer={**decoded, "texts_mode": "decode", "texts": "decoded: nearest caption"},
    )
    write_result(runs / "d", "distill", "covmatch", "lite1_minilm", [50.0, 50.0])
    write_result(runs / "e", "train", "full", "lite1_minilm", [60.0, 60.0])
    table([str(runs), "--cross-arch", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "cross_arch.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("|")]
    assert lines[0] == "| Distilled with | Method | Draws | lite0_minilm | lite1_minilm |"
    assert lines[2:] == [
        "| lite0_minilm | random @ 100 pairs | 1 | 24.0±0.0 | - |",
        "| lite0_minilm | covmatch @ 100 pairs | 1-2 | 47.0±1.0 | 41.0±1.0 * |",
        "| lite0_minilm | covmatch @ 100 pairs, texts decoded | 1 | - | 30.0±0.0 * |",
        "| lite1_minilm | covmatch @ 100 pairs | 1 | - | 50.0±0.0 |",
        "| - | full data | 1 | - | 60.0±0.0 |",
    ]
    assert "lite0_minilm covmatch @ 100 pairs -> lite1_minilm: images decoded" in md
    assert md.count("(97, 90 distinct)") == 1 and "Dataset: flickr8k" in md
    with open(tmp_path / "out" / "cross_arch.csv") as f:
        rows = list(csv.DictReader(f))
    cell = next(
        r
        for r in rows
        if r["eval_encoder"] == "lite1_minilm"
        and r["method"] == "covmatch @ 100 pairs"
        and r["source_encoder"] == "lite0_minilm"
    )
    assert cell["decoded_coreset"] == "true" and cell["r_mean_mean"] == "41.0000"
    assert cell["students"] == "4" and cell["texts"].startswith("kept") and "|" not in cell["texts"]
    # The ordinary table keeps the converted set's row apart from lite1's own covmatch row.
    built = tables.build(*tables.collect([runs]))
    covmatch = [row for row in built.rows if row[0] == "covmatch"]
    assert len(covmatch) == 4


# ------------------------------------------------------------- equal bytes, other pair counts


def budget_run(runs: Path, name: str, method: str, pairs: int, **changes: object) -> Path:
    """A run at a 100-pair budget (bytes of 100 float32 pairs) holding `pairs` pairs, made
    from a golden one; `changes` go into its results.json."""
    run = runs / name
    shutil.copytree(runs / "random-10-seed0", run)
    cfg = run / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("  name: random\n", f"  name: {method}\n"))
    edit(run / "results.json", method=method, pairs=pairs, budget={"pairs": 100}, **changes)
    return run


def save_set(run: Path, n: int, store: object) -> PairSet:
    """`n` 4-dim pairs kept as `store` (a PairStorage) in the run's distilled.safetensors."""
    params = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    factors = store.encode(params, params.clone()) if not store.plain else {}
    decoded = {k: f.decode() for k, f in factors.items()}
    pairs = PairSet(
        images=decoded.get("images", params),
        texts=decoded.get("texts", params.clone()),
        factors=factors,
    )
    pairs.save(run / "distilled")
    return pairs


def equal_bytes_runs(tmp_path: Path) -> Path:
    """The golden runs plus, at 100 pairs' bytes: int8 CovMatch holding 394 pairs (its storage
    read from its distilled.safetensors, as in runs older than `cost.storage`), a float32
    random set of 100 pairs, and a LoRS-like 99 pairs + S."""
    runs = copy_runs(tmp_path)
    int8 = budget_run(runs, "int8-100", "covmatch_int8", 394, cost={"pairs_equiv": 99.9})
    save_set(int8, 394, PairStorage(Int8(), Int8()))
    budget_run(runs, "plain-100", "random", 100, cost={"storage": "float32"})
    budget_run(runs, "lors-100", "lors", 99, cost={"storage": "float32", "pairs_equiv": 100.3})
    return runs


def test_cells_holding_other_pair_counts_name_count_and_storage(tmp_path: Path) -> None:
    runs = equal_bytes_runs(tmp_path)
    table([str(runs), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "table.md").read_text()
    notes = [line for line in md.splitlines() if line.startswith("- [")]
    assert notes == [
        "- [1] lors at 100 pairs: 99 pairs stored as float32 in 100 pairs' bytes (the rest of "
        "the budget stores its learned similarity / correspondence matrix)",
        "- [2] covmatch_int8 at 100 pairs: 394 pairs stored as int8 in 100 pairs' bytes",
    ]
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    int8, plain, lors = lines["| covmatch_int8"], lines["| random"], lines["| lors"]
    assert int8.count(" [2]") == len(tables.METRICS) and "[1]" not in int8
    assert lors.count(" [1]") == len(tables.METRICS)
    assert "[" not in plain  # 100 float32 pairs in 100 pairs' bytes: nothing to say
    rows = {(r["method"], r["budget"]): r for r in csv_rows(tmp_path / "out")}
    assert rows[("covmatch_int8", "100 pairs")]["pairs"] == "100"
    assert rows[("covmatch_int8", "100 pairs")]["pairs_stored"] == "394"
    assert rows[("covmatch_int8", "100 pairs")]["storage"] == "int8"
    assert (
        rows[("random", "100 pairs")]["pairs_stored"],
        rows[("random", "100 pairs")]["storage"],
    ) == ("100", "float32")
    assert rows[("lors", "100 pairs")]["pairs_stored"] == "99"
    assert rows[("random", "10 pairs")]["storage"] == ""  # the golden runs predate the record
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert "\\textsuperscript{2}" in tex and "394 pairs stored as int8 in 100 pairs' bytes" in tex
    assert tex.index("394 pairs stored") < tex.index("\\end{tabular}")


def test_equal_bytes_notes_in_rich_and_html_and_pairs_equiv_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = equal_bytes_runs(tmp_path)
    table([str(runs), "--out", str(tmp_path / "out"), "--columns", "r_mean,cost.pairs_equiv"])
    out = capsys.readouterr().out
    assert "[2] covmatch_int8 at 100 pairs: 394 pairs stored as int8" in out
    md = (tmp_path / "out" / "table.md").read_text()
    int8 = next(line for line in md.splitlines() if line.startswith("| covmatch_int8"))
    assert "99.90 [2]" in int8  # the cost column is marked as the recall beside it
    built = tables.build(*tables.collect([runs]))
    html = pages._html_table(built)
    assert "<sup>2</sup>" in html and "394 pairs stored as int8 in 100 pairs&#x27; bytes" in html


def test_storage_splits_rows_that_share_everything_else(tmp_path: Path) -> None:
    """`method=random method.bits=8` and a plain random set of one budget are two rows: the
    Setting column tells them apart by bits (the saved config) and by storage (the set)."""
    runs = equal_bytes_runs(tmp_path)
    int8 = budget_run(runs, "random-int8-100", "random", 394, cost={"storage": "int8"})
    set_method_param(int8, "random", "bits: 8")
    built = tables.build(*tables.collect([runs]))
    random_rows = [row for row in built.rows if row[0] == "random"]
    assert len(random_rows) == 2  # plain (10, 20 and 100 pairs) and int8 (100)
    assert built.method_varying["random"] == ["method.bits", "storage"]
    assert "storage" not in built.varying  # other methods in other storage: the comparison
    settings = {built.setting(row) for row in random_rows}
    assert settings == {"method.bits=-, storage=-", "method.bits=8, storage=int8"}
    # the same rows without the saved bits: storage alone still keeps them apart
    cfg = int8 / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("  bits: 8\n", ""))
    built = tables.build(*tables.collect([runs]))
    assert built.method_varying["random"] == ["storage"]
    assert sum(row[0] == "random" for row in built.rows) == 2


@pytest.mark.parametrize(
    ("store", "name"),
    [
        (PairStorage(Float32(), Float32()), "float32"),
        (PairStorage(Float16(), Float16()), "float16"),
        (PairStorage(Int8(), Int8()), "int8"),
        (PairStorage(Int8(), Float32()), "int8 images, float32 texts"),
    ],
)
def test_storage_is_read_alike_from_the_set_and_its_file(
    tmp_path: Path, store: PairStorage, name: str
) -> None:
    pairs = save_set(tmp_path, 6, store)
    assert cost.storage(pairs) == name
    assert stored.storage_of(tmp_path, {}) == name  # from the safetensors header alone
    assert stored.storage_of(tmp_path, {"cost": {"storage": "rank-2"}}) == "rank-2"


@pytest.mark.parametrize(("bits", "name"), [(32, "rank-2"), (8, "rank-2 int8")])
def test_low_rank_storage_names_its_rank(tmp_path: Path, bits: int, name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    basis, offset = torch.randn(2, 4, generator=gen), torch.randn(4, generator=gen)
    coef = torch.randn(5, 2, generator=gen)
    factors = {
        "images": LowRank(2, bits, basis, offset).encode(coef),
        "texts": LowRank(2, bits, basis.clone(), offset.clone()).encode(coef.clone()),
    }
    rows = factors["images"].decode()
    pairs = PairSet(images=rows, texts=rows.clone(), factors=factors)
    pairs.save(tmp_path / "distilled")
    assert cost.storage(pairs) == name and stored.storage_of(tmp_path, {}) == name


def test_evaluate_runs_read_the_storage_of_their_source(tmp_path: Path) -> None:
    source = tmp_path / "distill"
    source.mkdir()
    save_set(source, 6, PairStorage(Int8(), Int8()))
    run = tmp_path / "evaluate"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"source": str(source)}))
    assert stored.storage_of(run, {}) == "int8"
    (run / "meta.json").write_text("{")  # damaged: storage not recorded, the table goes on
    assert stored.storage_of(run, {}) is None
    (source / "distilled.safetensors").write_bytes(b"\xff" * 8)
    assert stored.storage_of(source, {}) is None
