"""The dataset registry: one class per dataset, with its layouts, citation and split sizes.

``load_dataset("rsicd", root)`` reads the files with the layout's reader, groups caption rows
by image name, checks that every image exists, and carves a val split when the layout has none.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path, PurePosixPath
from typing import ClassVar

from rsnc_bench.data.formats import READERS, Layout
from rsnc_bench.data.split import Dataset, build_split, val_provenance
from rsnc_bench.data.val_carve import DEFAULT_VAL_FRACTION, DEFAULT_VAL_SEED, carve_val
from rsnc_bench.errors import ConfigError, DataFormatError, DatasetNotFoundError
from rsnc_bench.registry import Registry

DATASETS: Registry = Registry("dataset")

_PREFIX_CLASS = re.compile(r"([A-Za-z][A-Za-z0-9-]*?)_\d+")


def data_home() -> Path:
    """Where datasets live by default: $RSNC_BENCH_DATA, else ./data."""
    return Path(os.environ.get("RSNC_BENCH_DATA", "data"))


def class_from_prefix(image_name: str) -> str:
    """Scene class from a ``<class>_<n>.<ext>`` file name; "" for names like ``00012.jpg``."""
    m = _PREFIX_CLASS.fullmatch(PurePosixPath(image_name).stem)
    return m.group(1).lower() if m else ""


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """This dataset takes no options."""


class DatasetSpec:
    """Base of every registered dataset. Subclasses set the class variables below."""

    name: ClassVar[str]
    layouts: ClassVar[dict[str, Layout]]
    default_layout: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: object | None = None):
        self.options = options if options is not None else self.Options()

    # --- hooks a dataset may override -------------------------------------------------------
    def default_root(self) -> Path:
        return data_home() / self.name

    def label(self, layout: str | None = None) -> str:
        """A file-name-safe name for this dataset as loaded: name, plus a non-default layout."""
        return self.name if layout in (None, self.default_layout) else f"{self.name}-{layout}"

    def scene_class(self, image_name: str) -> str:
        return class_from_prefix(image_name)

    def image_name(self, layout: str, name: str) -> str:
        """The image path under the image folder for a name as the annotation file gives it."""
        return name

    def prepare(self, root: Path) -> None:
        """Make the files exist (only generated datasets do anything here)."""

    # --- loading --------------------------------------------------------------------------------
    def load(
        self,
        root: str | Path | None = None,
        layout: str | None = None,
        image_dir: str | Path | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        val_seed: int = DEFAULT_VAL_SEED,
        check_images: bool = True,
    ) -> Dataset:
        root = Path(root) if root is not None else self.default_root()
        layout_name = layout or self.default_layout
        if layout_name not in self.layouts:
            raise ConfigError(f"dataset {self.name!r} has no layout {layout_name!r}; choose one of: {', '.join(self.layouts)}")
        spec = self.layouts[layout_name]
        self.prepare(root)
        files = self._find_files(root, layout_name, spec)
        image_root = self._find_image_root(root, layout_name, spec, image_dir)
        raw = READERS.get(spec.format)(files)
        splits = {
            split: build_split(
                split, image_root, [self.image_name(layout_name, f) for f in r.files],
                r.captions, r.sources, self.scene_class, r.classes)
            for split, r in raw.items()
        }
        if not splits:
            raise DatasetNotFoundError(f"dataset {self.name!r}: {', '.join(map(str, files.values()))} hold no caption rows; check the files")
        carved = "val" not in splits and "train" in splits
        if carved:
            splits["train"], splits["val"] = carve_val(splits["train"], val_fraction, val_seed)
        provenance = val_provenance(splits["val"], carved, val_fraction, val_seed) if "val" in splits else None
        ordered = {s: splits[s] for s in ("train", "val", "test") if s in splits}
        dataset = Dataset(self.name, layout_name, root, ordered, provenance)
        if check_images:
            self._check_images(dataset, files)
        return dataset

    def _not_found(self, root: Path, layout_name: str, looked_for: list[Path], what: str) -> DatasetNotFoundError:
        present = [
            name for name, other in self.layouts.items()
            if name != layout_name and all(any((root / c).exists() for c in other.files[r]) for r in other.required_roles())
        ]
        hint = f"; files of layout {present[0]!r} are there: pass --layout {present[0]}" if present else (
            f"; put the {self.name} release there (see `rsnc-bench list datasets`) or pass --data-root")
        looked = " or ".join(str(p) for p in looked_for)
        return DatasetNotFoundError(f"dataset {self.name!r} (layout {layout_name}) not found: no {what} at {looked}{hint}")

    def _find_files(self, root: Path, layout_name: str, spec: Layout) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for role, candidates in spec.files.items():
            hit = next((root / c for c in candidates if (root / c).exists()), None)
            if hit is not None:
                found[role] = hit
            elif role in spec.required_roles():
                raise self._not_found(root, layout_name, [root / c for c in candidates], f"{role} file")
        return found

    def _find_image_root(self, root: Path, layout_name: str, spec: Layout, image_dir) -> Path:
        if image_dir is not None:
            candidates = [Path(image_dir)]
        else:
            candidates = [root / d for d in spec.image_dirs]
        hit = next((c for c in candidates if c.is_dir()), None)
        if hit is None:
            raise self._not_found(root, layout_name, candidates, "image folder")
        return hit

    def _check_images(self, dataset: Dataset, files: dict[str, Path]) -> None:
        """Every listed image exists, lies inside its image folder once symlinks are followed (the
        rule of ``../`` names: a dataset reads nothing outside its folder), and belongs to one split."""
        listed = ", ".join(p.name for p in files.values())
        owner: dict[Path, str] = {}
        for split in dataset.splits.values():
            missing = [i for i in range(split.n_images) if not split.image_path(i).is_file()]
            if missing:
                first = split.images[missing[0]]
                raise DatasetNotFoundError(
                    f"dataset {self.name!r}: {len(missing)} of {split.n_images} {split.name} images listed in "
                    f"{listed} are missing under {split.image_root} (first: {first}); put the images there or pass --image-dir")
            inside = split.image_root.resolve()
            for i, name in enumerate(split.images):
                real = split.image_path(i).resolve()
                if not real.is_relative_to(inside):
                    raise DataFormatError(
                        split.image_path(i), f"a symlink out of the image folder {split.image_root} (to {real})",
                        "copy the image into the folder, or pass the folder that holds the images as --image-dir")
                other = owner.setdefault(real, split.name)
                if other != split.name:
                    raise DataFormatError(
                        files.get("json") or files.get(split.name) or next(iter(files.values())),
                        f"image {name} is in both the {other} and the {split.name} split (train/test leakage)",
                        "keep each image in one split")


def get_dataset(name: str, **options: object) -> DatasetSpec:
    """The registered dataset ``name`` with its typed options (e.g. synthetic's size)."""
    cls = DATASETS.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise ConfigError(f"dataset {name!r} has no option {unknown[0]!r}; its options: {allowed}")
    return cls(cls.Options(**options))


def load_dataset(name: str, root: str | Path | None = None, *, options: dict | None = None, **load_args) -> Dataset:
    return get_dataset(name, **(options or {})).load(root, **load_args)
