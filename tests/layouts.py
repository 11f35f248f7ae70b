"""Writers of tiny datasets in the exact real on-disk layouts (protocol.md sections 2-3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: int = 32, seed: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def karpathy_entry(filename: str, imgid: int, split: str, captions: list[str], sydney_order: bool = False) -> dict:
    sentids = list(range(5 * imgid, 5 * imgid + len(captions)))
    sentences = [{"tokens": [t for t in c.split() if t.isalnum()], "raw": c, "imgid": imgid, "sentid": s}
                 for c, s in zip(captions, sentids)]
    if sydney_order:  # key order of the real Sydney file
        return {"sentids": sentids, "imgid": imgid, "sentences": sentences, "split": split, "filename": filename}
    return {"filename": filename, "imgid": imgid, "split": split, "sentids": sentids, "sentences": sentences}


def write_karpathy(root: Path, json_name: str, image_dir: str, images: list[tuple[str, str, list[str]]],
                   dataset_key: str | None = None, indent: int | None = None, sydney_order: bool = False,
                   image_format: str | None = None) -> Path:
    """images: (filename, split, captions). Writes the JSON and one image per entry."""
    entries = [karpathy_entry(f, i, s, caps, sydney_order) for i, (f, s, caps) in enumerate(images)]
    doc = {"images": entries}
    if dataset_key:
        doc["dataset"] = dataset_key
    root.mkdir(parents=True, exist_ok=True)
    (root / json_name).write_text(json.dumps(doc, indent=indent))
    for i, (f, _, _) in enumerate(images):
        write_image(root / image_dir / f, seed=i, fmt=image_format)
    return root


def write_amfmn(root: Path, prefix: str, image_dir: str, train: list[tuple[str, list[str]]],
                test: list[tuple[str, list[str]]]) -> Path:
    """AMFMN txt layout: train_filename one line per image, test_filename one line per caption."""
    folder = root / f"{prefix}_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_caps.txt").write_text("".join(c + "\n" for _, caps in train for c in caps))
    (folder / "train_filename.txt").write_text("".join(f + "\n" for f, _ in train))
    (folder / "test_caps.txt").write_text("".join(c + "\n" for _, caps in test for c in caps))
    (folder / "test_filename.txt").write_text("".join(f + "\n" for f, caps in test for _ in caps))
    for i, (f, _) in enumerate(train + test):
        write_image(root / image_dir / f, seed=i)
    return root


def write_csv(path: Path, rows: list[tuple[str, str]], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["filename", "title"])
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def write_nwpu(root: Path, classes: dict[str, list[tuple[str, str, list[str]]]]) -> Path:
    """classes: class -> [(filename, split, five captions)]."""
    doc = {}
    imgid = 0
    for cls, entries in classes.items():
        doc[cls] = []
        for filename, split, caps in entries:
            entry = {"filename": filename, "split": split, "imgid": imgid, "sentids": list(range(5 * imgid, 5 * imgid + 5)),
                     "raw": caps[0], "raw_1": caps[1], "raw_2": caps[2], "raw_3": caps[3], "raw_4": caps[4]}
            doc[cls].append(entry)
            write_image(root / "NWPU_images" / cls / filename, seed=imgid, fmt="JPEG")
            imgid += 1
    (root / "dataset_nwpu.json").write_text(json.dumps(doc))
    return root


def five(stem: str) -> list[str]:
    return [f"{stem} caption {k} ." for k in range(5)]
