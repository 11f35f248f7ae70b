"""A writer of tiny RS5M releases in the real layout (protocol.md 2.5): tar shards
``{pub11,rs3}-{train,val}-NNNN.tar`` whose samples hold ``<key>.img_content``, ``<key>.img_name``
and ``<key>.caption``, and the metafiles ``{pub11,rs3}_{train,val}_intermediate.csv``.

Image ``i`` of a subset's split is a solid colour that encodes (subset, split, i), so a test can
tell from the pixels which sample it got; sizes vary (non-square, some larger than a small
canvas) and formats alternate between PNG and JPEG (or are all JPEG, for the benchmark).
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SUBSET_CODE = {"pub11": 60, "rs3": 180}


@dataclass(frozen=True)
class Release:
    root: Path
    names: dict[tuple[str, str], list[str]]  # (subset, split) -> image names in metafile order
    captions: dict[tuple[str, str], list[str]]


def image_name(subset: str, split: str, i: int) -> str:
    stem = f"pub11_{split}_{i:06d}" if subset == "pub11" else f"millionaid_{split}_P{i:07d}"
    return f"{stem}.{'png' if i % 2 == 0 else 'jpg'}"


def colour(subset: str, split: str, i: int) -> tuple[int, int, int]:
    """The solid colour of an image (exact in PNG; JPEG keeps it within a few levels)."""
    return (i * 7) % 256, (i * 7) // 256 * 16 + (0 if split == "train" else 8), SUBSET_CODE[subset]


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def image_bytes(subset: str, split: str, i: int, sizes: tuple[int, int], fmt: str | None = None) -> bytes:
    h = sizes[0] + (i * 5) % (sizes[1] - sizes[0] + 1)
    w = sizes[0] + (i * 11) % (sizes[1] - sizes[0] + 1)
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = colour(subset, split, i)
    name = image_name(subset, split, i)
    return encode(pixels, fmt or ("PNG" if name.endswith(".png") else "JPEG"))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, str, str]]) -> None:
    """samples: (key, image bytes, image name, caption), written as webdataset members."""
    with tarfile.open(path, "w") as tar:
        for key, data, name, caption in samples:
            add_member(tar, f"{key}.caption", caption.encode())
            add_member(tar, f"{key}.img_content", data)
            add_member(tar, f"{key}.img_name", name.encode())


def write_metafile(path: Path, rows: list[tuple[str, str]], header: bool = True) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(["name", "caption"])
        writer.writerows(rows)


def write_release(root: Path, n_train: int = 24, n_val: int = 12, shards: int = 3, subsets=("pub11", "rs3"),
                  sizes: tuple[int, int] = (20, 40), fmt: str | None = None, header: bool = True) -> Release:
    """A release under ``root``: ``n_train`` / ``n_val`` samples per subset, each split's samples dealt
    into ``shards`` shards in metafile order (shard s holds a contiguous block, as RS5M's do)."""
    root.mkdir(parents=True, exist_ok=True)
    names, captions = {}, {}
    for subset in subsets:
        for split, n in (("train", n_train), ("val", n_val)):
            split_names = [image_name(subset, split, i) for i in range(n)]
            split_captions = [f"{subset} {split} image {i}, a scene with {i % 5} storage tanks, \"quoted\"" for i in range(n)]
            write_metafile(root / f"{subset}_{split}_intermediate.csv", list(zip(split_names, split_captions)), header)
            per = -(-n // shards)
            for s in range(shards):
                block = range(s * per, min(n, (s + 1) * per))
                write_shard(root / f"{subset}-{split}-{s:04d}.tar",
                            [(f"{s:04d}{i:06d}", image_bytes(subset, split, i, sizes, fmt), split_names[i], split_captions[i]) for i in block])
            names[subset, split], captions[subset, split] = split_names, split_captions
    return Release(root, names, captions)
