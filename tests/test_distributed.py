"""One cell data-parallel (``engine/distributed.py``): two gloo processes on the CPU, started with
the environment torchrun gives its workers, take the same steps as one process with the same
global batch; rank 0 alone writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rsnc_bench.engine import distributed
from rsnc_bench.grid import run_grid
from rsnc_bench.grid_config import GridConfig
from rsnc_bench.methods import METHODS
from rsnc_bench.store import ResultStore
from rsnc_builtin_methods.rrsitr import Rrsitr

from .conftest import TINY_SYNTHETIC

TINY_OPTS = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grid(out: Path, root: Path, methods: tuple[str, ...], **kw) -> GridConfig:
    values = dict(methods=methods, backbones=("tiny-vit",), noise=(0.4,), noise_protocol="shuffle", seeds=(3,), noise_seeds=(42,),
                  device="cpu", workers=1, data_root=str(root), dataset_options=TINY_OPTS,
                  train=("epochs=2", "batch_size=48", "checkpoint_seconds=0"), out=str(out))
    return GridConfig(**{**values, **kw})


def _torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _rank_main(rank: int, world: int, port: int, grid: GridConfig, cache: str) -> None:
    """One torchrun worker: its environment, then the grid as `rsnc-bench run` runs it."""
    os.environ.update(_torchrun_env(rank, world, port), RSNC_BENCH_CACHE=cache)
    try:
        run_grid(grid)
    finally:
        if distributed.active():
            torch.distributed.destroy_process_group()


def _results(out: Path) -> dict[str, dict]:
    return {doc["key"]["method"]: doc for doc in ResultStore(out).iter_results()}


def _losses(doc: dict) -> list[float]:
    return [epoch["loss"] for epoch in doc["history"]]


# A batch of 48 (5 steps an epoch): over longer runs float rounding (halves encoded apart, gradients
# averaged) can move one row's loss across a hard threshold (RRSITR's gamma at 15 steps an epoch),
# and the trajectories then part by a step's worth, as two single-process runs on different hardware would.
@pytest.mark.parametrize("methods", [("clip-ft", "rrsitr"),
                                     pytest.param(("npc", "ebaker", "iebaker", "pmpguard", "osa"), marks=pytest.mark.slow)])
def test_two_gloo_ranks_take_the_single_process_steps(tmp_path, synthetic, synthetic_root, tiny_cache, methods):
    single = tmp_path / "single"
    run_grid(_grid(single, synthetic_root, methods))
    parallel = tmp_path / "parallel"
    mp.spawn(_rank_main, args=(2, _free_port(), _grid(parallel, synthetic_root, methods), str(tiny_cache)), nprocs=2)

    one, two = _results(single), _results(parallel)
    assert set(one) == set(two) == set(methods)
    for method in methods:
        a, b = one[method], two[method]
        assert b["status"] == "complete", b.get("traceback") or b["error"]
        assert b["environment"]["data_parallel_ranks"] == 2 and "data_parallel_ranks" not in a["environment"]
        assert len(_losses(a)) == len(_losses(b)) == 2
        assert _losses(b) == pytest.approx(_losses(a), rel=1e-4), method
        for ea, eb in zip(a["history"], b["history"]):
            assert eb["logs"] == pytest.approx(ea["logs"], rel=1e-3, abs=1e-5), method  # RRSITR's self-paced split among them
            assert ("detection" in eb) == ("detection" in ea) == (method != "clip-ft")
            if "detection" in ea:
                assert eb["detection"] == pytest.approx(ea["detection"], abs=1e-6), method
        assert b["timings"]["train_seconds"] > 0
    # rank 0 alone wrote: one result per cell, no checkpoint left, nothing written twice
    files = sorted(p.relative_to(parallel).as_posix() for p in parallel.rglob("*") if p.is_file())
    assert not [f for f in files if ".tmp-" in f or f.endswith(".pt")], files


def test_without_a_process_group_everything_is_local():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.share(10) == (0, 10, 10)
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    grad = torch.ones(3)
    distributed.average_gradients([grad, None])
    assert torch.equal(grad, torch.ones(3))


@pytest.mark.slow
def test_torchrun_runs_a_cell_across_two_processes(tmp_path, synthetic, synthetic_root, tiny_cache):
    """The command users run: torchrun --nproc-per-node 2 -m rsnc_bench run ... (gloo on the CPU)."""
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               "-m", "rsnc_bench", "run", "--methods", "clip-ft", "--backbone", "tiny-vit", "--noise", "0.4", "--seeds", "3",
               "--data-root", str(synthetic_root), "--device", "cpu", "--out", str(out),
               *[arg for opt in TINY_OPTS for arg in ("-o", opt)], "-t", "epochs=2", "-t", "batch_size=16"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RSNC_BENCH_CACHE": str(tiny_cache)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (doc,) = list(ResultStore(out).iter_results())
    assert doc["status"] == "complete" and doc["environment"]["data_parallel_ranks"] == 2
    assert done.stdout.count("1 cells run (0 failed)") == 1  # rank 0 reports, once
    assert (out / "report" / "report.html").is_file()


class Interrupt(BaseException):
    """Stands in for a killed job: not an Exception, so the cell writes no result."""


@METHODS.register("test-rrsitr-interrupted")
class InterruptedRrsitr(Rrsitr):
    """rrsitr stopped at the start of epoch 2 when $RSNC_TEST_INTERRUPT is set (a test double)."""

    def start_epoch(self, ctx):
        if ctx.epoch == 2 and os.environ.get("RSNC_TEST_INTERRUPT"):
            raise Interrupt
        super().start_epoch(ctx)


def _interrupted_rank(rank: int, world: int, port: int, grid: GridConfig, cache: str) -> None:
    os.environ["RSNC_TEST_INTERRUPT"] = "1"
    with pytest.raises(Interrupt):
        _rank_main(rank, world, port, grid, cache)


@pytest.mark.slow
def test_a_data_parallel_cell_resumes_from_rank_0s_checkpoint(tmp_path, synthetic, synthetic_root, tiny_cache):
    out = tmp_path / "parallel"
    grid = _grid(out, synthetic_root, ("test-rrsitr-interrupted",))
    mp.spawn(_interrupted_rank, args=(2, _free_port(), grid, str(tiny_cache)), nprocs=2)
    (ckpt,) = [p for p in out.rglob("last.pt")]
    assert torch.load(ckpt, weights_only=False)["state"]["epoch"] == 1 and not list(ResultStore(out).iter_results())
    mp.spawn(_rank_main, args=(2, _free_port(), grid, str(tiny_cache)), nprocs=2)  # every rank resumes from it
    straight = tmp_path / "single"
    run_grid(_grid(straight, synthetic_root, ("test-rrsitr-interrupted",)))
    (resumed,), (single,) = _results(out).values(), _results(straight).values()
    assert resumed["status"] == "complete" and len(resumed["history"]) == 2
    assert _losses(resumed) == pytest.approx(_losses(single), rel=1e-4)
    assert not list(out.rglob("*.pt"))


@pytest.mark.slow
def test_torchrun_with_bad_input_stops_every_rank_with_one_line(tmp_path, synthetic_root):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               "-m", "rsnc_bench", "run", "--methods", "clip-fx", "--data-root", str(synthetic_root), "--device", "cpu",
               "--out", str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count("unknown method 'clip-fx'") == 1, output[-2000:]
    assert "Traceback" not in done.stdout
