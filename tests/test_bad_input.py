"""Every bad input fails with one line and loses nothing.

Each case runs a verb (in this process where it can: `cli.main`, stderr captured; in a real
process where only a process shows it) and asserts a non-zero exit, exactly one line on stderr
naming the problem, no traceback, and that every file of a finished run folder is still
byte-identical. Cases cover whole classes: every typed key with the wrong type or range,
unknown and missing keys, contradicting settings, every way an image, caption file, JSON file
or safetensors file can be damaged, run folders relaunched with other settings, and late
checks that must fail before any feature is encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdistill import io
from mmdistill.cli import main
from mmdistill.schema import LOSS_NAMES
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "dataset.split_sizes=[40,10,20]",
    "eval.students=2",
    "eval.steps=10",
    "budget.pairs=10",
    "device=cpu",
    "threads=1",
]
# The finished run and the cases read against it: random pairs, so the students start at once.
RANDOM = ["method=random"]


def random_unless(args: list[str]) -> list[str]:
    """`args` with method=random in front, unless they choose a method themselves."""
    return args if any(a.startswith("method=") for a in args) else [*RANDOM, *args]


# The tiny encoder with frozen trunks: cached features, heads only (feature cache, CovMatch).
FEATURES = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]


def files(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones too) and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def process(*args: str, **popen: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        **popen,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished distill run; every case checks it is left byte-identical."""
    run = tmp_path_factory.mktemp("finished") / "run"
    p = process("distill", *FAST, *RANDOM, f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr
    return run


@pytest.fixture(autouse=True)
def _finished_untouched(finished: Path):
    before = files(finished)
    yield
    assert files(finished) == before, "a finished run folder changed"


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`mmdistill <args>` in this process: its exit code and what it wrote to stderr (its
    stdout, log lines, stays in `capsys` for the caller)."""
    argv = list(sys.argv)
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    sys.stdout.write(captured.out)  # back where a caller's readouterr() finds it
    return code, captured.err


def one_line(code: int, err: str, *needles: str) -> str:
    """The single stderr line of a failed command, checked to name the problem."""
    lines = err.strip().splitlines()
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fails(capsys: pytest.CaptureFixture, args: list[str], *needles: str) -> str:
    return one_line(*run_cli(capsys, *args), *needles)


# ------------------------------------------------------------------------ typed config keys

BAD_VALUES = [
    # whole numbers given text, fractions, or nothing
    (["eval.students=abc"], "eval.students='abc' is not a whole number"),
    (["eval.steps=1.5"], "eval.steps=1.5 is not a whole number"),
    (["budget.pairs=2.5"], "budget.pairs=2.5 is not a whole number"),
    (["budget.pairs=many"], "budget.pairs='many' is not a whole number"),
    (["seed=x"], "seed='x' is not a whole number"),
    (["threads=0.5"], "threads=0.5 is not a whole number"),
    (["eval.workers=two"], "eval.workers='two' is not a whole number or auto"),
    (["eval.students=null"], "eval.students must be set, not null"),
    (["dataset.split_sizes=[1.5,2,3]"], "dataset.split_sizes[0]=1.5 is not a whole number"),
    (["dataset.split_sizes=[10,10]"], "dataset.split_sizes=[10, 10] must be [train, val, test]"),
    (["method=tesla", "method.iterations=ten"], "method.iterations='ten'"),
    (["method=tesla", "expert.epochs=many"], "expert.epochs='many' is not a whole number"),
    (["method=covmatch", "method.steps=x"], "method.steps='x' is not a whole number or auto"),
    # numbers given text, or not finite
    (["eval.lr=abc"], "eval.lr='abc' is not a finite number or learned / learned_image"),
    (["eval.lr=nan"], "eval.lr=nan is not a finite number"),
    (["eval.lr=inf"], "eval.lr=inf is not a finite number"),
    (["eval.weight_decay=heavy"], "eval.weight_decay='heavy' is not a finite number"),
    (["method=tesla", "method.lr_img=fast"], "method.lr_img='fast' is not a finite number"),
    (["noise=shuffle", "noise.ratio=half"], "noise.ratio='half' is not a finite number"),
    (["encoder.temperature=[1]"], "encoder.temperature=[1] is not a finite number"),
    # out of range
    (["eval.students=0"], "eval.students=0 is out of range: it must be at least 1"),
    (["eval.steps=-1"], "eval.steps=-1 is out of range"),
    (["budget.pairs=0"], "budget.pairs=0 is out of range: it must be at least 1"),
    (["budget.pairs=null", "budget.ratio=1.5"], "budget.ratio=1.5 is out of range"),
    (["budget.pairs=null", "budget.ratio=0"], "budget.ratio=0 is out of range"),
    (["eval.momentum=1"], "eval.momentum=1 is out of range: it must be in [0, 1)"),
    (["eval.feature_dropout=1.0"], "eval.feature_dropout=1.0 is out of range"),
    (["noise=shuffle", "noise.ratio=1"], "noise.ratio=1 is out of range"),
    (["eval.lr=0"], "eval.lr=0 is out of range: it must be positive"),
    (["eval.batch_size=1"], "eval.batch_size=1 is out of range: it must be at least 2"),
    (["seed=-1"], "seed=-1 is out of range: it must be 0 or more"),
    (["threads=0"], "threads=0 is out of range"),
    (["method=mdw", "method.dual.threshold=1"], "method.dual.threshold=1 is out of range"),
    (["method=mdw", "method.max_matrix_memory=2"], "method.max_matrix_memory=2 is out of range"),
    (["method=covmatch", "method.rho=-1"], "method.rho=-1 is out of range"),
    # not one of the choices
    (["eval.optimizer=adam"], "eval.optimizer='adam' is not a valid choice; choose one of"),
    (["eval.schedule=linear"], "eval.schedule='linear' is not a valid choice"),
    (["eval.selection=best"], "eval.selection='best' is not a valid choice"),
    (["eval.loss=mse"], "eval.loss='mse' is not a valid choice"),
    (["device=tpu"], "device='tpu': unknown device"),
    (["method=mtt", "method.gradient=second_order"], "method.gradient='second_order'"),
    (["method=tesla", "method.init=zeros"], "method.init='zeros' is not a valid choice"),
    (["method=covmatch", "method.real_stats=some"], "method.real_stats='some'"),
    (["method=covmatch_int8", "method.bits=4"], "method.bits=4 is not a valid choice; choose one"),
    (["method=kcenter", "method.start=middle"], "method.start='middle' is not a valid choice"),
    (["encoder.head.text=mlp"], "encoder.head.text='mlp' is not a valid choice"),
    (["method=nope"], "unknown method 'nope'; choose one of"),
    # true / false
    (["method=tesla", "method.lora=maybe"], "method.lora='maybe' must be true or false"),
    (["dataset=flickr30k", "dataset.restval_to_train=1"], "must be true or false"),
    # unknown keys, with a suggestion
    (["eval.studnets=3"], "unknown key eval.studnets", "did you mean eval.students?"),
    (["+eval.studnets=3"], "unknown key eval.studnets", "did you mean eval.students?"),
    (["method=random", "method.rho=2"], "unknown key method.rho"),
    (["+budget.pair=5"], "unknown key budget.pair", "did you mean budget.pairs?"),
    (["hydra.run.dri=/x"], "unknown key hydra.run.dri"),
    (["~eval.nope"], "~eval.nope deletes a key this config does not have"),
    (["+eval.lr=1"], "+eval.lr=... adds a key that exists"),
    # missing values
    (["~eval.lr"], "eval.lr is missing from the config"),
    (["dataset=hf"], "dataset.path is required"),
    # settings that contradict each other
    (["budget.ratio=0.1", "budget.pairs=5"], "both set; give one of them"),
    (["budget.pairs=null"], "set budget.pairs (e.g. budget.pairs=100) or budget.ratio"),
    (["method=tesla", "expert.epochs=1"], "expert.epochs=1 but method.max_start_epoch 2"),
    (["method=covmatch", "method.checkpoint_every=75"], "must be a multiple of"),
    (["method=covmatch", "method.syn_batch=500"], "method.syn_batch=500 is larger than"),
    (["method=lors", "budget.pairs=2"], "budget.pairs=2 leaves 1 synthetic pair(s)"),
    # overrides Hydra cannot read or place
    (["method=random,herding"], "lists several values: add -m to sweep"),
    (["eval.lr=["], "cannot read the override 'eval.lr=['"),
    (["eval.lr=${nope}"], "cannot resolve eval.lr"),
    (["-m", "eval.students=2,0"], "eval.students=0 is out of range"),  # the whole sweep
    (["-m", "seed=interval(0,1)"], "a sweep takes a list of values"),
]


@pytest.mark.parametrize(
    ("args", "needles"), [(a, n) for a, *n in BAD_VALUES], ids=[" ".join(a) for a, *_ in BAD_VALUES]
)
def test_bad_config_value_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    run = tmp_path / "run"
    fails(capsys, ["distill", *args, f"hydra.run.dir={run}"], *needles)
    assert not run.exists()  # refused before the run folder was made


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate"], "evaluate needs source=<distill run folder>"),
        (["buffer", "expert.batch_size=1"], "expert.batch_size=1 is out of range"),
        (["buffer", "expert.index=-1"], "expert.index=-1 is out of range"),
        (["train", "method=random"], "unknown key method"),
        (["nope"], "unknown verb 'nope'"),
        (["table"], "mmdistill table: the following arguments are required: folders"),
        (["table", "--bogus", "x"], "unrecognized arguments: --bogus"),
        (["export", "--max", "abc", "x"], "argument --max: invalid int value: 'abc'"),
        (["export", "no/such/folder"], "no/such/folder is not a folder"),
        (["table", "no/such/folder"], "no/such/folder is not a folder"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_every_verb_refuses_bad_arguments_in_one_line(
    capsys: pytest.CaptureFixture, args: list[str], needle: str
) -> None:
    fails(capsys, args, needle)


def test_schema_knows_every_student_loss() -> None:
    assert set(LOSS_NAMES) == set(LOSSES.names())


# --------------------------------------------------------------------------- run identity


def test_identical_relaunch_of_a_finished_run_is_skipped(
    capsys: pytest.CaptureFixture, finished: Path
) -> None:
    code, err = run_cli(capsys, "distill", *FAST, *RANDOM, f"hydra.run.dir={finished}")
    assert code == 0 and err.strip() == f"already done, skipped: {finished}"
    code, err = run_cli(capsys, "distill", f"resume={finished}")
    assert code == 0 and "already done, skipped" in err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["method=herding", "budget.pairs=50"],
            ("is a finished run made with other settings", "budget.pairs: 10 -> 50", "random"),
        ),
        (["eval.steps=30"], ("eval.steps: 10 -> 30", "give a new hydra.run.dir")),
        (["seed=1"], ("seed: 0 -> 1",)),
    ],
    ids=["other method", "other protocol", "other seed"],
)
def test_relaunch_of_a_finished_run_with_other_settings_is_refused(
    capsys: pytest.CaptureFixture, finished: Path, args: list[str], needles: tuple[str, ...]
) -> None:
    fails(capsys, ["distill", *FAST, *random_unless(args), f"hydra.run.dir={finished}"], *needles)
    fails(capsys, ["distill", f"resume={finished}", *args], *needles[:1])


def test_resume_with_the_wrong_verb_or_folder(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path
) -> None:
    fails(
        capsys, ["evaluate", f"resume={finished}"], "is a `distill` run folder", "mmdistill distill"
    )
    fails(capsys, ["distill", f"resume={tmp_path}"], "no .hydra/overrides.yaml there")
    evaluated = tmp_path / "evaluated"
    (evaluated / ".hydra").mkdir(parents=True)
    (evaluated / ".hydra" / "config.yaml").write_text("verb: evaluate\nsource: /x\n")
    (evaluated / ".hydra" / "overrides.yaml").write_text("- source=/x\n")
    fails(capsys, ["distill", f"resume={evaluated}"], "is a `evaluate` run folder")


def unfinished(finished: Path, where: Path) -> Path:
    """A copy of the finished run as if killed during evaluation (set saved, no `done`)."""
    run = where / "unfinished"
    shutil.copytree(finished, run)
    for name in ("done", "results.json", "recall.md"):
        (run / name).unlink()
    io.write_json(run / "students.json", io.read_json(run / "students.json")[:1])
    return run


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["method=herding"], ("was started with other settings", "method.name: random -> herding")),
        (["resume", "method=herding"], ("cannot change method.name",)),
        (["resume", "budget.pairs=12"], ("cannot change budget.pairs",)),
        (["resume", "dataset.split_sizes=[30,10,20]"], ("cannot change dataset.split_sizes",)),
    ],
    ids=["relaunch other method", "resume other method", "resume other budget", "other data"],
)
def test_unfinished_run_keeps_its_label(
    capsys: pytest.CaptureFixture,
    finished: Path,
    tmp_path: Path,
    args: list[str],
    needles: tuple[str, ...],
) -> None:
    """A folder killed during evaluation is never scored as another method or budget."""
    run = unfinished(finished, tmp_path)
    before = files(run)
    if args[0] == "resume":
        command = ["distill", f"resume={run}", *args[1:]]
    else:
        command = ["distill", *FAST, *random_unless(args), f"hydra.run.dir={run}"]
    fails(capsys, command, *needles)
    assert files(run) == before  # a refused command touches nothing


def test_distilled_set_of_another_method_is_not_scored_as_this_one(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path
) -> None:
    run = unfinished(finished, tmp_path)
    info = io.read_json(run / "distilled.json")
    info["meta"]["method"] = "herding"
    io.write_json(run / "distilled.json", info)
    fails(capsys, ["distill", f"resume={run}"], "the distilled set in", "'method': 'herding'")


def test_resume_with_another_protocol_trains_the_students_again(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path
) -> None:
    run = unfinished(finished, tmp_path)
    code, err = run_cli(capsys, "distill", f"resume={run}", "eval.steps=12")
    assert code == 0, err
    assert "evaluation settings changed (eval.steps: 10 -> 12)" in capsys.readouterr().out
    results = io.read_json(run / "results.json")
    assert results["protocol"]["steps"] == 12 and len(results["students"]) == 2
    assert io.read_json(run / "students.json") == results["students"]


# ---------------------------------------------------------------------- damaged data files


def dataset(root: Path, n: int = 12) -> Path:
    """A flickr8k-style folder: n 32-px images (JPEG, every third PNG), two captions each."""
    (root / "images").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(n):
        name = f"img{i:02d}.{'png' if i % 3 == 2 else 'jpg'}"
        Image.new("RGB", (32, 32), (20 * i % 255, 90, 160)).save(root / "images" / name)
        rows += [f"{name},a picture number {i}", f'{name},"another, caption of {i}"']
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


FLICKR = ["dataset=flickr8k", "dataset.split_sizes=[6,3,3]", "budget.pairs=4"]
FLICKR += ["eval.students=1", "eval.steps=2", "device=cpu", "threads=1"]


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


IMAGE_DAMAGE = {
    "empty": (lambda p: b"", "(an empty file)"),
    "text": (lambda p: b"this is not an image\n", "(not an image format PIL can read)"),
    "truncated jpeg": (_truncated, "is not a readable image"),
    "header only": (lambda p: p.read_bytes()[:24], "is not a readable image"),
    "garbage body": (lambda p: p.read_bytes()[:200] + bytes(range(256)) * 2, "not a readable"),
}


@pytest.mark.parametrize("damage", list(IMAGE_DAMAGE))
def test_damaged_image_names_the_file_and_the_fix(
    capsys: pytest.CaptureFixture, tmp_path: Path, damage: str
) -> None:
    root = dataset(tmp_path / "data")
    image = root / "images" / "img00.jpg"
    make, needle = IMAGE_DAMAGE[damage]
    image.write_bytes(make(image))
    run = tmp_path / "run"
    args = ["distill", *FLICKR, f"dataset.root={root}", f"hydra.run.dir={run}"]
    fails(capsys, args, f"image {image} ", needle, "fix or remove its rows")
    meta = io.read_json(run / "meta.json")
    assert meta["status"] == "failed" and str(image) in meta["error"]


def test_damaged_png_and_missing_image(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    root = dataset(tmp_path / "data")
    png = root / "images" / "img02.png"
    png.write_bytes(_truncated(png))
    args = ["distill", *FLICKR, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'a'}"]
    fails(capsys, args, f"image {png} ", "truncated")
    png.unlink()
    png.mkdir()  # a folder where the image should be
    args[-1] = f"hydra.run.dir={tmp_path / 'b'}"
    fails(capsys, args, f"image file {png} is missing")


CAPTIONS = {
    "not utf-8": (
        b"image,caption\nimg00.jpg,caf\xe9 au lait\n",
        "line 2 is not UTF-8 text (byte 0xe9)",
    ),
    "binary": (bytes(range(128, 256)) * 4, "line 1 is not UTF-8 text"),
    "nul byte": (b"image,caption\nimg00.jpg,a\x00b\n", "line 2 holds a NUL byte"),
    "huge field": (b"image,caption\nimg00.jpg," + b"x" * 200_000 + b"\n", "is not a CSV row"),
    "empty": (b"", "is empty; it needs an `image,caption` header"),
    "header only": (b"image,caption\n", "has a header but no caption rows"),
    "wrong header": (b"file,text\nimg00.jpg,a cat\n", "needs columns `image` and `caption`"),
    "short row": (b"image,caption\nimg00.jpg\n", "line 2 has 1 fields, expected 2"),
    "empty caption": (b"image,caption\nimg00.jpg,   \n", "line 2 has an empty or non-text caption"),
    "no image name": (b"image,caption\n,a cat\n", "line 2 has no image file name"),
}


@pytest.mark.parametrize("damage", list(CAPTIONS))
def test_damaged_caption_file_names_the_file_and_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, damage: str
) -> None:
    root = dataset(tmp_path / "data")
    content, needle = CAPTIONS[damage]
    (root / "captions.txt").write_bytes(content)
    run = tmp_path / "run"
    fails(capsys, ["distill", *FLICKR, f"dataset.root={root}", f"hydra.run.dir={run}"], needle)


def karpathy(root: Path, images: list[dict] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "images" / "a.jpg")
    entry = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a black square"}]}
    io.write_json(root / "dataset_x.json", {"images": images or [entry]})
    return root / "dataset_x.json"


ANNOTATIONS = {
    "invalid json": (b'{"images": [', "is damaged (not valid JSON, line 1"),
    "not utf-8": (b'{"images": "\xff"}', "line 1 is not UTF-8 text (byte 0xff)"),
    "a list": (b"[1, 2]", "has no 'images' field"),
    "images not a list": (b'{"images": 3}', "'images' must be a list"),
    "no sentences": (b'{"images": [{"filename": "a.jpg", "split": "train"}]}', "no 'sentences'"),
    "bad split": (
        b'{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}',
        "has split 'dev'",
    ),
}


@pytest.mark.parametrize("damage", list(ANNOTATIONS))
def test_damaged_annotation_json(
    capsys: pytest.CaptureFixture, tmp_path: Path, damage: str
) -> None:
    path = karpathy(tmp_path / "data")
    content, needle = ANNOTATIONS[damage]
    path.write_bytes(content)
    args = ["distill", "dataset=flickr30k", f"dataset.annotations={path}"]
    args += [f"dataset.image_root={path.parent / 'images'}", f"hydra.run.dir={tmp_path / 'r'}"]
    fails(capsys, args, needle)


def test_coco_caption_for_an_unknown_image(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        io.write_json(
            tmp_path / f"{split}.json",
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [
                {"image_id": 2, "caption": "a cat"}]},
        )  # fmt: skip
    args = ["distill", "dataset=coco_official", f"hydra.run.dir={tmp_path / 'r'}"]
    args += [f"dataset.{s}_annotations={tmp_path / s}.json" for s in ("train", "val")]
    args += [f"dataset.{s}_images={tmp_path / s}" for s in ("train", "val")]
    fails(capsys, args, "refers to image_id 2, absent from 'images'")


# ------------------------------------------------------------- damaged distilled set (json)


def copy_of(finished: Path, where: Path) -> Path:
    run = where / "copy"
    shutil.copytree(finished, run)
    return run


def _json_edit(**changes: object):
    def edit(path: Path) -> None:
        info = io.read_json(path)
        info.update(changes)
        io.write_json(path, info)

    return edit


def _resave(change):
    def edit(path: Path) -> None:
        tensors = io.load_tensors(path)
        change(tensors)
        io.save_tensors(path, tensors)

    return edit


SET_DAMAGE = {
    # distilled.safetensors
    "empty tensors": ("safetensors", lambda p: p.write_bytes(b""), "header too small"),
    "truncated tensors": (
        "safetensors",
        lambda p: p.write_bytes(_truncated(p)),
        "not a readable safetensors file",
    ),
    "foreign tensors": ("safetensors", lambda p: p.write_bytes(b'{"a": 1}' * 40), "header"),
    "pickle tensors": (
        "safetensors",
        lambda p: torch.save({"images": torch.zeros(2)}, p),
        "not a readable safetensors file",
    ),
    "missing texts": ("safetensors", _resave(lambda t: t.pop("texts")), "it has no tensor texts"),
    "nan images": (
        "safetensors",
        _resave(lambda t: t["images"].view(-1)[0].fill_(float("nan"))),
        "images hold values that are not finite",
    ),
    "integer images": (
        "safetensors",
        _resave(lambda t: t.update(images=t["images"].long())),
        "not floating point",
    ),
    "fewer images": (
        "safetensors",
        _resave(lambda t: t.update(images=t["images"][:3])),
        "3 images for 10 texts",
    ),
    # distilled.json
    "invalid json": ("json", lambda p: p.write_text('{"pairs": '), "not valid JSON"),
    "json list": ("json", lambda p: p.write_text("[]"), "a JSON list, not a dict"),
    "json not utf-8": ("json", lambda p: p.write_bytes(b'{"x": "\xfe"}'), "is not UTF-8 text"),
    "no format": ("json", _json_edit(format_version=None), "format version None"),
    "pair count": ("json", _json_edit(pairs=999), "10 texts but its JSON says 999 pairs"),
    "unknown similarity": (
        "json",
        _json_edit(similarity={"kind": "nope", "n": 10}),
        "unknown similarity 'nope'",
    ),
    "bad step sizes": ("json", _json_edit(step_sizes={"image": "fast"}), "ValueError"),
}


@pytest.mark.parametrize("damage", list(SET_DAMAGE))
def test_damaged_distilled_set(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path, damage: str
) -> None:
    source = copy_of(finished, tmp_path)
    suffix, edit, needle = SET_DAMAGE[damage]
    edit(source / f"distilled.{suffix}")
    args = ["evaluate", f"source={source}", *FAST[:1], "eval.students=1", "device=cpu"]
    line = fails(capsys, [*args, f"hydra.run.dir={tmp_path / 'eval'}"], needle)
    assert str(source / "distilled.") in line
    fix = ["restore it from a copy, or distil again into a new run folder"]
    if damage == "no format":  # not damage: a set from another version, said as such
        fix = []
    assert all(f in line for f in fix)
    fails(capsys, ["export", str(source)], needle, *fix)


def test_export_needs_a_readable_config(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path
) -> None:
    run = copy_of(finished, tmp_path)
    (run / ".hydra" / "config.yaml").write_text("method: [unclosed\n")
    fails(capsys, ["export", str(run)], "config.yaml is damaged (not valid YAML")
    (run / ".hydra" / "config.yaml").unlink()
    fails(capsys, ["export", str(run)], "has no .hydra/config.yaml")


# ---------------------------------------------------------------- damaged run-folder files


RUN_DAMAGE = {
    "meta.json": (lambda r: (r / "meta.json").write_text("{"), "meta.json is damaged"),
    "meta.json list": (lambda r: (r / "meta.json").write_text("[]"), "not a dict"),
    "students.json": (lambda r: (r / "students.json").write_text("[{"), "students.json is damaged"),
    "students.json dict": (
        lambda r: (r / "students.json").write_text("{}"),
        "students.json is damaged (a JSON dict, not a list)",
    ),
    "students.json records": (
        lambda r: (r / "students.json").write_text("[1, 2]"),
        "a student record without its recalls",
    ),
    "config.yaml": (
        lambda r: (r / ".hydra" / "config.yaml").write_text("eval: [\n"),
        "config.yaml is damaged (not valid YAML",
    ),
    "overrides.yaml": (
        lambda r: (r / ".hydra" / "overrides.yaml").write_text("- [\n"),
        "overrides.yaml is damaged (not valid YAML",
    ),
    "overrides.yaml mapping": (
        lambda r: (r / ".hydra" / "overrides.yaml").write_text("a: 1\n"),
        "not a list of overrides",
    ),
    "distilled set": (
        lambda r: (r / "distilled.safetensors").write_bytes(b"\0" * 16),
        "to distil again",
    ),
}


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_damaged_file_of_an_unfinished_run(
    capsys: pytest.CaptureFixture, finished: Path, tmp_path: Path, damage: str
) -> None:
    run = unfinished(finished, tmp_path)
    edit, needle = RUN_DAMAGE[damage]
    edit(run)
    fails(capsys, ["distill", f"resume={run}"], needle)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished CovMatch run in feature space with a checkpoint at step 50 (own cache)."""
    root = tmp_path_factory.mktemp("covmatch")
    args = [*FAST, *FEATURES, "method=covmatch", "method.steps=60", "budget.pairs=5"]
    args += ["method.checkpoint_every=50", f"paths.cache_dir={root / 'cache'}"]
    p = process("distill", *args, f"hydra.run.dir={root / 'run'}")
    assert p.returncode == 0, p.stderr
    return root / "run", args


def _drop(*keys: str):
    return lambda tensors: [tensors.pop(k) for k in keys]


CHECKPOINT_DAMAGE = {
    "truncated": ("safetensors", lambda p: p.write_bytes(_truncated(p)), "not a readable"),
    "foreign": ("safetensors", lambda p: p.write_bytes(b"PK\x03\x04" * 64), "header"),
    "missing rng": ("safetensors", _resave(_drop("rng")), "missing 'rng'"),
    "invalid state": ("json", lambda p: p.write_text("{]"), "not valid JSON"),
    "state without position": ("json", lambda p: p.write_text('{"step": 50}'), "'real_pos'"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint(
    capsys: pytest.CaptureFixture,
    checkpointed: tuple[Path, list[str]],
    tmp_path: Path,
    damage: str,
) -> None:
    finished_run, args = checkpointed
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("done", "distilled.safetensors", "distilled.json", "results.json"):
        (run / name).unlink()  # killed while distilling
    suffix, edit, needle = CHECKPOINT_DAMAGE[damage]
    edit(run / "checkpoints" / f"covmatch.{suffix}")
    line = fails(capsys, ["distill", *args, f"hydra.run.dir={run}"], needle)
    assert f"delete {run / 'checkpoints'} to restart the method" in line


@pytest.fixture(scope="module")
def expert_buffer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One cached expert (feature space, own cache) and the distill command that reads it."""
    cache = tmp_path_factory.mktemp("buffer-cache")
    common = [*FAST[:1], *FEATURES, "device=cpu", "threads=1", f"paths.cache_dir={cache}"]
    common += ["expert.num_experts=1", "expert.epochs=2"]
    p = process("buffer", *common, f"hydra.run.dir={cache.parent / 'buffer-run'}")
    assert p.returncode == 0, p.stderr
    distill = [*common, "method=tesla", "method.iterations=2", "method.eval_every=0"]
    distill += ["budget.pairs=5", "eval.students=1", "eval.steps=2"]
    return next(cache.glob("buffers/*")), distill


@pytest.mark.parametrize(
    ("target", "content", "needle"),
    [
        ("expert_000.safetensors", b"\x08" * 12, "expert_000.safetensors is damaged"),
        ("buffer.json", b"{", "buffer.json is damaged"),
        ("buffer.json", b"{}", "no buffer key"),
    ],
    ids=["expert file", "buffer.json", "buffer.json without key"],
)
def test_damaged_expert_buffer(
    capsys: pytest.CaptureFixture,
    expert_buffer: tuple[Path, list[str]],
    tmp_path: Path,
    target: str,
    content: bytes,
    needle: str,
) -> None:
    folder, args = expert_buffer
    path = folder / target
    intact = path.read_bytes()
    path.write_bytes(content)
    try:
        line = fails(capsys, ["distill", *args, f"hydra.run.dir={tmp_path / 'r'}"], needle)
        assert "trained again" in line
    finally:
        path.write_bytes(intact)


def test_divergence_keeps_a_partial_set_that_evaluate_reads(
    capsys: pytest.CaptureFixture, expert_buffer: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """TESLA at lr_img 1e12 stays finite but leaves the real data's range: one line, and the
    last checkpoint is the run's distilled set, flagged partial and readable."""
    _, args = expert_buffer
    run = tmp_path / "run"
    command = ["distill", *args, "method.lr_img=1e12", "method.checkpoint_every=1"]
    line = fails(capsys, [*command, f"hydra.run.dir={run}"], "tesla stopped at iteration")
    assert "reach |x|" in line and "marked partial" in line and "lower method.lr_img" in line
    assert io.read_json(run / "distilled.json")["partial"] is True
    assert io.read_json(run / "meta.json")["status"] == "failed"
    evaluate = ["evaluate", f"source={run}", *args[:1], "eval.students=1", "eval.steps=2"]
    code, err = run_cli(
        capsys, *evaluate, *FEATURES, "device=cpu", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert code == 0, err
    assert io.read_json(tmp_path / "e" / "results.json")["partial"]["stopped_at"] == 1


def test_damaged_feature_cache_entry_is_rebuilt_with_one_warning(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    args = ["distill", *FAST, *FEATURES, "eval.students=1", f"paths.cache_dir={tmp_path / 'c'}"]
    assert run_cli(capsys, *args, f"hydra.run.dir={tmp_path / 'a'}")[0] == 0
    entries = sorted((tmp_path / "c").glob("*.safetensors"))
    assert entries
    entries[0].write_bytes(_truncated(entries[0]))
    code = run_cli(capsys, *args, f"hydra.run.dir={tmp_path / 'b'}")[0]
    log = next((tmp_path / "b").glob("*.log")).read_text()
    assert code == 0
    warnings = [line for line in log.splitlines() if "feature cache" in line]
    assert len(warnings) == 1 and str(entries[0]) in warnings[0] and "rebuilding it" in warnings[0]
    assert io.load_tensors(entries[0])["x"].shape[0] > 0  # rebuilt


# ------------------------------------------------------------------- late and job checks


def test_budget_larger_than_the_data_fails_before_any_encoding(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    args = ["distill", *FAST, *FEATURES, "budget.pairs=100000", f"paths.cache_dir={cache}"]
    fails(capsys, [*args, f"hydra.run.dir={tmp_path / 'r'}"], "larger than the training set")
    assert not list(cache.glob("*.safetensors"))  # nothing was encoded


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["dataset=flickr8k", "dataset.root=/no/such/root"], "does not exist"),
        (["method=mtt", "method.buffer=/no/such/buffer"], "is not an expert buffer"),
    ],
    ids=["missing data", "missing buffer"],
)
def test_missing_inputs(
    capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str], needle: str
) -> None:
    fails(capsys, ["distill", *FAST, *args, f"hydra.run.dir={tmp_path / 'r'}"], needle)


def test_evaluate_needs_a_distill_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    args = ["evaluate", f"source={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}"]
    fails(capsys, args, "holds no distilled.safetensors")
    assert io.read_json(tmp_path / "r" / "meta.json")["status"] == "failed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    fails(capsys, ["train", "device=cuda", f"hydra.run.dir={tmp_path}"], "no CUDA device")


def test_a_crash_is_recorded_in_meta(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not bad input but a bug: the traceback stays, and meta.json says failed, not running."""
    from mmdistill import jobs

    def crash(cfg: object, run_dir: Path, device: str) -> None:
        jobs.Run(run_dir, "train", device, 0)
        raise RuntimeError("boom")

    monkeypatch.setitem(jobs.JOBS, "train", crash)
    code, err = run_cli(capsys, "train", "device=cpu", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "RuntimeError: boom" in err  # Hydra's report of the crash
    meta = io.read_json(tmp_path / "meta.json")
    assert meta["status"] == "failed" and meta["error"] == "RuntimeError: boom"


# ------------------------------------------------------------------------- real processes


def test_a_real_process_prints_one_line(tmp_path: Path) -> None:
    p = process("distill", "eval.lr=abc", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "eval.lr='abc'" in p.stderr


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_student_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    args = [*FAST[:1], *RANDOM, "eval.students=4", "eval.workers=2", "eval.steps=100000"]
    args.append("device=cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmdistill.cli", "distill", *args, f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the students never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        for w in alive:  # leave no process behind even when the check fails
            os.kill(w, signal.SIGKILL)
        assert not alive, "student workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_results_are_plain_json(finished: Path) -> None:
    """Nothing in a run folder needs unpickling: every JSON parses with allow_nan off."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a JSON file")

    for path in finished.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)
    assert PairSet.load(finished / "distilled").partial is False
