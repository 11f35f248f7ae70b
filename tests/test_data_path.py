"""The data path: splits read from the memory-mapped image cache, and batches built ahead of the
step by a background worker. Neither may change a number."""

from __future__ import annotations

import threading

import pytest
import torch

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data.images import MappedImages, SplitImages
from rsnc_bench.engine import batches as batches_module
from rsnc_bench.engine.batches import split_tensors
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.engine.prefetch import prefetched
from rsnc_bench.engine.trainer import TrainConfig
from rsnc_bench.errors import ConfigError
from rsnc_bench.store import CellKey, ResultStore

from .conftest import TINY_SYNTHETIC


def test_mapped_images_index_like_the_in_memory_tensor(synthetic, tmp_path):
    loader = SplitImages(synthetic["train"], None, cache_dir=tmp_path)
    memory, mapped = loader.stacked(), loader.mapped()
    assert isinstance(mapped, MappedImages) and mapped.shape == tuple(memory.shape) and len(mapped) == len(memory)
    ids = torch.tensor([5, 0, 5, len(memory) - 1])
    assert torch.equal(mapped[ids], memory[ids]) and torch.equal(mapped[2:7], memory[2:7])
    out = mapped[2:7]
    out.zero_()  # a copy out of the read-only map: writable, and the file is untouched
    assert out.dtype == torch.uint8 and torch.equal(mapped[2:7], memory[2:7])


def test_image_storage_choices(synthetic, tmp_path, monkeypatch):
    backbone = build_backbone(BackboneConfig("tiny-vit"))
    split = synthetic["test"]
    assert isinstance(split_tensors(split, backbone, tmp_path, images="disk").images, MappedImages)
    assert torch.is_tensor(split_tensors(split, backbone, tmp_path, images="memory").images)
    assert torch.is_tensor(split_tensors(split, backbone, tmp_path, images="auto").images)  # tiny: fits
    monkeypatch.setattr(batches_module, "available_memory", lambda: 1000)  # a split larger than a quarter of it
    assert isinstance(split_tensors(split, backbone, tmp_path, images="auto").images, MappedImages)
    assert torch.is_tensor(split_tensors(split, backbone, None, images="auto").images)  # no cache file: memory
    with pytest.raises(ConfigError, match="images='disk' reads the decoded images from the image cache"):
        split_tensors(split, backbone, None, images="disk")
    with pytest.raises(ConfigError, match="train option images='ram'; choose one of memory, disk, auto"):
        TrainConfig(images="ram")
    with pytest.raises(ConfigError, match="prefetch=-1"):
        TrainConfig(prefetch=-1)


def test_prefetched_keeps_order_raises_where_the_worker_failed_and_stops_with_its_consumer():
    assert list(prefetched(iter(range(10)), depth=3)) == list(range(10))
    assert list(prefetched(iter(range(4)), depth=0)) == list(range(4))

    def failing():
        yield 1
        raise ValueError("image 7 is unreadable")

    seen = []
    with pytest.raises(ValueError, match="image 7"):
        for item in prefetched(failing(), depth=2):
            seen.append(item)
    assert seen == [1]

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "rsnc-batches" for t in threading.enumerate())
    assert len(produced) <= 4  # the worker ran at most ``depth`` (+ the one in hand) ahead, then stopped


def _cell(root, *train_options):
    key = CellKey("clip-ft", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1)
    options = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
    return CellSpec(key, data_root=str(root), dataset_options=options, train_options=("epochs=2", "batch_size=16", *train_options))


def test_disk_images_and_prefetching_give_the_numbers_of_the_in_memory_inline_path(tmp_path, synthetic_root):
    inline = run_cell(_cell(synthetic_root, "images=memory", "prefetch=0"), ResultStore(tmp_path / "inline"))
    streamed = run_cell(_cell(synthetic_root, "images=disk", "prefetch=3"), ResultStore(tmp_path / "streamed"))
    assert inline["status"] == streamed["status"] == "complete", (inline.get("error"), streamed.get("error"))
    for part in ("test", "test_last", "val", "detection", "selected_epoch"):
        assert inline[part] == streamed[part], part
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "data_seconds")} for e in h]  # noqa: E731
    assert strip(inline["history"]) == strip(streamed["history"])
    assert all(0 <= e["data_seconds"] <= e["seconds"] for e in streamed["history"])


def test_a_zeroshot_grid_encodes_each_split_once_and_reports_the_same_numbers(tmp_path, synthetic_root, monkeypatch):
    from rsnc_bench.engine import evaluate as evaluate_module

    calls = []
    real = evaluate_module.encode_split
    monkeypatch.setattr(evaluate_module, "encode_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
    store = ResultStore(tmp_path)
    docs = [run_cell(CellSpec(CellKey("zeroshot", "synthetic", "tiny-vit", "shuffle", rate, 0, 1), data_root=str(synthetic_root),
                              dataset_options=options), store) for rate in (0.0, 0.2, 0.4)]
    assert [d["status"] for d in docs] == ["complete"] * 3
    assert len(calls) == 2  # val and test, once each, for three cells
    assert len(list((store.root / "cache").glob("*/embeddings/*.pt"))) == 2
    assert docs[0]["test"] == docs[1]["test"] == docs[2]["test"] and docs[0]["val"] == docs[2]["val"]
    fresh = run_cell(CellSpec(CellKey("zeroshot", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1), data_root=str(synthetic_root),
                              dataset_options=options), ResultStore(tmp_path / "fresh"))
    assert fresh["test"] == docs[2]["test"] and fresh["val"] == docs[2]["val"]  # what the cache returned is what encoding gives


def test_the_encoding_key_changes_with_weights_preprocessing_and_data(synthetic):
    from rsnc_bench.engine.embedding_cache import encoding_key
    from rsnc_bench.methods import METHODS

    method = METHODS.get("zeroshot")(build_backbone(BackboneConfig("tiny-vit")))
    data = split_tensors(synthetic["test"], method.backbone)
    key = encoding_key(method, data.images, data.text, "fp32")
    assert encoding_key(method, data.images, data.text, "fp32") == key
    assert encoding_key(method, data.images[:-1], data.text, "fp32") != key  # data
    assert encoding_key(method, data.images, data.text.flip(0), "fp32") != key
    assert encoding_key(method, data.images, data.text, "bf16") != key  # precision
    method.backbone.mean = (0.5, 0.5, 0.5)
    moved = encoding_key(method, data.images, data.text, "fp32")
    assert moved != key  # preprocessing
    with torch.no_grad():
        next(method.parameters()).add_(1e-3)
    assert encoding_key(method, data.images, data.text, "fp32") != moved  # weights
