"""Grids through submitit (debug, local, slurm) on CPU: the same results as a plain run, a
preempted task requeued and resumed, a killed task's cell resumed by the next submission, and the
Slurm array's sbatch file and tasks (with a stand-in sbatch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rsnc_bench.cell_lock import OWNER_ENV
from rsnc_bench.grid import run_grid
from rsnc_bench.grid_config import GridConfig
from rsnc_bench.launch import CellTask, launch_grid
from rsnc_bench.methods import METHODS
from rsnc_bench.store import ResultStore

from .test_cli import TINY, run
from .test_training import TINY_OPTS

submitit = pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]
ClipFt = METHODS.get("clip-ft")
MARKER_ENV = "RSNC_TEST_LAUNCH_MARKER"  # a file: the method interrupts its job only while it is missing


def _interrupt_once(how: signal.Signals) -> None:
    marker = os.environ.get(MARKER_ENV)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), how)


@METHODS.register("test-preempted-once")
class PreemptedOnce(ClipFt):
    """clip-ft whose job gets submitit's preemption signal at the start of epoch 2, once (after
    epoch 1's checkpoint with checkpoint_seconds=0), as Slurm signals a preempted job."""

    def start_epoch(self, ctx):
        if ctx.epoch == 2:
            _interrupt_once(signal.SIGUSR2)


@METHODS.register("test-killed-once")
class KilledOnce(ClipFt):
    """clip-ft whose job is killed (SIGKILL: no handler, no cleanup) at the start of epoch 2, once."""

    def start_epoch(self, ctx):
        if ctx.epoch == 2:
            _interrupt_once(signal.SIGKILL)


def tiny_grid(out: Path, root: Path, **kw) -> GridConfig:
    values = dict(methods=("clip-ft",), backbones=("tiny-vit",), noise=(0.0, 0.4), seeds=(3,), noise_seeds=(42,), device="cpu",
                  workers=2, data_root=str(root), dataset_options=TINY_OPTS, train=("epochs=2", "batch_size=16"), out=str(out))
    return GridConfig(**{**values, **kw})


TIMING = ("seconds", "data_seconds")


def results(out: Path) -> dict[str, dict]:
    """Every result under ``out`` by path: what must match between runs (no timings)."""
    found = {}
    for path in sorted((Path(out) / "synthetic").rglob("*.json")):
        if ".ckpt" in path.as_posix():
            continue
        doc = json.loads(path.read_text())
        found[path.relative_to(out).as_posix()] = {
            "status": doc["status"], "test": doc["test"], "val": doc["val"], "test_last": doc["test_last"],
            "selected_epoch": doc["selected_epoch"], "threads": doc["environment"]["torch_threads"],
            "history": [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in doc["history"]]}
    return found


@pytest.fixture(scope="module")
def plain(tmp_path_factory, synthetic_root) -> dict[str, dict]:
    """The tiny grid run the plain way (two workers, as on a 2-core machine by default)."""
    out = tmp_path_factory.mktemp("plain")
    docs, skipped, _ = run_grid(tiny_grid(out, synthetic_root))
    assert len(docs) == 2 and skipped == 0
    return results(out)


@pytest.fixture
def job_env(monkeypatch):
    """Job processes import this test module (its methods): the repository on their path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_the_debug_launcher_gives_a_plain_runs_results(tmp_path, synthetic_root, plain):
    out = tmp_path / "debug"
    done = []
    launched = launch_grid(tiny_grid(out, synthetic_root, launcher="debug"), on_done=done.append, echo=lambda line: None)
    assert launched.waited and len(launched.docs) == 2 and len(done) == 2 and not launched.unfinished
    assert len(launched.job_ids) == 2  # one job per worker of the plain run's plan
    assert results(out) == plain
    again = launch_grid(tiny_grid(out, synthetic_root, launcher="debug"), echo=lambda line: None)
    assert again.waited and again.docs == [] and again.skipped == 2 and again.job_ids == []


@pytest.mark.slow
def test_the_local_launcher_gives_a_plain_runs_results(tmp_path, synthetic_root, plain, job_env):
    out = tmp_path / "local"
    result = run("run", "--backbone", "tiny-vit", "--methods", "clip-ft", "--noise", "0,0.4", "--seeds", "3", "--data-root", synthetic_root,
                 *TINY, "-t", "epochs=2", "-t", "batch_size=16", "--device", "cpu", "--workers", "2", "--out", out, "--launcher", "local")
    assert result.exit_code == 0, result.output
    assert "submitted 2 cells as 2 local job(s)" in result.output and f"logs in {out.resolve()}/jobs" in result.output
    assert "2 cells run (0 failed), 0 already complete" in result.output and "| clip-ft " in result.output
    assert results(out) == plain
    logs = sorted((out / "jobs").rglob("*_log.out"))
    assert len(logs) == 2 and all("test mR" in log.read_text() for log in logs)  # a line per cell in each job's log


def test_a_requeued_task_skips_the_cells_it_finished_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    """What submitit pickles at a preemption (``checkpoint``) is the task as it then is."""
    import rsnc_bench.launch as launch

    from .test_training import spec

    cells = [(spec(tmp_path, rate=rate), None) for rate in (0.0, 0.4, 0.8)]
    task = CellTask(str(tmp_path), cells, force=True, device="cpu", threads=None, quiet=False)
    first, second, _ = (cell.key for cell, _ in cells)
    task.docs.append({"key": first.as_dict(), "status": "complete"})  # finished before the preemption
    task.started += [first.as_dict(), second.as_dict()]  # the second was running
    delayed = task.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is task
    delayed.dump(tmp_path / "requeued.pkl")
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    calls = []
    monkeypatch.setattr(launch, "run_cell", lambda spec, store, device, planned, force: calls.append((spec.key, force)) or {
        "key": spec.key.as_dict(), "status": "complete"})
    outcome = requeued.result()
    assert calls == [(second, False), (cells[2][0].key, True)]  # resumed without clearing its checkpoints; the third forced afresh
    assert [doc["key"] for doc in outcome.docs] == [first.as_dict(), second.as_dict(), cells[2][0].key.as_dict()]


def _uninterrupted(out: Path, grid: GridConfig, marker: Path) -> dict:
    marker.write_text("already interrupted")
    run_grid(replace(grid, out=str(out), launcher="inline"))
    return results(out)


@pytest.mark.slow
def test_a_preempted_local_task_is_requeued_and_resumes_its_cell(tmp_path, synthetic_root, monkeypatch, job_env):
    """The job gets the preemption signal mid-cell: submitit checkpoints the task, the local
    executor requeues it, and the cell resumes from its last epoch with an uninterrupted run's numbers."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    grid = tiny_grid(tmp_path / "local", synthetic_root, methods=("test-preempted-once",), noise=(0.4,), workers=1, launcher="local",
                     train=("epochs=3", "batch_size=16", "checkpoint_seconds=0"))
    launched = launch_grid(grid, echo=lambda line: None)
    assert marker.exists()  # it was signalled
    assert launched.waited and not launched.unfinished and [d["status"] for d in launched.docs] == ["complete"]
    (doc,) = launched.docs
    assert [epoch["epoch"] for epoch in doc["history"]] == [1, 2, 3]
    log = next((tmp_path / "local" / "jobs").rglob("*_log.err")).read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    expected = _uninterrupted(tmp_path / "straight", grid, marker)
    assert results(tmp_path / "local") == expected
    assert not list((tmp_path / "local").rglob("*.lock")) and not list((tmp_path / "local").rglob("*.ckpt"))


@pytest.mark.slow
def test_a_killed_local_task_leaves_its_cell_to_the_next_submission_which_resumes_it(tmp_path, synthetic_root, monkeypatch, job_env):
    marker, out = tmp_path / "marker", tmp_path / "local"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    grid = tiny_grid(out, synthetic_root, methods=("test-killed-once",), noise=(0.4,), workers=1, launcher="local",
                     train=("epochs=3", "batch_size=16", "checkpoint_seconds=0"))
    lines = []
    killed = launch_grid(grid, echo=lines.append)
    assert killed.waited and killed.docs == [] and len(killed.unfinished) == 1, lines
    assert any("did not finish" in line for line in lines)
    (lock,) = out.rglob("*.lock")  # left by the killed job: a dead holder's lease
    assert json.loads(lock.read_text())["pid"] == int(marker.read_text())
    assert len(list(out.rglob("last.pt"))) == 1
    resumed = launch_grid(grid, echo=lines.append)
    assert resumed.waited and [d["status"] for d in resumed.docs] == ["complete"] and not resumed.unfinished
    logs = "".join(p.read_text() for p in (out / "jobs").rglob("*_log.out"))
    assert "took over the lock of pid" in logs and "its process is gone" in logs
    assert "resuming from epoch 1" in logs  # a new task starts the cell; the trainer resumes it from last.pt
    assert results(out) == _uninterrupted(tmp_path / "straight", grid, marker)
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.ckpt"))


def _fake_slurm(folder: Path) -> Path:
    """``sbatch`` and ``srun`` stand-ins: sbatch keeps the script it was given and answers with a job id."""
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n')
    (folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (folder / name).chmod(0o755)
    return folder


def test_slurm_submits_the_missing_cells_as_one_job_array(tmp_path, synthetic_root, monkeypatch):
    bin_dir = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "runs"
    result = run("run", "--backbone", "tiny-vit", "--methods", "clip-ft", "--noise", "0,0.4", "--seeds", "3", "--data-root", synthetic_root,
                 *TINY, "-t", "epochs=2", "-t", "batch_size=16", "--device", "cpu", "--out", out,
                 "--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", "30", "--slurm-cpus", "4",
                 "--slurm-mem-gb", "8", "--slurm-parallel", "1", "--slurm-setup", "source /shared/venv/bin/activate",
                 "--slurm-opt", "account=proj42")
    assert result.exit_code == 0, result.output
    assert "submitted 2 cells as Slurm job array 4242 (2 tasks, 1 cell(s) each)" in result.output
    assert f"rsnc-bench report --out {out}" in result.output and "cells run" not in result.output
    script = (bin_dir / "submitted.sh").read_text()
    jobs = out.resolve() / "jobs"
    for line in ["#SBATCH --partition=gpu", "#SBATCH --array=0-1%1", "#SBATCH --time=30", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=8G", "#SBATCH --account=proj42", "#SBATCH --signal=USR2@90", "#SBATCH --job-name=rsnc-bench",
                 f"#SBATCH --output={jobs}/%A_%a/%A_%a_0_log.out", "source /shared/venv/bin/activate"]:
        assert line in script.splitlines(), (line, script)
    assert "gpus-per-node" not in script
    tasks = [submitit.helpers.DelayedSubmission.load(jobs / f"4242_{i}" / f"4242_{i}_submitted.pkl").function for i in (0, 1)]
    assert [[key.noise_rate for key in task.keys()] for task in tasks] == [[0.0], [0.4]]
    assert all(task.plan_here == "cpu" and task.root == str(out.resolve()) for task in tasks)
    assert json.loads((out / "grid.json").read_text())["config"]["slurm_partition"] == "gpu"


@pytest.mark.slow
def test_a_slurm_array_task_runs_its_cell_as_slurm_would_start_it(tmp_path, synthetic_root, monkeypatch):
    """Array task 0 started the way the sbatch script starts it (submitit's entry point, Slurm's
    variables): it runs its cell into the store; `report` reads the store meanwhile, and a plain
    run then finds that cell complete and runs the other."""
    bin_dir = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "runs"
    grid = tiny_grid(out, synthetic_root, launcher="slurm")
    assert not launch_grid(grid, echo=lambda line: None).waited
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "PYTHONPATH": str(REPO)}
    env.pop(OWNER_ENV, None)
    task = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(out.resolve() / "jobs" / "%j")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert task.returncode == 0, task.stderr[-3000:]
    outcome = submitit.core.utils.pickle_load(out / "jobs" / "4242_0" / "4242_0_0_result.pkl")
    assert outcome[0] == "success" and [d["status"] for d in outcome[1].docs] == ["complete"]
    assert "starting" in task.stdout and "test mR" in task.stdout
    store = ResultStore(out)
    assert [doc["key"]["noise_rate"] for doc in store.iter_results()] == [0.0]
    report = run("report", "--out", out)
    assert report.exit_code == 0 and "1 missing and 0 failed cells listed" in report.output, report.output
    rest = run_grid(replace(grid, launcher="inline"))
    assert len(rest.docs) == 1 and rest.skipped == 1


@pytest.mark.slow
def test_a_slurm_task_with_two_gpus_per_cell_runs_it_data_parallel(tmp_path, synthetic_root, monkeypatch, plain):
    """slurm.gpus_per_cell = 2: the array task has two Slurm tasks (one per GPU), started here as
    srun starts them (on the CPU, gloo); they run the cell as two data-parallel ranks, rank 0
    writes it, and its numbers are a single process's to float rounding."""
    bin_dir = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "runs"
    grid = tiny_grid(out, synthetic_root, launcher="slurm", noise=(0.0,), slurm_gpus_per_cell=2, slurm_cpus_per_cell=2)
    assert not launch_grid(grid, echo=lambda line: None).waited
    script = (bin_dir / "submitted.sh").read_text().splitlines()
    assert {"#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=1"} <= set(script), script
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "PYTHONPATH": str(REPO)}
    env.pop(OWNER_ENV, None)
    tasks = [subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", str(out.resolve() / "jobs" / "%j")],
                              env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    logs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][1][-3000:] + logs[1][1][-3000:]
    assert "test mR" in logs[0][0] and "test mR" not in logs[1][0]  # rank 0 logs the cell
    (doc,) = ResultStore(out).iter_results()
    assert doc["status"] == "complete" and doc["environment"]["data_parallel_ranks"] == 2
    single = next(v for k, v in plain.items() if "r0-" in k)
    assert [e["loss"] for e in doc["history"]] == pytest.approx([e["loss"] for e in single["history"]], rel=1e-4)
