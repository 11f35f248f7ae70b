"""Frozen trunks' outputs per split, kept on disk across cells (engine/trunk_outputs.py)."""

from __future__ import annotations

import pytest
import torch

from rsnc_bench.backbones.base import BACKBONES
from rsnc_bench.engine.batches import Preprocess, SplitTensors
from rsnc_bench.engine.trunk_outputs import trunk_split
from tests.test_backbones_timm_hf import tiny_config

CPU = torch.device("cpu")


def frozen(bert_dir, seed: int = 0):
    torch.manual_seed(seed)
    return BACKBONES.get("timm-hf")(tiny_config(bert_dir, "frozen_trunks=true")).train()


def split(backbone, n_images: int = 5) -> SplitTensors:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    text = backbone.tokenize(["two planes", "a river", "green trees near a river", "many buildings", "a plane", "two planes"])
    return SplitTensors(images, text, torch.tensor([0, 1, 2, 3, 4, 0]))


def counting(memo) -> list[int]:
    calls, trunk = [], memo.trunk
    memo.trunk = lambda x: calls.append(len(x)) or trunk(x)
    return calls


def test_outputs_in_place_of_pixels_encode_exactly_as_the_pixels(bert_dir, tmp_path):
    backbone = frozen(bert_dir)
    pixels = split(backbone)
    outputs = trunk_split(pixels, backbone, tmp_path, CPU)
    assert outputs.images.is_floating_point() and len(outputs.images) == 5 and torch.equal(outputs.text, pixels.text)
    preprocess = Preprocess(backbone, augment=False)
    assert preprocess(outputs.images, CPU) is not None and torch.equal(preprocess(outputs.images, CPU), outputs.images)  # passed through
    reference = frozen(bert_dir)  # same weights, no memo filled: computes from the pixels
    for tokens in (False, True):
        got = backbone.encode_image(preprocess(outputs.images, CPU), tokens=tokens)
        want = reference.encode_image(preprocess(pixels.images, CPU), tokens=tokens)
        assert torch.allclose(got.embedding, want.embedding, atol=1e-6)
        if tokens:
            assert torch.allclose(got.tokens, want.tokens, atol=1e-6)
    calls = counting(backbone._text_trunk)
    got = backbone.encode_text(pixels.text).embedding
    assert calls == [] and torch.allclose(got, reference.encode_text(pixels.text).embedding, atol=1e-6)  # the memo was filled


def test_a_later_cell_reads_the_files_and_other_weights_compute_their_own(bert_dir, tmp_path):
    first = frozen(bert_dir)
    want = trunk_split(split(first), first, tmp_path, CPU).images
    files = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert len(files) == 2 and {f.split("-")[0] for f in files} == {"image", "text"}

    later = frozen(bert_dir)  # another cell: same trunks, a fresh process memo
    image_calls, text_calls = counting(later._image_trunk), counting(later._text_trunk)
    got = trunk_split(split(later), later, tmp_path, CPU)
    assert image_calls == [] and text_calls == [] and torch.equal(got.images, want)
    assert len(later._text_trunk) == 5  # five distinct captions, read from the file

    other = frozen(bert_dir, seed=1)  # another random image trunk (the text trunk is the saved BERT): a file of its own
    assert not torch.equal(trunk_split(split(other), other, tmp_path, CPU).images, want)
    assert len(list(tmp_path.glob("image-*.pt"))) == 2 and len(list(tmp_path.glob("text-*.pt"))) == 1


def test_a_truncated_file_is_computed_again_and_replaced(bert_dir, tmp_path):
    backbone = frozen(bert_dir)
    want = trunk_split(split(backbone), backbone, tmp_path, CPU).images
    image_file = next(tmp_path.glob("image-*.pt"))
    image_file.write_bytes(image_file.read_bytes()[:100])
    again = frozen(bert_dir)
    assert torch.equal(trunk_split(split(again), again, tmp_path, CPU).images, want)
    assert torch.equal(torch.load(image_file, weights_only=True), want)


def test_a_copy_of_the_backbone_shares_the_held_rows(bert_dir, tmp_path):
    """NPC's siamese and OSA's estimator are deep copies: they read the rows the cell filled."""
    import copy

    backbone = frozen(bert_dir)
    pixels = split(backbone)
    trunk_split(pixels, backbone, tmp_path, CPU)
    twin = copy.deepcopy(backbone)
    assert twin._text_trunk.rows is backbone._text_trunk.rows and twin._text_trunk.module is twin.text_model
    calls = counting(twin._text_trunk)
    assert torch.allclose(twin.encode_text(pixels.text).embedding, backbone.encode_text(pixels.text).embedding)
    assert calls == []


def test_kers_masked_captions_are_filled_once_per_grid(bert_dir, tmp_path):
    """A method's derived texts (KER's masked copies) go through the frozen text trunk once, from the shared file."""
    from rsnc_bench.engine.trunk_outputs import fill_text
    from rsnc_bench.methods import EpochContext
    from rsnc_builtin_methods.ebaker import Ebaker

    captions = ["two planes near the airport", "a river", "green trees near a river", "many buildings"]
    method = Ebaker(frozen(bert_dir))
    masked = method.derived_texts(captions, method.backbone.tokenizer)
    assert (masked == method.backbone.tokenizer.mask_token_id).any()
    fill_text(method.backbone._text_trunk, masked, tmp_path)
    later = Ebaker(frozen(bert_dir))
    later.start_epoch(EpochContext(1, 5, 4, 1, CPU, captions, later.backbone.tokenizer))
    assert torch.equal(later.ker_ids, masked)  # start_epoch builds what derived_texts gave
    fill_text(later.backbone._text_trunk, later.derived_texts(captions, later.backbone.tokenizer), tmp_path)
    calls = counting(later.backbone._text_trunk)
    later.backbone.encode_text(masked)
    assert calls == []  # read from the file the first method wrote


def test_a_worker_waits_for_the_file_another_is_computing(tmp_path):
    import threading
    import time

    from rsnc_bench.engine import trunk_outputs

    if trunk_outputs.fcntl is None:
        pytest.skip("no flock on this platform")
    path = tmp_path / "image-key.pt"
    started = threading.Event()

    def slow() -> torch.Tensor:
        started.set()
        time.sleep(0.3)
        return torch.ones(2)

    first = threading.Thread(target=trunk_outputs._cached, args=(path, slow))
    first.start()
    started.wait()
    calls = []
    got = trunk_outputs._cached(path, lambda: calls.append(1) or torch.zeros(2))
    first.join()
    assert calls == [] and torch.equal(got, torch.ones(2))  # waited and read the first's file
