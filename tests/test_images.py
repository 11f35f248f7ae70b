"""Image decoding, resizing and the decoded-image cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rsnc_bench.data.images as images_module
from rsnc_bench.data.images import SplitImages, load_image
from rsnc_bench.data.split import build_split
from rsnc_bench.errors import ImageReadError


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("RGB", "TIFF"), ("RGB", "JPEG")])
def test_decode_convert_resize_and_centre_crop(tmp_path, mode, fmt):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white centre band on a wide image
    path = tmp_path / f"wide.{fmt.lower()}"
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.mean() > 200  # the crop kept the centre band
    assert out.flags.writeable


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg: cannot read image"):
        load_image(path, 16)


def test_cache_is_built_once_and_reused_without_decoding(synthetic, tmp_path, monkeypatch):
    split = synthetic["val"]
    plain = SplitImages(split, 24)
    cached = SplitImages(split, 24, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("val-24px-*.npy"))) == 1
    for i in (0, len(split.images) - 1):
        assert plain[i].shape == (3, 24, 24)
        assert (plain[i] == cached[i]).all()

    expected = plain[3]

    def no_decoding(*_):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(images_module, "load_image", no_decoding)
    again = SplitImages(split, 24, cache_dir=tmp_path)
    assert (again[3] == expected).all()
    with pytest.raises(AssertionError, match="decoded although cached"):
        SplitImages(split, 32, cache_dir=tmp_path)  # another size is another cache file


def test_native_images_share_a_padded_canvas_and_keep_their_sizes(tmp_path):
    """Training splits keep each image's own resolution; images of other sizes sit top-left on the
    split's largest canvas, their true sizes alongside (the crop never reaches the padding)."""
    (tmp_path / "a.png").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 20, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((24, 32, 3), 100, dtype=np.uint8)).save(tmp_path / "b.png")
    split = build_split("train", tmp_path, ["a.png", "b.png"], ["x", "y"], ["", ""], lambda name: "")
    images = SplitImages(split, None)
    assert images.sizes().tolist() == [[30, 20], [24, 32]]
    stacked = images.stacked()
    assert stacked.shape == (2, 3, 30, 32)
    assert (stacked[0, :, :30, :20] == 200).all() and (stacked[0, :, :, 20:] == 0).all()
    assert (stacked[1, :, :24, :32] == 100).all() and (stacked[1, :, 24:, :] == 0).all()
    cached = SplitImages(split, None, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("train-native-*.npy"))) == 1 and torch.equal(cached.stacked(), stacked)


@pytest.mark.parametrize("dtype, name", [(np.uint16, "grey16.png"), (np.int32, "grey32.tif")])
def test_16_bit_greyscale_is_scaled_by_its_depth_not_clipped_white(tmp_path, dtype, name):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(dtype)  # 0 .. 65472
    path = tmp_path / name
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = load_image(path, None)
    assert pixels.shape == (32, 32, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01  # Pillow's own convert("RGB") made 99.6 % of such an image white
