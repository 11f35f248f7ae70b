"""The shared pipeline's image path (methods.md 2.6): torchvision's RandomResizedCrop sampling,
batched, from native-resolution training images; evaluation in fp32 whatever autocast is active."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data import load_dataset
from rsnc_bench.engine.batches import Preprocess, split_tensors
from rsnc_bench.engine.evaluate import encode_split
from rsnc_bench.engine.scoring import EncodedSplit
from rsnc_bench.methods import METHODS

SCALE, RATIO = (0.9, 1.0), (3 / 4, 4 / 3)
DRAWS = 6000


def preprocess(size: int = 48, seed: int = 0) -> Preprocess:
    backbone = SimpleNamespace(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Preprocess(backbone, augment=True, generator=torch.Generator().manual_seed(seed))


def torchvision_boxes(height: int, width: int, n: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    return np.array([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)], dtype=np.float64)


def box_statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, float]:
    top, left, h, w = boxes.T
    area = h * w / (height * width)
    distortion = np.maximum(w / h, h / w)
    return {"below_floor": np.mean(area < SCALE[0]), "full": np.mean((h == height) & (w == width)),
            "area_mean": area.mean(), "area_q10": np.quantile(area, 0.1), "area_q90": np.quantile(area, 0.9),
            "distortion_max": distortion.max(), "distortion_mean": distortion.mean()}


@pytest.mark.parametrize("height, width", [(256, 256), (256, 200)])  # square, and one that often falls back
def test_crop_boxes_follow_torchvisions_distribution(height, width):
    sizes = torch.tensor([[height, width]]).repeat(DRAWS, 1)
    ours = np.stack([t.numpy() for t in preprocess().crop_boxes(sizes)], axis=1).astype(np.float64)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    theirs = box_statistics(torchvision_boxes(height, width, DRAWS), height, width)
    mine = box_statistics(ours, height, width)
    for name in ("below_floor", "full"):
        assert mine[name] == pytest.approx(theirs[name], abs=0.025), name
    for name in ("area_mean", "area_q10", "area_q90", "distortion_mean"):
        assert mine[name] == pytest.approx(theirs[name], abs=0.004), name
    assert mine["distortion_max"] <= theirs["distortion_max"] + 0.01
    if height == width:  # the old clamped single draw: 44.6 % below the floor, distortion up to 1.22, never the full image
        assert mine["below_floor"] < 0.1 and mine["distortion_max"] < 1.15 and mine["full"] > 0.05


def test_crop_boxes_are_seeded_and_placed_uniformly():
    sizes = torch.tensor([[224, 224]]).repeat(4000, 1)
    first, again = preprocess(seed=5).crop_boxes(sizes), preprocess(seed=5).crop_boxes(sizes)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    top, _, h, _ = first
    slack = (224 - h).double()
    assert 0.45 < (top.double() / slack.clamp_min(1))[slack > 10].mean() < 0.55


def test_resized_crop_matches_pil_crop_then_bicubic_resize():
    rng = np.random.default_rng(0)
    noise = (rng.random((40, 32, 3)) * 255).astype(np.uint8)
    pixels = np.array(Image.fromarray(noise).resize((100, 128), Image.BILINEAR))  # smooth content, 128 x 100
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    for top, left, h, w in [(10, 5, 100, 90), (0, 0, 128, 100), (20, 30, 60, 40)]:
        box = [torch.tensor([v]) for v in (top, left, h, w)]
        ours = preprocess().resized_crop(x, *box)[0].permute(1, 2, 0).numpy() * 255
        pil = np.asarray(Image.fromarray(pixels).crop((left, top, left + w, top + h)).resize((48, 48), Image.BICUBIC), dtype=np.float64)
        assert np.abs(ours - pil).mean() < 0.6 and np.abs(ours - pil).max() < 4, (top, left, h, w)


def test_training_images_keep_their_native_resolution(tmp_path):
    backbone = build_backbone(BackboneConfig("tiny-vit"))  # 48 px model
    data = load_dataset("synthetic", tmp_path, options=dict(n_train=8, n_val=4, n_test=4, image_size=64))
    train = split_tensors(data["train"], backbone, native=True)
    val = split_tensors(data["val"], backbone)
    assert train.images.shape[-2:] == (64, 64) and (train.sizes == 64).all()  # the drawn size, not the model's
    assert val.images.shape[-2:] == (backbone.image_size,) * 2 == (48, 48) and val.sizes is None
    batch = Preprocess(backbone, augment=True, generator=torch.Generator().manual_seed(0))(train.images[:5], torch.device("cpu"), train.sizes[:5])
    assert batch.shape == (5, 3, backbone.image_size, backbone.image_size)


def test_evaluation_scores_are_fp32_under_an_outer_autocast(synthetic):
    torch.manual_seed(0)
    method = METHODS.get("clip-ft")(build_backbone(BackboneConfig("tiny-vit"))).eval()
    data = split_tensors(synthetic["test"], method.backbone)
    device = torch.device("cpu")

    def scores():
        texts, images = encode_split(method, data, device)
        assert texts.embedding.dtype == images.embedding.dtype == torch.float32
        return torch.cat(list(EncodedSplit(method, texts, images, chunk=16).blocks()))

    plain = scores()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # the context is live
        under_autocast = scores()
    assert torch.equal(plain, under_autocast)
    assert len(torch.unique(plain[0])) == plain.shape[1]  # no bf16 ties
