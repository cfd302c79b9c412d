"""Sweeps: ratio budgets, stable sweep folders, kill + relaunch, parallel jobs, failure list,
submitit's local executor (the SLURM launcher's code path)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.sweeps import claim_slot, job_args, resolve_budget, sweep_name

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "method=random",
    "dataset.split_sizes=[60,20,20]",
    "eval.students=1",
    "eval.steps=5",
    "device=cpu",
]


def budget(**kv: object) -> object:
    return OmegaConf.create({"pairs": None, "ratio": None, **kv})


def cli(*args: str, outputs: Path) -> list[str]:
    return [sys.executable, "-m", "mmdistill.cli", *args]


def run(*args: str, outputs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMDISTILL_OUTPUTS": str(outputs)}
    return subprocess.run(
        cli(*args, outputs=outputs), capture_output=True, text=True, cwd=REPO, env=env,
        timeout=600,
    )  # fmt: skip


def jobs(outputs: Path) -> dict[str, Path]:
    """Job folders of every sweep under outputs, by their budget."""
    found = {}
    for saved in outputs.rglob(".hydra/overrides.yaml"):
        pairs = [o for o in OmegaConf.load(saved) if o.startswith("budget.pairs=")]
        found[pairs[0].split("=")[1]] = saved.parent.parent
    return found


def test_resolve_budget_pairs_and_ratio() -> None:
    assert resolve_budget(budget(pairs=100), 3500) == 100
    assert resolve_budget(budget(ratio=0.003), 3500) == 11  # 10.5 rounds half up
    assert resolve_budget(budget(ratio=0.1), 300) == 30
    assert resolve_budget(budget(ratio=1.0), 300) == 300
    bad = [
        (budget(pairs=100, ratio=0.01), "both set"),
        (budget(), "set budget.pairs"),
        (budget(ratio=0.0), "must be in (0, 1]"),
        (budget(ratio=1.5), "must be in (0, 1]"),
        (budget(ratio=0.001), "rounds to 0 pairs"),
        (budget(pairs=0), "must be positive"),
        (budget(pairs=301), "larger than the training set"),
    ]
    for cfg, message in bad:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
            resolve_budget(cfg, 300)


def test_sweep_folder_depends_only_on_the_job_set() -> None:
    a = sweep_name(["method=random,lors", "budget.pairs=100,200", "seed=0,1"])
    b = sweep_name(["seed=1,0", "budget.pairs=200,100", "method=lors,random", "device=cpu"])
    assert a == b and a.startswith("budget.pairs_100-200__method_lors-random__seed_0-1-")
    assert sweep_name(["method=random", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]) == (
        sweep_name(["method=random", "threads=1", "eval.workers=2"])
    )
    assert sweep_name(["method=random"]) != sweep_name(["method=random", "debug=tiny"])
    assert sweep_name(["dataset.split_sizes=[60,20,20]"]) != sweep_name(
        ["dataset.split_sizes=[20,60,20]"]
    )
    long = sweep_name([f"method.k{i}=1,2,3" for i in range(50)])
    assert len(long) < 100  # a readable prefix plus a hash, within file-name limits


def test_job_args() -> None:
    args = job_args("distill", ["-m", "method=random,herding", "--cfg", "job"])
    assert args[:2] == ["-m", "hydra.sweep.dir=${paths.output_dir}/multirun/distill/" +
                        sweep_name(["method=random,herding"])]  # fmt: skip
    assert args[2:] == ["method=random,herding", "--cfg", "job"]
    assert job_args("distill", ["method=random"]) == ["method=random"]
    mine = ["-m", "method=random", "hydra.sweep.dir=/x"]
    assert job_args("distill", mine) == mine
    assert "budget.pairs=null" in job_args("distill", ["budget.ratio=0.01"])
    both = job_args("distill", ["budget.ratio=0.01", "budget.pairs=5"])
    assert both == ["budget.ratio=0.01", "budget.pairs=5"]  # resolve_budget refuses it later
    assert job_args("train", ["-m", "seed=0,1"])[1].endswith("/multirun/train/" +
                                                            sweep_name(["seed=0,1"]))  # fmt: skip


def test_ratio_and_threads_compose(tmp_path: Path) -> None:
    p = run("distill", "budget.ratio=0.01", "threads=1", "--cfg", "job", outputs=tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = OmegaConf.create(p.stdout)
    assert cfg.budget.pairs is None and cfg.budget.ratio == 0.01 and cfg.threads == 1


def test_claim_slot_gives_each_live_process_its_own(tmp_path: Path) -> None:
    assert claim_slot(tmp_path, 2) == 0
    (tmp_path / "slot0").write_text(str(os.getppid()))  # held by a live process
    assert claim_slot(tmp_path / "other", 2) == 0
    assert claim_slot(tmp_path, 2) == 1
    (tmp_path / "slot1").write_text("999999999")  # its process is gone: reclaimed
    assert claim_slot(tmp_path, 2) == 1


def test_killed_sweep_relaunch_runs_only_the_unfinished_jobs(tmp_path: Path) -> None:
    # Jobs run one after another, and each takes seconds (set-up, then 60 student steps), so
    # the kill below, sent within 50 ms of the first `done`, lands before a second can finish.
    slow = [*TINY[:-2], "eval.steps=60", "device=cpu"]
    sweep = ["distill", "-m", *slow, "budget.pairs=6,8,10"]
    env = {**os.environ, "MMDISTILL_OUTPUTS": str(tmp_path)}
    log = tmp_path / "first-launch.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cli(*sweep, outputs=tmp_path), cwd=REPO, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((j / "done").is_file() for j in jobs(tmp_path).values()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: (j / "done").is_file() for k, j in jobs(tmp_path).items()}
    assert sum(before.values()) == 1, (before, log.read_text()[-2000:])
    finished = next(k for k, d in before.items() if d)
    meta_before = (jobs(tmp_path)[finished] / "meta.json").read_text()
    started = {k for k, j in jobs(tmp_path).items() if not before[k] and (j / "meta.json").exists()}

    # Same sweep, overrides in another order: it finds the same folders.
    p = run("distill", "budget.pairs=10,6,8", *reversed(slow), "-m", outputs=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "already done, skipped" in p.stderr and "3/3 jobs done" in p.stderr
    after = jobs(tmp_path)
    assert sorted(after) == ["10", "6", "8"] and all((j / "done").is_file() for j in after.values())
    assert len(list((tmp_path / "multirun" / "distill").iterdir())) == 1  # one sweep folder
    assert (after[finished] / "meta.json").read_text() == meta_before  # not run again
    assert all(io.read_json(j / "meta.json")["status"] == "done" for j in after.values())
    for k in started:  # an interrupted job resumed in its own folder
        assert io.read_json(after[k] / "meta.json").get("resumed") == 1


def test_parallel_sweep_lists_failures_and_limits_threads(tmp_path: Path) -> None:
    p = run(
        "distill", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY,
        "budget.pairs=6,100000", outputs=tmp_path,
    )  # fmt: skip
    assert p.returncode == 1, p.stderr
    tail = p.stderr[p.stderr.index("jobs done") :]
    assert "1/2 jobs done" in p.stderr and "1 job(s) did not finish" in tail
    assert "budget.pairs=100000" in tail and "larger than the training set" in tail
    found = jobs(tmp_path)
    assert (found["6"] / "done").is_file() and not (found["100000"] / "done").exists()
    assert io.read_json(found["100000"] / "meta.json")["status"] == "failed"
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"torch threads: {threads}" in (found["6"] / "cli.log").read_text()


def test_slurm_launcher_config() -> None:
    env = dict(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "hydra/launcher=slurm", "--cfg",
         "hydra"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        assert p.returncode == 2 and "pip install 'mmdistill[slurm]'" in p.stderr
        pytest.skip("hydra-submitit-launcher not installed (pip install 'mmdistill[slurm]')")
    assert p.returncode == 0, p.stderr
    launcher = OmegaConf.create(p.stdout).hydra.launcher
    assert launcher._target_ == "hydra_plugins.mmdistill_launchers.submitit.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.cpus_per_task == 8
    given = OmegaConf.to_container(launcher)  # unresolved: hydra.sweep.dir is set at launch
    assert given["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"  # in the sweep folder


def test_a_sweep_cannot_print_one_config_nor_submit_without_slurm(tmp_path: Path) -> None:
    p = run("distill", "-m", "method=random,herding", "--cfg", "hydra", outputs=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --cfg shows one job, not a sweep: drop -m and give one value per swept key "
        "(e.g. method=random budget.pairs=100)"
    ], p.stderr
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if shutil.which("srun"):
        pytest.skip("a SLURM machine: the sweep would be submitted")
    p = run("distill", "-m", "hydra/launcher=slurm", *TINY, "budget.pairs=4,6", outputs=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith('error: hydra/launcher=slurm cannot submit here (Could not detect "srun"')
    ), p.stderr
    assert not jobs(tmp_path)  # nothing ran


def submitted(outputs: Path) -> int:
    """submitit jobs a sweep under outputs has submitted (one folder per job id)."""
    return sum(1 for d in outputs.rglob(".submitit/*") if d.name.isdigit())


def test_submitit_sweep_skips_finished_jobs_and_lists_failed_and_killed_ones(
    tmp_path: Path,
) -> None:
    """hydra/launcher=local: submitit's local executor, the SLURM launcher's code path (each
    point one process, all at once). One point fails in its job, one is killed outright (the
    OOM killer, a node failure); the third keeps its results, and the relaunch submits only
    the two unfinished jobs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = ["distill", "-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", *TINY]
    env = {**os.environ, "MMDISTILL_OUTPUTS": str(tmp_path)}
    log = tmp_path / "first-launch.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cli(*sweep, "budget.pairs=4,6,100000", outputs=tmp_path), cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        job = jobs(tmp_path).get("6")  # .hydra/ is written after the job's pid in .lock
        if job is not None:
            killed = int((job / ".lock").read_text())
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert proc.wait(timeout=300) == 1 and killed is not None, log.read_text()[-3000:]
    stderr = log.read_text()
    tail = stderr[stderr.index("jobs done") :]
    assert "1/3 jobs done" in stderr and "2 job(s) did not finish" in tail, stderr[-3000:]
    lines = {o.split(",")[0]: line for line in tail.splitlines() for o in [line.strip()]}
    assert "larger than the training set" in lines["budget.pairs=100000"]
    assert "ended without finishing" in lines["budget.pairs=6"]
    assert "its log: .submitit/" in lines["budget.pairs=6"]
    found = jobs(tmp_path)
    assert (found["4"] / "done").is_file() and (found["4"] / "results.json").is_file()
    assert io.read_json(found["6"] / "meta.json")["status"] == "failed"
    assert "torch threads: 1" in (found["4"] / "cli.log").read_text()  # cpus_per_task
    meta_before = (found["4"] / "meta.json").read_text()
    assert submitted(tmp_path) == 3

    p = run(*sweep, "budget.pairs=100000,6,4", outputs=tmp_path)
    assert p.returncode == 1, p.stderr
    assert f"already done, skipped: {found['4']}" in p.stderr  # before submission
    assert "2/3 jobs done" in p.stderr and "1 job(s) did not finish" in p.stderr
    assert submitted(tmp_path) == 5  # the finished job was not submitted again
    after = jobs(tmp_path)
    assert (after["6"] / "results.json").is_file() and (after["6"] / "done").is_file()
    assert (after["4"] / "meta.json").read_text() == meta_before  # not run again
    assert after["6"] == found["6"] and io.read_json(after["6"] / "meta.json")["status"] == "done"
