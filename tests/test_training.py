"""The trainer and grid runner on tiny synthetic data: learning, selection, resume, skip,
failures that are recorded while the grid goes on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data.datasets import load_dataset
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.engine.signals import PairScores
from rsnc_bench.engine.trainer import Trainer
from rsnc_bench.errors import ConfigError, RsncError
from rsnc_bench.grid import GridConfig, run_grid, usable_cores
from rsnc_bench.grid_config import load_grid
from rsnc_bench.methods import METHODS, LossOutput
from rsnc_bench.noise import make_manifest
from rsnc_bench.store import CellKey, ResultStore

from .conftest import TINY_SYNTHETIC

TINY_OPTS = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
ClipFt = METHODS.get("clip-ft")


def spec(root, method="clip-ft", rate=0.0, epochs=3, **kw) -> CellSpec:
    key = CellKey(method, "synthetic", "tiny-vit", "shuffle", rate, 0, 1)
    return CellSpec(key, data_root=str(root), dataset_options=TINY_OPTS, train_options=(f"epochs={epochs}", "batch_size=16"), **kw)


class Interrupt(BaseException):
    """Stands in for Ctrl-C or a killed job: not an Exception, so no result is written."""


@METHODS.register("test-interrupted")
class InterruptedOnce(ClipFt):
    """clip-ft that is killed at the start of epoch 2 the first time."""

    armed = True

    def start_epoch(self, ctx):
        if ctx.epoch == 2 and type(self).armed:
            type(self).armed = False
            raise Interrupt


@METHODS.register("test-broken")
class Broken(ClipFt):
    """A method with a bug."""

    def training_loss(self, batch):
        raise RuntimeError("shape mismatch in my head")


@METHODS.register("test-nan")
class NaNLoss(ClipFt):
    """A method whose loss blows up."""

    def training_loss(self, batch):
        out = super().training_loss(batch)
        return LossOutput(out.loss * float("nan"))


def test_clip_ft_learns_and_records_everything(tmp_path, synthetic_root):
    doc = run_cell(spec(synthetic_root, epochs=4), ResultStore(tmp_path))
    assert doc["status"] == "complete", doc.get("traceback")
    losses = [e["loss"] for e in doc["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    best = max(doc["history"], key=lambda e: e["val"]["mr"])
    assert doc["selected_epoch"] == best["epoch"] and doc["val"] == best["val"]
    zeroshot = run_cell(spec(synthetic_root, method="zeroshot"), ResultStore(tmp_path))
    assert doc["test"]["mr"] > zeroshot["test"]["mr"]
    assert zeroshot["selected_epoch"] == 0 and zeroshot["timings"]["train_seconds"] == 0
    assert doc["timings"]["samples_per_second"] > 0 and doc["environment"]["packages"]["torch"]
    assert doc["config"]["train"]["epochs"] == 4 and doc["noise"]["manifest_hash"]
    assert doc["config"]["capabilities"]["role"] == "baseline" and doc["config"]["capabilities"]["trains"]
    sources = doc["config"]["train_sources"]  # which layer set each budget value
    assert sources["preset_hints"] == {"lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 20, "batch_size": 64, "epochs": 5}
    assert sources["user"] == {"epochs": 4, "batch_size": 16} and sources["method_defaults"]["lr"] == 7e-6
    assert doc["config"]["dataset"]["val"]["source"] == "native" and doc["config"]["dataset"]["val"]["images_sha256"]
    assert doc["timings"]["precision"] == "fp32" and doc["timings"]["eval_precision"] == "fp32"
    assert not ResultStore(tmp_path).checkpoint_dir(spec(synthetic_root).key).exists()  # cleaned up


def test_selected_weights_are_kept_in_memory_and_written_on_request(tmp_path, synthetic_root):
    """A short cell writes no checkpoint while it trains (checkpoint_seconds), yet tests the
    selected epoch; keep_checkpoints writes that epoch's weights at the end."""
    cell = spec(synthetic_root, epochs=4)
    cell = replace(cell, train_options=cell.train_options + ("keep_checkpoints=true", "checkpoint_seconds=3600"))
    store = ResultStore(tmp_path)
    doc = run_cell(cell, store)
    folder = store.checkpoint_dir(cell.key)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt"]
    assert torch.load(folder / "best.pt", weights_only=False)["epoch"] == doc["selected_epoch"]


class Planted:
    """A pickle that creates ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_resume_checkpoint_runs_no_code_and_is_ignored(tmp_path, synthetic_root, capsys):
    cell = spec(synthetic_root, epochs=2)
    store = ResultStore(tmp_path)
    folder = store.checkpoint_dir(cell.key)
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": "x", "model": Planted(marker)}, folder / "last.pt")
    doc = run_cell(cell, store)
    assert not marker.exists()
    assert doc["status"] == "complete" and len(doc["history"]) == 2  # trained from the start
    assert "ignoring" in capsys.readouterr().out


def test_a_planted_selected_checkpoint_runs_no_code_and_stops_the_cell(tmp_path):
    """best.pt is read when a resumed run selects an epoch from before the interruption."""
    trainer = Trainer.__new__(Trainer)  # only what load_selected touches
    trainer.ckpt_dir, trainer.device, trainer.fingerprint, trainer._best = tmp_path, torch.device("cpu"), "cell", None
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": "cell", "model": Planted(marker)}, tmp_path / "best.pt")
    with pytest.raises(RsncError, match="best.pt.*--force"):
        trainer.load_selected()
    assert not marker.exists()


@pytest.mark.slow
def test_a_cell_killed_before_its_result_is_written_resumes(tmp_path, synthetic_root, monkeypatch, capsys):
    cell = spec(synthetic_root, rate=0.4)
    cell = replace(cell, train_options=cell.train_options + ("checkpoint_seconds=0",))
    clean = run_cell(cell, ResultStore(tmp_path / "clean"))
    store = ResultStore(tmp_path / "killed")
    write = store.write

    def killed(doc):
        raise Interrupt()

    monkeypatch.setattr(store, "write", killed)
    with pytest.raises(Interrupt):
        run_cell(cell, store)
    assert (store.checkpoint_dir(cell.key) / "last.pt").exists()  # kept until the result is on disk
    monkeypatch.setattr(store, "write", write)
    capsys.readouterr()
    again = run_cell(cell, store)
    assert "resuming from epoch 2" in capsys.readouterr().out
    assert again["test"] == clean["test"] and not store.checkpoint_dir(cell.key).exists()


def test_a_forced_rerun_that_fails_keeps_the_complete_result(tmp_path, synthetic_root, monkeypatch, capsys):
    import rsnc_bench.engine.cell as cell_module

    cell, store = spec(synthetic_root, epochs=1), ResultStore(tmp_path)
    first = run_cell(cell, store)

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cell_module, "_train_and_evaluate", broken)
    again = run_cell(cell, store)
    assert again["status"] == "failed" and "out of memory" in again["error"]
    kept = store.read(cell.key)
    assert kept["status"] == "complete" and kept["test"] == first["test"]
    assert "previous complete result stays" in capsys.readouterr().out


@METHODS.register("test-epoch-scores")
class EpochScores(ClipFt):
    """clip-ft that scores every row it sees with the number of the epoch being trained."""

    def start_epoch(self, ctx):
        self.epoch = ctx.epoch

    def training_loss(self, batch):
        out = super().training_loss(batch)
        out.clean = torch.full(batch.rows.shape, float(self.epoch))
        return out


def test_the_selected_epochs_row_scores_are_saved_not_the_last_epochs(tmp_path, synthetic_root, monkeypatch):
    import rsnc_bench.engine.trainer as trainer_module

    real_evaluate, calls = trainer_module.evaluate, []

    def val_best_at_epoch_2(method, split, device, chunk, scorers=None, cache=None):
        result = real_evaluate(method, split, device, chunk, scorers)
        calls.append(1)
        best = len(calls) == 2  # the second validation, after epoch 2
        result[""] = replace(result[""], i2t_r1=100.0 if best else 0.0, i2t_r5=100.0 if best else 0.0)
        return result

    monkeypatch.setattr(trainer_module, "evaluate", val_best_at_epoch_2)
    store = ResultStore(tmp_path)
    doc = run_cell(spec(synthetic_root, method="test-epoch-scores", rate=0.4, epochs=3), store)
    assert doc["status"] == "complete" and doc["selected_epoch"] == 2
    saved = store.read_scores(doc["detection_scores"])
    seen = saved["clean_score"][~np.isnan(saved["clean_score"])]
    assert len(seen) and (seen <= 2.0).all() and (seen == 2.0).any()  # the last epoch's would be 3


METHODS.register("test-epoch-scores-clean-rows", rows="clean")(EpochScores)  # a data variant: never sees the noisy rows


def test_the_signals_cover_every_manifest_row_when_some_are_never_seen(tmp_path, synthetic_root):
    """The harness's per-row arrays are as long as the manifest from the first epoch on, also
    when the highest rows are never trained on (here: noisy rows a clean-rows variant skips)."""
    store = ResultStore(tmp_path)
    doc = run_cell(spec(synthetic_root, method="test-epoch-scores-clean-rows", rate=0.8, epochs=1), store)
    assert doc["status"] == "complete", doc["error"]
    saved = store.read_scores(doc["detection_scores"])
    assert not saved["clean"][-1]  # the last row is noisy, so it is never seen
    assert len(saved["clean_score"]) == doc["noise"]["n_rows"] and np.isnan(saved["clean_score"][~saved["clean"]]).all()
    assert doc["history"][0]["detection"]["n_scored"] <= doc["noise"]["train_rows_used"]


def test_train_config_layers(tmp_path, synthetic_root):
    plain = replace(spec(synthetic_root), train_options=()).train_config
    assert plain.lr == 2e-3 and plain.batch_size == 64  # tiny-vit's preset hints over clip-ft's paper budget
    pretrained = replace(spec(synthetic_root), train_options=(), backbone=replace(spec(synthetic_root).backbone, name="ViT-B-32")).train_config
    assert pretrained.lr == 7e-6 and pretrained.epochs == 50 and pretrained.weight_decay == 0.7  # methods.md 3.9
    assert spec(synthetic_root).train_config.epochs == 3  # the user's value wins


def test_oracle_trains_on_clean_rows_only(tmp_path, synthetic_root):
    doc = run_cell(spec(synthetic_root, method="oracle", rate=0.4, epochs=1), ResultStore(tmp_path))
    assert doc["status"] == "complete"
    assert doc["noise"]["train_rows_used"] == doc["noise"]["n_rows"] - doc["noise"]["n_noisy"]


@pytest.mark.slow
def test_interrupted_cell_resumes_and_matches_an_uninterrupted_run(tmp_path, synthetic_root):
    store = ResultStore(tmp_path / "a")
    interrupted = spec(synthetic_root, method="test-interrupted", rate=0.4)
    interrupted = replace(interrupted, train_options=interrupted.train_options + ("checkpoint_seconds=0",))  # every epoch
    with pytest.raises(Interrupt):
        run_cell(interrupted, store)
    assert store.read(interrupted.key) is None
    saved = torch.load(store.checkpoint_dir(interrupted.key) / "last.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1
    resumed = run_cell(interrupted, store)
    assert resumed["status"] == "complete" and [e["epoch"] for e in resumed["history"]] == [1, 2, 3]
    InterruptedOnce.armed = False
    straight = run_cell(interrupted, ResultStore(tmp_path / "b"))
    assert resumed["test"] == straight["test"] and resumed["history"][-1]["loss"] == straight["history"][-1]["loss"]


def test_grid_skips_complete_cells_and_records_failures(tmp_path, synthetic_root):
    grid = GridConfig(methods=("test-broken", "test-nan", "zeroshot"), noise=(0.0,), seeds=(1,), noise_seeds=(0,), workers=1,
                      data_root=str(synthetic_root), dataset_options=TINY_OPTS, train=("epochs=1", "batch_size=16"), out=str(tmp_path))
    docs, skipped, _ = run_grid(grid)
    status = {d["key"]["method"]: d for d in docs}
    assert skipped == 0 and set(status) == {"test-broken", "test-nan", "zeroshot"}
    assert status["test-broken"]["status"] == "failed" and "shape mismatch in my head" in status["test-broken"]["error"]
    assert "RuntimeError" in status["test-broken"]["traceback"]
    assert status["test-nan"]["status"] == "diverged" and "nan" in status["test-nan"]["error"]
    assert status["zeroshot"]["status"] == "complete"
    docs, skipped, _ = run_grid(grid)  # failed cells are retried, the complete one is skipped
    assert skipped == 1 and {d["key"]["method"] for d in docs} == {"test-broken", "test-nan"}
    docs, skipped, _ = run_grid(replace(grid, methods=("zeroshot",), force=True))
    assert skipped == 0 and len(docs) == 1


def test_a_changed_manifest_under_a_complete_cell_stops_the_grid(tmp_path, synthetic_root):
    grid = GridConfig(methods=("zeroshot",), noise=(0.4,), seeds=(1,), noise_seeds=(0,), workers=1, noise_protocol="shuffle",
                      data_root=str(synthetic_root), dataset_options=TINY_OPTS, out=str(tmp_path))
    (doc,), _, _ = run_grid(grid)
    path = Path(doc["noise"]["manifest"])
    train = load_dataset("synthetic", synthetic_root, options=TINY_SYNTHETIC)["train"]
    make_manifest(train, "synthetic", "shuffle", 0.4, 0).save(path, force=True)  # the same manifest: accepted
    assert run_grid(grid) == ([], 1, 0)
    make_manifest(train, "synthetic", "shuffle", 0.4, 7).save(path, force=True)  # another one under its name
    with pytest.raises(ConfigError, match="changed since .* restore it"):
        run_grid(grid)


@pytest.mark.slow
def test_several_devices_run_cells_in_parallel_worker_processes(tmp_path, synthetic_root, monkeypatch):
    import rsnc_bench.grid as grid_module

    monkeypatch.setattr(grid_module, "worker_plan", lambda name, workers: (["cpu", "cpu"], None))  # stands in for two GPUs
    grid = GridConfig(methods=("zeroshot",), noise=(0.0, 0.4), seeds=(1,), noise_seeds=(0,), device="cuda",
                      data_root=str(synthetic_root), dataset_options=TINY_OPTS, out=str(tmp_path))
    docs, skipped, _ = run_grid(grid)
    assert skipped == 0 and sorted(d["key"]["noise_rate"] for d in docs) == [0.0, 0.4]
    assert all(d["status"] == "complete" and d["environment"]["device"] == "cpu" for d in docs)


def test_cpu_workers_are_one_per_core_and_single_threaded(monkeypatch):
    import rsnc_bench.grid as grid_module

    monkeypatch.setattr(grid_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(grid_module, "usable_cores", lambda: 4)
    assert grid_module.worker_plan("auto") == (["cpu"] * 4, 1)
    assert grid_module.worker_plan("cpu", 2) == (["cpu"] * 2, 2)
    assert grid_module.worker_plan("auto", 1) == (["cpu"], 4)
    assert load_grid(None, {"workers": "3"}).workers == 3
    with pytest.raises(ConfigError, match="workers must be a whole number"):
        load_grid(None, {"workers": "two"})


@pytest.mark.slow
def test_cpu_worker_processes_record_one_thread(tmp_path, synthetic_root):
    grid = GridConfig(methods=("clip-ft",), noise=(0.0, 0.4), seeds=(1,), noise_seeds=(0,), device="cpu", workers=2,
                      backbones=("tiny-vit",), data_root=str(synthetic_root), dataset_options=TINY_OPTS,
                      train=("epochs=1", "batch_size=16"), out=str(tmp_path))
    docs, _, _ = run_grid(grid)
    assert [d["status"] for d in docs] == ["complete", "complete"]
    assert {d["environment"]["torch_threads"] for d in docs} == {max(1, usable_cores() // 2)}
    # a single remaining cell runs in this process, on a worker's thread count, which is then restored
    before = torch.get_num_threads()
    (alone,), _, _ = run_grid(replace(grid, seeds=(2,), noise=(0.0,)))
    assert alone["environment"]["torch_threads"] == max(1, usable_cores() // 2)
    assert torch.get_num_threads() == before


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip-ft", "rrsitr", "iebaker", "pmpguard"])
def test_same_seed_and_thread_count_give_identical_results(tmp_path, synthetic_root, method):
    """Two runs of one cell from the pretrained preset, in one process with the same thread count
    (as two grid runs would be), agree exactly: metrics, per-epoch history, detection."""
    key = CellKey(method, "synthetic", "tiny-clip", "rrsitr", 0.4, 42, 3)
    cell = CellSpec(key, BackboneConfig("tiny-clip"), data_root=str(synthetic_root),
                    dataset_options=TINY_OPTS, train_options=("epochs=2", "batch_size=16"))
    first = run_cell(cell, ResultStore(tmp_path / "a"))
    second = run_cell(cell, ResultStore(tmp_path / "b"))
    assert first["status"] == second["status"] == "complete", first.get("error")
    assert first["environment"]["torch_threads"] == torch.get_num_threads() and first["environment"]["device"] == "cpu"
    for part in ("test", "test_last", "val", "detection", "selected_epoch"):
        assert first[part] == second[part], part
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "data_seconds")} for e in h]  # noqa: E731
    assert strip(first["history"]) == strip(second["history"])


def test_the_selected_epochs_row_scores_survive_an_interruption_in_best_pt(tmp_path):
    """After a resume, the selected epoch's weights and row scores come back from best.pt."""
    from rsnc_bench.engine.trainer import TrainConfig

    method = ClipFt(build_backbone(BackboneConfig("tiny-vit")), ClipFt.config_type())
    before = Trainer(method, TrainConfig(), None, None, None, 1, tmp_path, "cell")
    before._best = method.state_dict()
    before._best_scores = PairScores(np.array([0.5, np.nan, 2.0]), np.array([False, True, False]), {"local": np.array([1.0, 2.0, 3.0])})
    before._save_best(2)
    after = Trainer(method, TrainConfig(), None, None, None, 1, tmp_path, "cell")
    after.load_selected()
    scores = after.selected_scores()
    np.testing.assert_array_equal(scores.clean_score, [0.5, np.nan, 2.0])
    np.testing.assert_array_equal(scores.flagged_noisy, [False, True, False])
    np.testing.assert_array_equal(scores.others["local"], [1.0, 2.0, 3.0])
