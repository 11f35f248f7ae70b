"""Methods with state beyond their weights (NPC's bank and siamese moments, OSA's beta and frozen
estimator) resume an interrupted cell exactly: the same metrics, losses and clean-ness signals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.methods import METHODS
from rsnc_bench.store import CellKey, ResultStore

from .conftest import TINY_SYNTHETIC


class Interrupt(BaseException):
    """Stands in for a killed job: not an Exception, so no result is written."""


def interrupted_once(base: str):
    """The registered method ``base``, killed at the start of epoch 2 the first time."""

    class InterruptedOnce(METHODS.get(base)):
        armed = True

        def start_epoch(self, ctx):
            if ctx.epoch == 2 and type(self).armed:
                type(self).armed = False
                raise Interrupt
            super().start_epoch(ctx)

    InterruptedOnce.__doc__ = f"{base}, interrupted once (a test double)"
    return METHODS.register(f"test-{base}-interrupted")(InterruptedOnce)


INTERRUPTED = {base: interrupted_once(base) for base in ("npc", "osa")}


@pytest.mark.slow
@pytest.mark.parametrize("base, options", [("npc", ("bank_batch_size=32",)), ("osa", ("beta_pairs=16",))])
def test_an_interrupted_cell_resumes_exactly(tmp_path, synthetic_root, base, options):
    cls = INTERRUPTED[base]
    key = CellKey(f"test-{base}-interrupted", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1)
    spec = CellSpec(key, data_root=str(synthetic_root), dataset_options=tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items()),
                    train_options=("epochs=3", "batch_size=16", "checkpoint_seconds=0"), method_options=options)
    store = ResultStore(tmp_path / "a")
    with pytest.raises(Interrupt):
        run_cell(spec, store)
    assert torch.load(store.checkpoint_dir(key) / "last.pt", weights_only=False)["state"]["epoch"] == 1
    resumed = run_cell(spec, store)
    assert resumed["status"] == "complete", resumed.get("traceback") or resumed["error"]
    cls.armed = False
    straight = run_cell(replace(spec), ResultStore(tmp_path / "b"))
    assert resumed["test"] == straight["test"]
    assert [e["loss"] for e in resumed["history"]] == [e["loss"] for e in straight["history"]]
    assert [e["detection"] for e in resumed["history"]] == [e["detection"] for e in straight["history"]]
    assert [e["logs"] for e in resumed["history"]] == [e["logs"] for e in straight["history"]]
