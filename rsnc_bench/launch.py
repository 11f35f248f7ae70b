"""Grids through submitit: ``rsnc-bench run --launcher debug|local|slurm``.

The submitting process plans the grid as a plain run does (``grid.plan_grid``: every input checked,
complete cells skipped, the grid recorded in the store), then submits the missing cells as
submitit jobs, each a ``CellTask`` that runs the cells given to it through ``run_cell`` under
their locks, as a plain run does. The store is the only coordination point: tasks on any node
write their results there, ``rsnc-bench report`` reads it while they run, and the cell locks
(``cell_lock.py``, a lease that holds across hosts) keep two runners off one cell.

- ``debug``: submitit's DebugExecutor, the tasks one after another in this process;
- ``local``: submitit's LocalExecutor, one job per worker of the plain run's plan (one
  single-threaded job per CPU core, or one per GPU), each with its share of the cells;
- ``slurm``: one Slurm job array, ``slurm.cells_per_task`` cells per array task.

With debug and local this process waits for the jobs and prints what a plain run prints; a Slurm
array is left to run. A ``CellTask`` is checkpointable: when Slurm (or a local job's time limit)
signals it, submitit pickles the task with the cells it has finished and requeues it; the
requeued task skips those and resumes the interrupted cell from its last saved epoch
(``<cell>.ckpt/last.pt``).

submitit is an optional dependency: ``pip install "rsnc-bench[slurm]"``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rsnc_bench.cell_lock import OWNER_ENV
from rsnc_bench.engine import distributed
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.errors import RsncError
from rsnc_bench.grid import GridPlan, plan_grid, torch_threads, usable_cores, worker_plan
from rsnc_bench.grid_config import GridConfig
from rsnc_bench.store import CellKey, ResultStore

JOBS_FOLDER = "jobs"  # submitit's pickles and logs, inside the store: <out>/jobs/<job id>_...
SLURM_DEFAULT_MINUTES = 240
LOCAL_DEFAULT_MINUTES = 7 * 24 * 60  # a local job has no time limit unless one is given


class LaunchError(RsncError):
    """A launcher that cannot run here (submitit or Slurm missing, a refused submission)."""


def _submitit(launcher: str):
    try:
        import submitit
    except ImportError:
        raise LaunchError(f'--launcher {launcher} needs submitit, an optional extra: pip install "rsnc-bench[slurm]" '
                          "(or run without --launcher)") from None
    return submitit


def check_launcher(grid: GridConfig):
    """The submitit module, once the launcher is known to work here (before anything is planned)."""
    submitit = _submitit(grid.launcher)
    if grid.launcher == "slurm":
        missing = [name for name in ("sbatch", "srun") if shutil.which(name) is None]
        if missing:
            raise LaunchError(f"--launcher slurm needs Slurm's {' and '.join(missing)} on PATH; run it on the cluster's login node, "
                              "or use --launcher local on this machine")
    return submitit


class TaskOutcome(NamedTuple):
    docs: list[dict]  # the documents of the cells this task ran
    elsewhere: list[dict]  # the keys (as dicts) of cells another runner held or wrote meanwhile


class CellTask:
    """The callable of one submitit job: run ``cells`` (each with the state its result file had
    when the grid was planned) in order, with ``run_cell``, and return what they gave.

    ``device`` None: the cell's own choice (``--device``); ``plan_here``: decide device and
    threads in the job, from what it was given (a Slurm task's GPUs and cores). Submitit calls
    ``checkpoint`` when the job is preempted or reaches its time limit: the task requeues itself
    as it is then, so the cells it finished are not run again and the interrupted one resumes
    from its saved epoch."""

    def __init__(self, root: str, cells: list[tuple[CellSpec, Any]], force: bool, device: str | None,
                 threads: int | None, plan_here: str | None = None, quiet: bool = True):
        self.root, self.cells, self.force = root, cells, force
        self.device, self.threads, self.plan_here, self.quiet = device, threads, plan_here, quiet
        self.docs: list[dict] = []
        self.elsewhere: list[dict] = []
        self.started: list[dict] = []  # keys of cells begun by an earlier run of this task (before a requeue)

    def keys(self) -> list[CellKey]:
        return [spec.key for spec, _ in self.cells]

    def __call__(self) -> TaskOutcome:
        from rsnc_bench.progress import silence
        from rsnc_bench.results import summary_line

        owner = _job_owner()
        if owner:
            os.environ[OWNER_ENV] = owner  # a requeued run of this job takes over its own stale locks at once
        if self.quiet:
            silence()  # the job's log gets a line per cell, not progress bars
        device, threads = self.device, self.threads
        if self.plan_here is not None:
            devices, threads = worker_plan(self.plan_here, 1)
            device = None if self.plan_here == "auto" else devices[0]
        ranks = _cell_ranks(self.plan_here or "auto")  # several tasks in this job: each cell data-parallel over them
        if ranks is not None:
            device, threads = ranks
        store = ResultStore(self.root)
        finished = {CellKey.from_dict(key) for key in [*(doc["key"] for doc in self.docs), *self.elsewhere]}
        with torch_threads(threads):
            for spec, planned in self.cells:
                key = spec.key
                if key in finished:
                    continue
                resumed = key.as_dict() in self.started
                if not resumed:
                    self.started.append(key.as_dict())
                self._log(lambda: f"{key.label()}: {'resuming' if resumed else 'starting'}")
                # a forced cell clears its checkpoints once, not again when its requeued task resumes it
                doc = run_cell(spec, store, device, planned=planned, force=self.force and not resumed)
                if doc is None:
                    self.elsewhere.append(key.as_dict())
                    self._log(lambda: f"{key.label()}: run by another runner")
                else:
                    self.docs.append(doc)
                    self._log(lambda: summary_line(doc))
        return TaskOutcome(list(self.docs), list(self.elsewhere))

    def _log(self, line: Callable[[], str]) -> None:
        if self.quiet and distributed.is_main():  # into the job's own log (with debug, the submitting process prints the summaries)
            print(line(), flush=True)

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook: this task, in its current state, submitted again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _cell_ranks(device: str) -> tuple[str, int | None] | None:
    """When this submitit job has several tasks (``slurm.gpus_per_cell`` > 1: one task per GPU), join
    them into one process group, as torchrun would (``engine/distributed.py``), and return this
    task's (device, torch threads); None for a job of one task."""
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        tasks = JobEnvironment().num_tasks
    except (ImportError, RuntimeError, KeyError):
        return None
    if tasks <= 1:
        return None
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    started = distributed.start_from_env(device)
    cpu = not started.startswith("cuda")
    return started, max(1, usable_cores() // env.local_world_size) if cpu else None


def _job_owner() -> str | None:
    """This submitit job's id, which a requeued run keeps (None outside a submitit job)."""
    try:
        from submitit import JobEnvironment

        env = JobEnvironment()
    except (ImportError, RuntimeError, KeyError):
        return None
    host = "" if env.cluster == "slurm" else f"{socket.gethostname()}:"  # a local job id is a pid: unique on its host only
    return f"{env.cluster}:{host}{env.job_id}"


def _tasks(grid: GridConfig, plan: GridPlan) -> list[CellTask]:
    root, todo = str(plan.store.root.resolve()), plan.todo
    if grid.launcher == "slurm":  # each task decides on its own node
        size = grid.slurm.cells_per_task
        return [CellTask(root, todo[i:i + size], grid.force, None, None, plan_here=grid.device) for i in range(0, len(todo), size)]
    workers = plan.worker_devices(grid.device)  # as a plain run: one worker per core or GPU, with its thread count
    shares = [todo[i::len(workers)] for i in range(len(workers))]
    return [CellTask(root, share, grid.force, device, plan.threads, quiet=grid.launcher != "debug")
            for share, device in zip(shares, workers) if share]


def _executor(submitit, grid: GridConfig, folder: Path, plan: GridPlan):
    """The launcher's submitit executor, logging to ``folder/<job id>/``."""
    slurm, logs = grid.slurm, folder / "%j"
    if grid.launcher == "debug":
        return submitit.DebugExecutor(logs)
    if grid.launcher == "local":
        executor = submitit.LocalExecutor(logs)
        params: dict[str, Any] = {"timeout_min": slurm.time or LOCAL_DEFAULT_MINUTES}
        if any(device.startswith("cuda") for device in plan.devices):  # every job sees the GPUs; its cells name theirs (cuda:N)
            import torch

            params["gpus_per_node"] = torch.cuda.device_count()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            if visible and all(part.strip().isdigit() for part in visible.split(",")):
                params["visible_gpus"] = [int(part) for part in visible.split(",")]
        executor.update_parameters(**params)
        return executor
    executor = submitit.SlurmExecutor(logs)
    ranks = max(1, slurm.gpus_per_cell)  # a cell on several GPUs: one task (a data-parallel rank) per GPU
    params = {"job_name": "rsnc-bench", "time": slurm.time or SLURM_DEFAULT_MINUTES, "partition": slurm.partition,
              "gpus_per_node": slurm.gpus_per_cell or None, "ntasks_per_node": ranks if ranks > 1 else None,
              "cpus_per_task": None if slurm.cpus_per_cell is None else max(1, slurm.cpus_per_cell // ranks),
              "mem": None if slurm.mem_gb is None else _memory(slurm.mem_gb), "array_parallelism": slurm.array_parallelism,
              "setup": list(slurm.setup) or None, "additional_parameters": slurm.sbatch_options() or None}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _memory(gb: float) -> str:
    return f"{int(gb)}G" if float(gb).is_integer() else f"{max(1, round(gb * 1024))}M"


class Launched(NamedTuple):
    waited: bool  # False: a Slurm array left running (docs and unfinished are then empty)
    docs: list[dict]
    skipped: int  # cells complete before the grid started
    elsewhere: int  # cells another runner held or wrote meanwhile
    unfinished: list[str]  # labels of the cells of jobs that ended without a result (killed, cancelled)
    job_ids: list[str]


def launch_grid(grid: GridConfig, on_done: Callable[[dict], None] = lambda doc: None,
                echo: Callable[[str], None] = print) -> Launched:
    """Plan the grid, submit its missing cells through submitit, and (debug, local) wait for them."""
    submitit = check_launcher(grid)
    plan = plan_grid(grid)
    skipped = len(plan.cells) - len(plan.todo)
    if not plan.todo:
        return Launched(True, [], skipped, 0, [], [])
    folder = plan.store.root.resolve() / JOBS_FOLDER
    tasks = _tasks(grid, plan)
    executor = _executor(submitit, grid, folder, plan)
    try:
        jobs = executor.submit_array(tasks)
    except (OSError, RuntimeError, ValueError) as exc:  # sbatch refused it (bad partition, account, ...) or is broken
        detail = " ".join(str(exc).split())[:400]
        raise LaunchError(f"{grid.launcher} submission of {len(plan.todo)} cells failed: {detail}") from None
    cells = len(plan.todo)
    if grid.launcher == "slurm":
        array = jobs[0].job_id.split("_")[0]
        what = f"job array {array} ({len(jobs)} tasks" if len(jobs) > 1 else f"job {array} (1 task"
        echo(f"submitted {cells} cells as Slurm {what}, {grid.slurm.cells_per_task} cell(s) each)")
        echo(f"logs: {jobs[0].paths.stdout.parent.parent}/{array}{'_<task>' if len(jobs) > 1 else ''}/ ; results: {plan.store.root}")
        echo(f"watch: squeue -j {array}; rsnc-bench report --out {grid.out}   (once it ends, rerun this command to retry what failed)")
        return Launched(False, [], skipped, 0, [], [job.job_id for job in jobs])
    echo(f"submitted {cells} cells as {len(jobs)} {grid.launcher} job(s) {', '.join(job.job_id for job in jobs)}; logs in {folder}")
    launched = _wait(jobs, tasks, plan.store, skipped, on_done, echo)
    with contextlib.suppress(OSError):
        (folder / "%j").rmdir()  # submitit's local controller makes this empty folder of the unformatted name
    return launched


def _wait(jobs, tasks: list[CellTask], store: ResultStore, skipped: int, on_done, echo) -> Launched:
    docs, elsewhere, unfinished = [], 0, []
    try:
        for job, task in zip(jobs, tasks):
            try:
                outcome = job.result()
            except Exception as exc:  # the job died (killed, out of memory) or was cancelled
                reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                echo(f"job {job.job_id} did not finish ({reason[:200]}); its log: {job.paths.stdout}")
                outcome = TaskOutcome([], [])
                for key in task.keys():  # what it finished before it died is in the store
                    doc = store.read(key) if store.is_complete(key) else None
                    if doc is None:
                        unfinished.append(key.label())
                    else:
                        outcome.docs.append(doc)
            for doc in outcome.docs:
                docs.append(doc)
                on_done(doc)
            elsewhere += len(outcome.elsewhere)
    except KeyboardInterrupt:
        for job in jobs:  # a local job outlives this process unless cancelled
            job.cancel(check=False)
        raise
    if unfinished:
        echo(f"not done: {', '.join(unfinished)}")
    return Launched(True, docs, skipped, elsewhere, unfinished, [job.job_id for job in jobs])
