"""Tar shards in the webdataset layout, read as a stream, and their images decoded onto a canvas.

A shard is a tar file whose members are grouped into samples by key: ``<key>.<ext>`` members
with the same key, stored one after another, form one sample (the webdataset convention: the key
is the member path up to the first dot of its base name, webdataset ``tariterators.base_plus_ext``).
RS5M's samples have three members (protocol.md 2.5): ``<key>.img_content`` (the encoded image),
``<key>.img_name`` (UTF-8 file name, the stable sample id) and ``<key>.caption`` (UTF-8).

Shards are opened with the standard library's ``tarfile`` in stream mode (``r|*``: one forward
pass, no seeks, any compression), so a shard on a pipe or a network file system is read once,
front to back, and only one sample's bytes are held at a time.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from rsnc_bench.data.images import to_rgb
from rsnc_bench.errors import DataFormatError, ImageReadError

# the member extensions of an RS5M sample (protocol.md 2.5, the official decoder's keys)
IMAGE_MEMBER, NAME_MEMBER, CAPTION_MEMBER = "img_content", "img_name", "caption"
SAMPLE_MEMBERS = (IMAGE_MEMBER, NAME_MEMBER, CAPTION_MEMBER)


class ShardError(DataFormatError):
    """A shard that cannot be read at a member: truncated, corrupt, or a sample missing a member."""

    def __init__(self, shard: str | Path, member: str, problem: str, fix: str):
        super().__init__(shard, f"member {member}: {problem}", fix)
        self.member = member


class ShardImageError(ImageReadError):
    """An ``img_content`` member whose bytes do not decode as an image."""


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: encoded image bytes, its name and caption, where it came from."""

    shard: Path
    key: str
    img_name: str
    caption: str
    image_bytes: bytes

    @property
    def image_member(self) -> str:
        return f"{self.key}.{IMAGE_MEMBER}"


def split_member(name: str) -> tuple[str, str]:
    """``"dir/000123.img_name"`` -> (``"dir/000123"``, ``"img_name"``): the key is the path up to
    the first dot of the base name, as webdataset's ``base_plus_ext`` splits it."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext if dot else ""


def _text(shard: Path, member: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardError(shard, member, f"not UTF-8 text (byte {exc.start})", "fetch the shard again") from None


def _sample(shard: Path, key: str, parts: dict[str, tuple[str, bytes]]) -> RawSample:
    missing = [ext for ext in SAMPLE_MEMBERS if ext not in parts]
    if missing:
        raise ShardError(shard, f"{key}.{missing[0]}", f"sample {key} has no .{missing[0]} member (it has "
                         f"{', '.join('.' + e for e in sorted(parts)) or 'none'})",
                         "every sample needs .img_content, .img_name and .caption; fetch the shard again")
    name = _text(shard, *parts[NAME_MEMBER]).strip()
    if not name:
        raise ShardError(shard, parts[NAME_MEMBER][0], "empty image name", "fetch the shard again")
    return RawSample(shard, key, name, _text(shard, *parts[CAPTION_MEMBER]), parts[IMAGE_MEMBER][1])


def iter_shard(shard: str | Path) -> Iterator[RawSample]:
    """The samples of one tar shard in stored order, read in one forward pass. A truncated or
    corrupt tar, or a sample missing a member, is a ``ShardError`` naming the shard and member."""
    shard = Path(shard)
    key: str | None = None
    parts: dict[str, tuple[str, bytes]] = {}
    member = "(the tar header)"
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for info in tar:
                member = info.name
                if not info.isfile():
                    continue
                member_key, ext = split_member(info.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(shard, key, parts)
                    key, parts = member_key, {}
                handle = tar.extractfile(info)
                parts[ext] = (info.name, handle.read() if handle is not None else b"")
            if key is not None:
                yield _sample(shard, key, parts)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ShardError(shard, member, f"unreadable tar data ({exc})", "the shard is truncated or corrupt; fetch it again") from None
    except FileNotFoundError:
        raise ShardError(shard, member, "the shard is gone", "put the shard back under --data-root") from None


def fit_on_canvas(image: Image.Image, canvas: int) -> Image.Image:
    """The image shrunk (bicubic, aspect kept) so that its longer side is at most ``canvas``;
    images that fit are kept at their own resolution (training crops come from the native image)."""
    width, height = image.size
    if max(width, height) <= canvas:
        return image
    scale = canvas / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def rgb_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes as a decoded 8-bit RGB image (``images.to_rgb``: 16-bit greyscale scaled by
    its bit depth, not clipped); a ``ShardImageError`` naming ``where`` when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image, where)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ShardImageError(f"{where}: cannot decode the image ({exc}); fetch the shard again, or drop the "
                              "sample's row from the metafile") from None


def decode_image(data: bytes, canvas: int, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encoded image bytes -> (uint8 [3, canvas, canvas], its true (height, width)), padded at the
    bottom / right as a training split's native images are (``SplitImages`` with ``size=None``)."""
    pixels = np.array(fit_on_canvas(rgb_image(data, where), canvas), dtype=np.uint8)
    height, width = pixels.shape[:2]
    out = torch.zeros((3, canvas, canvas), dtype=torch.uint8)
    out[:, :height, :width] = torch.from_numpy(pixels).permute(2, 0, 1)
    return out, (height, width)


def decode_sample(sample: RawSample, canvas: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return decode_image(sample.image_bytes, canvas, f"{sample.shard}: member {sample.image_member}")
