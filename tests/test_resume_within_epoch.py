"""A cell killed in the middle of an epoch resumes from the checkpoint written within it
(``step_checkpoint_seconds``) and ends exactly where an uninterrupted cell does: in memory and
streamed from RS5M shards, for methods with epoch-start decisions (EBA's thresholds)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rsnc_bench.backbones import BackboneConfig
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.methods import METHODS
from rsnc_bench.store import CellKey, ResultStore
from tests.rs5m_shards import write_release

from .conftest import TINY_SYNTHETIC


class Killed(BaseException):
    """Stands in for a killed job: not an Exception, so no result is written."""


def killed_once(base: str):
    """The registered method ``base``, killed before the loss of global step ``at`` the first time."""

    class KilledOnce(METHODS.get(base)):
        at, steps = None, 0

        def training_loss(self, batch):
            cls = type(self)
            cls.steps += 1
            if cls.steps == cls.at:
                cls.at = None
                raise Killed
            return super().training_loss(batch)

    KilledOnce.__doc__ = f"{base}, killed once within an epoch (a test double)"
    return METHODS.register(f"test-{base}-killed-within")(KilledOnce)


KILLED = {base: killed_once(base) for base in ("clip-ft", "rrsitr", "ebaker")}
CHECKPOINT_EVERY_STEP = ("checkpoint_seconds=0", "step_checkpoint_seconds=0")


def _killed_then_resumed(spec: CellSpec, store: ResultStore, at: int) -> dict:
    cls = METHODS.get(spec.key.method)
    cls.at, cls.steps = at, 0
    with pytest.raises(Killed):
        run_cell(spec, store)
    saved = torch.load(store.checkpoint_dir(spec.key) / "last.pt", weights_only=False)["state"]
    assert saved["partial"] is not None and saved["partial"]["steps"] > 0, "the checkpoint was not written within the epoch"
    return run_cell(spec, store)


def _same(resumed: dict, straight: dict) -> None:
    assert resumed["status"] == "complete", resumed.get("traceback") or resumed["error"]
    assert [e["loss"] for e in resumed["history"]] == [e["loss"] for e in straight["history"]]
    assert [e["logs"] for e in resumed["history"]] == [e["logs"] for e in straight["history"]]
    assert [e.get("detection") for e in resumed["history"]] == [e.get("detection") for e in straight["history"]]
    assert resumed["test"] == straight["test"]


# ebaker eliminates from epoch 2 (drop_epoch=1), by thresholds set at the epoch's start from a bank that moves within it
@pytest.mark.parametrize("base, options", [("clip-ft", ()), ("rrsitr", ()), ("ebaker", ("drop_epoch=1", "drop_ratio=0.3"))])
def test_a_cell_killed_within_an_epoch_resumes_exactly(tmp_path, synthetic, synthetic_root, base, options):
    key = CellKey(f"test-{base}-killed-within", "synthetic", "tiny-vit", "shuffle", 0.4, 42, 1)
    spec = CellSpec(key, data_root=str(synthetic_root), dataset_options=tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items()),
                    train_options=("epochs=2", "batch_size=48", *CHECKPOINT_EVERY_STEP), method_options=options)
    resumed = _killed_then_resumed(spec, ResultStore(tmp_path / "a"), at=8)  # step 3 of epoch 2 (5 steps an epoch)
    straight = run_cell(replace(spec), ResultStore(tmp_path / "b"))
    _same(resumed, straight)
    if base == "ebaker":
        assert resumed["history"][1]["logs"]["eliminated"] > 0


@pytest.mark.slow
def test_a_streamed_cell_killed_within_an_epoch_resumes_exactly(tmp_path):
    release = write_release(tmp_path / "release")
    key = CellKey("test-rrsitr-killed-within", "rs5m", "tiny-b32", "rrsitr", 0.4, 42, 3)
    spec = CellSpec(key, BackboneConfig("tiny-b32"), data_root=str(release.root),
                    train_options=("epochs=2", "batch_size=8", *CHECKPOINT_EVERY_STEP),
                    dataset_options=("val_rows=3", "test_rows=4", "canvas=32", "shuffle_buffer=8"))
    resumed = _killed_then_resumed(spec, ResultStore(tmp_path / "a"), at=3)  # step 3 of epoch 1 (6 steps an epoch)
    straight = run_cell(replace(spec), ResultStore(tmp_path / "b"))
    _same(resumed, straight)


def test_a_stream_checkpointed_by_two_ranks_refuses_to_resume_on_one(tmp_path):
    import numpy as np

    from rsnc_bench.data import load_dataset
    from rsnc_bench.engine.stream_data import StreamTrainData
    from rsnc_bench.errors import ConfigError

    release = write_release(tmp_path / "release")
    data = load_dataset("rs5m", release.root, options=dict(val_rows=3, test_rows=4, canvas=32, shuffle_buffer=8))
    train = StreamTrainData(data.stream(3), lambda captions: torch.zeros(len(captions), 4, dtype=torch.long))
    batches = train.epoch_batches(np.arange(train.n_rows), 8, torch.Generator().manual_seed(0), {"steps": 1, "read": [8, 8]})
    with pytest.raises(ConfigError, match="by 2 data-parallel rank"):
        next(batches)
