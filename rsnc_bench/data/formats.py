"""Readers for the on-disk caption layouts of protocol.md section 2.

Caption text is kept verbatim (only line terminators are removed), so that every layout of
the same data yields the same rows.

Each reader is registered by format name and turns the files of a ``Layout`` under a root
folder into raw rows per split (image file name, caption, where the row came from). Grouping
into images, class names and image checks happen in ``datasets.py``, the same for every format.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import ntpath
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsnc_bench.errors import DataFormatError
from rsnc_bench.registry import Registry

SPLITS = ("train", "val", "test")
# Karpathy files of some corpora call the extra train images "restval".
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files live under its root.

    ``files`` maps a role (``json``, ``dir``, or a split name for CSV files) to candidate
    paths relative to the root; the first existing one is used. ``image_dirs`` are candidate
    image folders, likewise.
    """

    format: str
    files: dict[str, tuple[str, ...]]
    image_dirs: tuple[str, ...]
    required: tuple[str, ...] = ()  # roles that must exist; default: all roles

    def required_roles(self) -> tuple[str, ...]:
        return self.required or tuple(self.files)


@dataclass
class RawSplit:
    files: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    classes: dict[str, str] = field(default_factory=dict)  # image file -> class, where the format says

    def add(self, file: str, caption: str, source: str) -> None:
        self.files.append(file)
        self.captions.append(caption)
        self.sources.append(source)


READERS: Registry = Registry("dataset layout format")


def safe_name(name: object, path: Path, where: str, line: int | None = None) -> str:
    """A relative image name that stays inside the image folder, or a DataFormatError."""
    if not isinstance(name, str) or not name.strip():
        raise DataFormatError(path, f"{where}: empty or missing image file name", "give every row an image file name", line)
    name = name.strip().replace("\\", "/")
    parts = name.split("/")
    if posixpath.isabs(name) or ntpath.isabs(name) or ".." in parts:
        raise DataFormatError(
            path, f"{where}: image file name {name!r} escapes the image folder",
            "use a name relative to the image folder (a bare file name)", line)
    return posixpath.normpath(name)


def basename_of_any_path(name: str) -> str:
    """The file name of a POSIX or Windows path (CSV rows may hold absolute author paths)."""
    return ntpath.basename(name.strip().replace("\\", "/"))


def read_text(path: Path, fallback: str | None = None) -> str:
    """The file decoded as UTF-8, strictly; only a format known to come in another encoding names
    it as ``fallback``, and its use is announced (a Latin-1 file read as GB18030 turns into mojibake)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if fallback is not None:
            with contextlib.suppress(UnicodeDecodeError):
                text = data.decode(fallback)
                print(f"notice: {path} is not UTF-8 (byte {exc.start}); read as {fallback}", file=sys.stderr)
                return text
        raise DataFormatError(path, f"not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x})",
                              "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def text_lines(path: Path) -> list[str]:
    """Lines split on newlines only; blank lines are kept (they can be real blank captions)."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def load_json(path: Path) -> object:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"malformed JSON at column {exc.colno}: {exc.msg}", "fix the file or fetch it again", exc.lineno) from None


def _require(entry: object, key: str, kind: type, path: Path, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise DataFormatError(path, f"{where} has no {key!r} field", f"every entry needs {key!r} (see protocol.md section 2)")
    value = entry[key]
    if not isinstance(value, kind):
        raise DataFormatError(path, f"{where}.{key} is {type(value).__name__}, expected {kind.__name__}", "fix that entry")
    return value


def _once(seen: dict[tuple[str, str], str], split: str, name: str, where: str, path: Path) -> None:
    """An image is one entry of a split in a per-image format: a second would silently merge into it
    (the same image in two splits is leakage, found in ``datasets.py``)."""
    if (split, name) in seen:
        raise DataFormatError(path, f"{where} names {name!r} in the {split} split, as {seen[split, name]} does",
                              "give each image one entry (merge their sentences) or fix the file name")
    seen[split, name] = where


@READERS.register("karpathy")
def read_karpathy(files: dict[str, Path]) -> dict[str, RawSplit]:
    """Karpathy-style JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``."""
    path = files["json"]
    doc = load_json(path)
    images = _require(doc, "images", list, path, "the top level")
    out: dict[str, RawSplit] = {}
    seen: dict[tuple[str, str], str] = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        name = safe_name(_require(entry, "filename", str, path, where), path, where)
        split_value = _require(entry, "split", str, path, where)
        split = SPLIT_ALIASES.get(split_value)
        if split is None:
            raise DataFormatError(path, f"{where}.split is {split_value!r}", f"use one of {', '.join(SPLIT_ALIASES)}")
        _once(seen, split, name, where, path)
        sentences = _require(entry, "sentences", list, path, where)
        for j, sentence in enumerate(sentences):
            raw = _require(sentence, "raw", str, path, f"{where}.sentences[{j}]")
            out.setdefault(split, RawSplit()).add(name, raw, f"{path.name}:{where}.sentences[{j}]")
    return out


@READERS.register("amfmn")
def read_amfmn(files: dict[str, Path]) -> dict[str, RawSplit]:
    """AMFMN txt layout: ``<split>_caps.txt`` (one caption a line) + ``<split>_filename.txt``.

    The filename file has one line per caption (AMFMN test lists) or one line per image with
    5 caption lines each (AMFMN train lists); the counts decide which (protocol.md 2.2).
    """
    folder = files["dir"]
    out: dict[str, RawSplit] = {}
    for split in SPLITS:
        caps_path, names_path = folder / f"{split}_caps.txt", folder / f"{split}_filename.txt"
        if not caps_path.exists() and not names_path.exists():
            continue
        for p, other in ((caps_path, names_path), (names_path, caps_path)):
            if not p.exists():
                raise DataFormatError(p, "is missing", f"{other.name} needs it beside it")
        caps, names = text_lines(caps_path), text_lines(names_path)
        if len(names) == len(caps):
            per_name = 1
        elif len(caps) == 5 * len(names):
            per_name = 5
        else:
            raise DataFormatError(
                caps_path, f"{len(caps)} caption lines but {names_path.name} has {len(names)} lines",
                "expected the same count (one name per caption) or 5 captions per name")
        raw = out.setdefault(split, RawSplit())
        for c, caption in enumerate(caps):
            line = c // per_name + 1
            name = safe_name(names[c // per_name], names_path, "image file name", line)
            raw.add(name, caption, f"{caps_path.name}:{c + 1}")
    return out


FILENAME_COLUMNS = ("filename", "name", "image")
CAPTION_COLUMNS = ("title", "caption", "text")


def _column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    raise DataFormatError(path, f"header {header} has no {names[0]!r} column", f"the first line must be {FILENAME_COLUMNS[0]},{CAPTION_COLUMNS[0]}", 1)


def read_caption_csv(path: Path) -> RawSplit:
    """One ``filename,title`` CSV (comma or tab separated; absolute paths reduced to base names).

    Captions are one line each, so a row that spans lines is an unclosed quote: it is reported at
    the line where the quote opened (the csv module would read on to the next quote or the end)."""
    text = read_text(path, fallback="gb18030")  # some GeoRSCLIP CSVs (protocol.md 2.3)
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(path, "is empty", "write a header line filename,title and one row per caption") from None
    fcol, tcol = _column(header, FILENAME_COLUMNS, path), _column(header, CAPTION_COLUMNS, path)
    raw = RawSplit()
    line = reader.line_num + 1
    try:
        for row in reader:
            if reader.line_num > line or any("\n" in field or "\r" in field for field in row):
                raise DataFormatError(path, f"a quote opened on this line is still open at line {reader.line_num}",
                                      "close or remove that quote (a caption is one line)", line)
            if row:
                if len(row) != len(header):
                    raise DataFormatError(path, f"{len(row)} fields, the header has {len(header)}", "quote captions that contain the delimiter", line)
                name = safe_name(basename_of_any_path(row[fcol]), path, "filename", line)
                raw.add(name, row[tcol], f"{path.name}:{line}")
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataFormatError(path, f"malformed CSV: {exc}", "fix the quoting on that line", line) from None
    return raw


@READERS.register("csv")
def read_csv(files: dict[str, Path]) -> dict[str, RawSplit]:
    """``filename,title`` CSV files, one per split (open_clip CsvDataset convention)."""
    return {split: read_caption_csv(files[split]) for split in SPLITS if split in files}


@READERS.register("nwpu")
def read_nwpu(files: dict[str, Path]) -> dict[str, RawSplit]:
    """NWPU-Captions JSON: ``{class: [{"filename", "split", "raw", "raw_1".."raw_4"}]}``.

    Images are ``<class>/<filename>`` under the image folder.
    """
    path = files["json"]
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise DataFormatError(path, "the top level is not an object keyed by class name", "use the NWPU-Captions dataset_nwpu.json")
    out: dict[str, RawSplit] = {}
    seen: dict[tuple[str, str], str] = {}
    for cls, entries in doc.items():
        if not isinstance(entries, list):
            raise DataFormatError(path, f"[{cls!r}] is not a list of images", "use the NWPU-Captions dataset_nwpu.json")
        for i, entry in enumerate(entries):
            where = f"[{cls!r}][{i}]"
            name = safe_name(f"{cls}/{_require(entry, 'filename', str, path, where)}", path, where)
            split_value = _require(entry, "split", str, path, where)
            split = SPLIT_ALIASES.get(split_value)
            if split is None:
                raise DataFormatError(path, f"{where}.split is {split_value!r}", f"use one of {', '.join(SPLIT_ALIASES)}")
            _once(seen, split, name, where, path)
            raw = out.setdefault(split, RawSplit())
            raw.classes[name] = cls
            for key in ("raw", "raw_1", "raw_2", "raw_3", "raw_4"):
                raw.add(name, _require(entry, key, str, path, where), f"{path.name}:{where}.{key}")
    return out
