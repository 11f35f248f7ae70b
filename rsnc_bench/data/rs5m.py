"""RS5M (Zhang et al., 2024) in its webdataset release, streamed from its tar shards.

Layout under ``--data-root`` (protocol.md 2.5), for each chosen subset ``pub11`` / ``rs3``:
``<subset>-train-NNNN.tar`` and ``<subset>-val-NNNN.tar`` (numbered from 0000 without gaps) and the
metafiles ``<subset>_train_intermediate.csv`` / ``<subset>_val_intermediate.csv``. Each shard
sample has ``<key>.img_content`` (encoded image), ``<key>.img_name`` (the sample's id) and
``<key>.caption``; a metafile row gives the image name in column 0 and the caption in column 1,
read by position, as the official dataset class reads them (line 1 is a header, as pandas reads
it, unless its first field looks like an image file name).

What is held: the metafiles' names and captions (the official loader holds them too), never
the train images: training streams them from the shards (``rsnc_bench.data.stream``). The train
split's rows are the train metafiles' rows, subsets concatenated in the order given; noise
manifests are made on it like on any train split, and applied by row when streaming.

RS5M publishes train and val only. A clean val and test are carved from the start of each
chosen subset's val metafile: its first ``val_rows`` rows are val, the next ``test_rows`` rows
test (a choice: the first rows, so that the images are found in the first val shard and the
carve depends on nothing but the files). Their images are copied once out of the val shards into
a folder under ``$RSNC_BENCH_CACHE/rs5m-eval/`` (keyed by the shards and the rows) and read from
there like any evaluation split.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping

from rsnc_bench.data.datasets import DATASETS, DatasetSpec
from rsnc_bench.data.formats import Layout, safe_name
from rsnc_bench.data.shards import RawSample, iter_shard, rgb_image
from rsnc_bench.data.split import Dataset, build_split, val_provenance
from rsnc_bench.data.stream import RowLabels, ShardStream, StreamConfig
from rsnc_bench.errors import ConfigError, DataFormatError, DatasetNotFoundError
from rsnc_bench.paths import atomic_write, atomic_write_text, writable_folder

SUBSETS = ("pub11", "rs3")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def shard_pattern(subset: str, split: str) -> str:
    return f"{subset}-{split}-NNNN.tar"


def metafile_name(subset: str, split: str) -> str:
    return f"{subset}_{split}_intermediate.csv"


@dataclass(frozen=True)
class RS5MOptions:
    """RS5M's options (``-o name=value``): the subsets (``pub11+rs3``, ``pub11`` or ``rs3``), the val
    and test rows carved from the start of each subset's val metafile, and the stream's canvas
    (images with a longer side are shrunk to it) and shuffle buffer (samples)."""

    subsets: str = "pub11+rs3"
    val_rows: int = 250
    test_rows: int = 500
    canvas: int = 256
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        chosen = self.chosen()
        unknown = [s for s in chosen if s not in SUBSETS]
        if not chosen or unknown or len(set(chosen)) != len(chosen):
            raise ConfigError(f"rs5m subsets={self.subsets!r}; give pub11, rs3 or pub11+rs3")
        if self.val_rows < 1 or self.test_rows < 1:
            raise ConfigError(f"rs5m val_rows={self.val_rows}, test_rows={self.test_rows}; give at least 1 each, e.g. val_rows=250")
        StreamConfig(0, self.shuffle_buffer, self.canvas)  # their checks

    def chosen(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.subsets.split("+") if s.strip())

    def is_default(self) -> bool:
        return self == RS5MOptions()


@dataclass(frozen=True)
class Metafile:
    """A metafile's rows: image names and captions by position, and the line of each row."""

    path: Path
    names: tuple[str, ...]
    captions: tuple[str, ...]
    lines: tuple[int, ...]


def _looks_like_image(field_text: str) -> bool:
    return PurePosixPath(field_text.strip()).suffix.lower() in IMAGE_EXTENSIONS


def read_metafile(path: Path, limit: int | None = None) -> Metafile:
    """Columns 0 (image name) and 1 (caption) of each row, by position; at most ``limit`` rows."""
    names: list[str] = []
    captions: list[str] = []
    lines: list[int] = []
    line = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            for row in reader:
                if line == 1 and row and not _looks_like_image(row[0]):
                    line = reader.line_num + 1
                    continue  # the header (pandas' read_csv, which the official loader uses, skips line 1)
                if limit is not None and len(names) >= limit:
                    break
                if len(row) < 2:
                    raise DataFormatError(path, f"{len(row)} field(s); a row needs the image name and the caption",
                                          "write name,caption (quote captions that hold commas)", line)
                names.append(row[0].strip())
                captions.append(row[1])
                lines.append(line)
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text (byte {exc.start} of the block being read)", "re-save the file as UTF-8", line) from None
    except csv.Error as exc:
        raise DataFormatError(path, f"malformed CSV: {exc}", "fix the quoting on that line", line) from None
    return Metafile(path, tuple(names), tuple(captions), tuple(lines))


def name_index(metafiles: list[Metafile]) -> dict[str, int]:
    """image name -> row over the metafiles concatenated; a name listed twice is an error naming both lines."""
    index: dict[str, int] = {}
    starts: list[int] = []  # the first row of each metafile
    for meta in metafiles:
        starts.append(len(index))
        for r, name in enumerate(meta.names):
            row = index.setdefault(name, starts[-1] + r)
            if row != starts[-1] + r:
                k = bisect.bisect_right(starts, row) - 1
                first = metafiles[k]
                raise DataFormatError(meta.path, f"image {name!r} is listed again (first at {first.path.name}:{first.lines[row - starts[k]]})",
                                      "keep one row per image: the name is the sample's id", meta.lines[r])
    return index


def find_shards(root: Path, subset: str, split: str) -> list[Path]:
    """``<subset>-<split>-NNNN.tar`` under ``root``, numbered from 0000 without gaps."""
    pattern = re.compile(rf"{re.escape(subset)}-{split}-(\d{{4}})\.tar")
    numbered = sorted((int(m.group(1)), p) for p in root.glob(f"{subset}-{split}-*.tar") if (m := pattern.fullmatch(p.name)))
    for expected, (number, _) in enumerate(numbered):
        if number != expected:
            raise DatasetNotFoundError(f"dataset 'rs5m': shard {root / f'{subset}-{split}-{expected:04d}.tar'} is missing "
                                       f"(found up to {numbered[-1][1].name}); put every shard of the release under --data-root")
    return [p for _, p in numbered]


class ImageRows:
    """The metafile row of a streamed sample, found by its ``img_name`` (picklable: it travels to
    data-loader workers)."""

    def __init__(self, index: Mapping[str, int], metafiles: tuple[str, ...]):
        self.index, self.metafiles = index, metafiles

    def __call__(self, sample: RawSample) -> int:
        row = self.index.get(sample.img_name)
        if row is None:
            raise DataFormatError(sample.shard, f"member {sample.key}.img_name: image {sample.img_name!r} is in no row of "
                                  f"{' or '.join(self.metafiles)}", "use the metafiles that belong to these shards")
        return row


@dataclass(frozen=True, eq=False)
class StreamedDataset(Dataset):
    """A dataset whose train images are streamed from tar shards: ``train`` holds the metafile rows
    (images named, never read through it); ``stream(seed, manifest)`` reads the images."""

    train_shards: tuple[Path, ...] = ()
    image_rows: ImageRows | None = None
    stream_config: StreamConfig = field(default_factory=StreamConfig)

    def stream(self, seed: int, manifest=None) -> ShardStream:
        """The train stream with the training ``seed``; with a noise manifest (made on ``train``),
        each image is paired with its row's caption and clean flag."""
        train = self.splits["train"]
        if manifest is not None:
            manifest.check_split(train)
            labels = RowLabels.from_manifest(train.captions, manifest)
        else:
            labels = RowLabels(train.captions)
        config = StreamConfig(seed, self.stream_config.shuffle_buffer, self.stream_config.canvas)
        return ShardStream(self.train_shards, self.image_rows, labels, config)


@DATASETS.register("rs5m")
class RS5M(DatasetSpec):
    """RS5M: about 5.07 M remote-sensing image-text pairs (PUB11 + RS3), streamed from tar shards.

    Citation: Zhang, Zhao, Yin, Ma, Wang, Wang, "RS5M and GeoRSCLIP: A Large-Scale Vision-Language
    Dataset and a Large Vision-Language Model for Remote Sensing", IEEE TGRS 62, 2024.

    Splits: train 3,007,809 (PUB11) + 2,062,377 (RS3) pairs, one caption per image; val files only,
    from whose first rows a clean val (``val_rows`` per subset) and test (``test_rows``) are carved.

    Layout ``webdataset`` under the root: ``{pub11,rs3}-{train,val}-NNNN.tar`` (members
    ``<key>.img_content``, ``<key>.img_name``, ``<key>.caption``) and
    ``{pub11,rs3}_{train,val}_intermediate.csv`` (image name, caption by position).
    """

    name = "rs5m"
    default_layout = "webdataset"
    layouts = {"webdataset": Layout(
        "webdataset",
        {f"{s}_{split}": (metafile_name(s, split),) for s in SUBSETS for split in ("train", "val")},
        ())}
    Options = RS5MOptions

    def label(self, layout: str | None = None) -> str:
        o = self.options
        return "rs5m" if o.is_default() else f"rs5m-{'+'.join(o.chosen())}-v{o.val_rows}-t{o.test_rows}"

    def what_to_put(self, root: Path) -> str:
        chosen = self.options.chosen()
        shards = ", ".join(shard_pattern(s, split) for s in chosen for split in ("train", "val"))
        metas = ", ".join(metafile_name(s, split) for s in chosen for split in ("train", "val"))
        return (f"put the shards {shards} (numbered from 0000) and the metafiles {metas} (Hugging Face Zilun/RS5M) "
                f"directly under {root}, or pass --data-root")

    def _missing(self, root: Path, what: Path | str) -> DatasetNotFoundError:
        return DatasetNotFoundError(f"dataset 'rs5m' (layout webdataset) not found: no {what}; {self.what_to_put(root)}")

    def load(self, root=None, layout=None, image_dir=None, val_fraction=None, val_seed=None, check_images=True) -> StreamedDataset:
        root = Path(root) if root is not None else self.default_root()
        if layout not in (None, self.default_layout):
            raise ConfigError(f"dataset 'rs5m' has no layout {layout!r}; choose one of: {', '.join(self.layouts)}")
        if image_dir is not None:
            raise ConfigError("dataset 'rs5m' reads its images from the shards; drop --image-dir")
        if not root.is_dir():
            raise self._missing(root, f"folder {root}")
        o = self.options
        shards: dict[tuple[str, str], list[Path]] = {}
        for subset in o.chosen():
            for split in ("train", "val"):
                if not (root / metafile_name(subset, split)).is_file():
                    raise self._missing(root, root / metafile_name(subset, split))
                found = find_shards(root, subset, split)
                if not found:
                    raise self._missing(root, f"{shard_pattern(subset, split)} shard at {root}")
                shards[subset, split] = found
        train_meta = [read_metafile(root / metafile_name(s, "train")) for s in o.chosen()]
        index = name_index(train_meta)
        names = [n for m in train_meta for n in m.names]
        captions = [c for m in train_meta for c in m.captions]
        sources = [f"{m.path.name}:{line}" for m in train_meta for line in m.lines]
        train = build_split("train", root, names, captions, sources, lambda name: "")
        held_out = {"val": ([], [], []), "test": ([], [], [])}
        val_shards: list[Path] = []
        for subset in o.chosen():
            meta = read_metafile(root / metafile_name(subset, "val"), limit=o.val_rows + o.test_rows)
            if len(meta.names) < o.val_rows + o.test_rows:
                raise ConfigError(f"{meta.path} has {len(meta.names)} rows, fewer than val_rows + test_rows = "
                                  f"{o.val_rows + o.test_rows}; lower them with -o val_rows=... -o test_rows=...")
            for r, (name, caption, line) in enumerate(zip(meta.names, meta.captions, meta.lines)):
                safe = safe_name(name, meta.path, "image name", line)
                if name in index:
                    raise DataFormatError(meta.path, f"image {name!r} is also in the train metafile (train/test leakage)",
                                          "keep each image in one split", line)
                for column, value in zip(held_out["val" if r < o.val_rows else "test"], (safe, caption, f"{meta.path.name}:{line}")):
                    column.append(value)
            val_shards += shards[subset, "val"]
        folder = extract_images(val_shards, set(held_out["val"][0]) | set(held_out["test"][0]))
        splits = {"train": train}
        for split, (files, caps, srcs) in held_out.items():
            splits[split] = build_split(split, folder, files, caps, srcs, lambda name: "")
        provenance = val_provenance(splits["val"], False, 0.0, 0)
        provenance["rule"] = f"the first {o.val_rows} rows of each val metafile ({'+'.join(o.chosen())}); test the next {o.test_rows}"
        image_rows = ImageRows(index, tuple(m.path.name for m in train_meta))
        train_shards = tuple(p for s in o.chosen() for p in shards[s, "train"])
        return StreamedDataset(self.name, self.default_layout, root, splits, provenance, train_shards, image_rows,
                               StreamConfig(0, o.shuffle_buffer, o.canvas))


def eval_cache_home() -> Path:
    from rsnc_bench.pretrain import cache_home  # the cache of pretrained weights: $RSNC_BENCH_CACHE

    return cache_home() / "rs5m-eval"


def extract_images(shards: list[Path], wanted: set[str]) -> Path:
    """Copy the images named in ``wanted`` out of ``shards`` (read in order, stopping once all are
    found) into a folder keyed by the shards (path, size, modification time) and the names, and
    return it; a later call with the same inputs reuses it. Each image is decoded once here, so a
    corrupt one is reported with its shard and member."""
    digest = hashlib.sha256()
    for shard in shards:
        stat = shard.stat()
        digest.update(f"{shard.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for name in sorted(wanted):
        digest.update(name.encode() + b"\0")
    folder = eval_cache_home() / digest.hexdigest()[:20]
    done = folder / "complete"
    if done.exists():
        return folder
    writable_folder(folder, "the RS5M val/test image folder ($RSNC_BENCH_CACHE)")
    missing = set(wanted)
    for shard in shards:
        for sample in iter_shard(shard):
            if sample.img_name in missing:
                rgb_image(sample.image_bytes, f"{sample.shard}: member {sample.image_member}")
                atomic_write(folder / sample.img_name, lambda fh, data=sample.image_bytes: fh.write(data))
                missing.discard(sample.img_name)
                if not missing:
                    break
        if not missing:
            break
    if missing:
        first = sorted(missing)[0]
        raise DatasetNotFoundError(f"dataset 'rs5m': {len(missing)} of the {len(wanted)} val/test images are in no val shard "
                                   f"({', '.join(s.name for s in shards)}; first: {first}); use the shards that belong to the val metafiles")
    atomic_write_text(done, f"{len(wanted)} images\n")
    return folder
