"""The in-memory form every layout is read into: caption rows grouped by image.

A caption is identified by its row number in its split, never by its text: RSICD repeats
captions within an image and shares some across images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: ``captions[r]`` describes image ``images[img_of[r]]``.

    ``images`` holds file names relative to ``image_root``, unique, in order of first
    appearance; ``classes`` holds each image's scene class ("" when unknown); ``sources``
    says where each row came from ("file:line" or a JSON path) for error messages.
    """

    name: str
    image_root: Path
    images: tuple[str, ...]
    classes: tuple[str, ...]
    captions: tuple[str, ...]
    img_of: np.ndarray
    sources: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        img_of = np.asarray(self.img_of, dtype=np.int64)
        img_of.setflags(write=False)
        object.__setattr__(self, "img_of", img_of)
        assert len(self.captions) == len(img_of) and len(self.classes) == len(self.images)

    @property
    def n_rows(self) -> int:
        return len(self.captions)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]

    def blank_rows(self) -> list[int]:
        """Rows whose caption has no letter or digit, such as "" or " ." (kept, reported)."""
        return [r for r, c in enumerate(self.captions) if not any(ch.isalnum() for ch in c)]

    def rows_of_image(self) -> list[np.ndarray]:
        """For each image, the rows of its captions (ascending)."""
        order = np.argsort(self.img_of, kind="stable")
        bounds = np.searchsorted(self.img_of[order], np.arange(self.n_images + 1))
        return [order[bounds[i]: bounds[i + 1]] for i in range(self.n_images)]

    def content_hash(self) -> str:
        """sha256 over image names, row -> image map and caption texts (not paths on disk)."""
        h = hashlib.sha256()
        for name in self.images:
            h.update(name.encode() + b"\0")
        h.update(self.img_of.astype("<i8").tobytes())
        for caption in self.captions:
            h.update(caption.encode() + b"\0")
        return h.hexdigest()

    def select_images(self, keep: np.ndarray, name: str) -> Split:
        """The split restricted to the images whose indices are in ``keep``, order kept."""
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        new_index = np.full(self.n_images, -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        rows = np.flatnonzero(new_index[self.img_of] >= 0)
        return Split(
            name=name,
            image_root=self.image_root,
            images=tuple(self.images[i] for i in keep),
            classes=tuple(self.classes[i] for i in keep),
            captions=tuple(self.captions[r] for r in rows),
            img_of=new_index[self.img_of[rows]],
            sources=tuple(self.sources[r] for r in rows) if self.sources else (),
        )


def val_provenance(val: Split, carved: bool, fraction: float, seed: int) -> dict:
    """Where val came from, recorded in every result: native or carved (with the carve's fraction
    and seed), its size and a sha256 of its sorted image names (two results with the same hash
    selected their epoch on the same images)."""
    names = "\n".join(sorted(val.images)).encode()
    out = {"source": "carved" if carved else "native", "n_images": val.n_images, "n_rows": val.n_rows,
           "images_sha256": hashlib.sha256(names).hexdigest()}
    if carved:
        out.update(fraction=fraction, seed=seed)
    return out


def describe_val(provenance: dict) -> str:
    """One line for summaries and reports."""
    if provenance["source"] == "carved":
        return (f"carved from train: {provenance['fraction']:.0%} of images by sha256 order, seed {provenance['seed']} "
                f"({provenance['n_images']} images, hash {provenance['images_sha256'][:12]})")
    return f"native (from the dataset files; {provenance['n_images']} images, hash {provenance['images_sha256'][:12]})"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: its splits and how they were obtained."""

    name: str
    layout: str
    root: Path
    splits: dict[str, Split]
    val_provenance: dict | None  # native or carved, fraction, seed, image-list hash (see val_provenance)

    @property
    def val_source(self) -> str:
        return describe_val(self.val_provenance) if self.val_provenance else "none"

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    def summary(self) -> list[str]:
        lines = []
        for name, split in self.splits.items():
            blanks = split.blank_rows()
            note = f", {len(blanks)} blank captions kept" if blanks else ""
            lines.append(f"{name:5s} {split.n_images:6d} images {split.n_rows:7d} captions{note}")
        lines.append(f"val: {self.val_source}")
        return lines


def build_split(
    name: str,
    image_root: Path,
    files: list[str],
    captions: list[str],
    sources: list[str],
    class_of,
    image_classes: dict[str, str] | None = None,
) -> Split:
    """Group caption rows by image file name (not by position) into a ``Split``."""
    index: dict[str, int] = {}
    img_of = np.empty(len(files), dtype=np.int64)
    for r, f in enumerate(files):
        img_of[r] = index.setdefault(f, len(index))
    images = tuple(index)
    classes = tuple((image_classes or {}).get(f) or class_of(f) for f in images)
    return Split(name, image_root, images, classes, tuple(captions), img_of, tuple(sources))
