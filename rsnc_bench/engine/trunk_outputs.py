"""Frozen trunks' outputs for whole splits, computed once and kept on disk across the cells of a grid.

With ``frozen_trunks`` and no augmentation, what a trunk sees of a split is fixed: the evaluation
transform of each image, the token ids of each caption. A cell then needs the trunks' outputs,
not the pixels: the split's images are replaced by the image trunk's outputs (float, which
Preprocess passes through and ``encode_image`` takes in place of pixels) and the text trunk's
memo is filled with the split's captions. Both are read from files keyed by a hash of the
trunk's weights, the preprocessing and the split's inputs; the first cell to need one writes it.
Exact: the same trunk on the same inputs, in evaluation mode, as the memo would compute.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable

import torch

from rsnc_bench.backbones import DualEncoder
from rsnc_bench.backbones.trunk_memo import TrunkMemo
from rsnc_bench.engine.batches import Preprocess, SplitTensors
from rsnc_bench.engine.embedding_cache import BLOCK, update_hash
from rsnc_bench.paths import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no lock, at worst two workers compute the same file
    fcntl = None

KEY_VERSION = "1"  # bump when what an output depends on changes outside the hashed inputs
BATCH = 64  # rows per trunk forward


def trunk_split(split: SplitTensors, backbone: DualEncoder, folder: Path, device: torch.device) -> SplitTensors:
    """``split`` with its images replaced by the image trunk's outputs (and the text memo filled)."""
    trunks = backbone.frozen_trunks()
    assert isinstance(trunks.image, TrunkMemo) and isinstance(trunks.text, TrunkMemo), "frozen trunks are memoised"
    fill_text(trunks.text, split.text, folder)
    outputs = _cached(folder / f"image-{_key(trunks.image, backbone, split.images, split.sizes)}.pt",
                      lambda: _image_outputs(trunks.image, backbone, split, device))
    return SplitTensors(outputs, split.text, split.img_of)


def _image_outputs(memo: TrunkMemo, backbone: DualEncoder, split: SplitTensors, device: torch.device) -> torch.Tensor:
    preprocess = Preprocess(backbone, augment=False)  # the evaluation transform, as training without augmentation crops
    out = []
    with torch.no_grad():
        for start in range(0, len(split.images), BATCH):
            sizes = None if split.sizes is None else split.sizes[start: start + BATCH]
            out.append(memo.trunk(preprocess(split.images[start: start + BATCH], device, sizes)).float().cpu())
    return torch.cat(out)


def fill_text(memo: TrunkMemo, text: torch.Tensor, folder: Path) -> None:
    """The text memo holds the trunk's outputs for every row of ``text``, read from (or written to) ``folder``."""
    def compute() -> dict:
        memo.fill(text, BATCH)
        held = memo.held(text)
        return {"keys": torch.tensor([list(k) for k in held], dtype=torch.uint8), "rows": torch.stack(list(held.values()))}

    saved = _cached(folder / f"text-{_key(memo, None, text)}.pt", compute)
    memo.rows.update(zip((bytes(k.tolist()) for k in saved["keys"]), saved["rows"]))


def _key(memo: TrunkMemo, backbone: DualEncoder | None, inputs, sizes: torch.Tensor | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{KEY_VERSION}|{torch.__version__}|{type(memo.module).__name__}".encode())
    if backbone is not None:  # the image preprocessing (the resize and crop follow from sizes and image_size)
        h.update(f"{backbone.image_size}|{tuple(backbone.mean)}|{tuple(backbone.std)}".encode())
    for name, value in memo.module.state_dict().items():
        h.update(name.encode())
        update_hash(h, value)
    for start in range(0, len(inputs), BLOCK):
        update_hash(h, inputs[start: start + BLOCK])
    if sizes is not None:
        update_hash(h, sizes)
    return h.hexdigest()


def _load(path: Path):
    if path.exists():
        try:
            return torch.load(path, weights_only=True, mmap=True)  # pages shared by the workers reading one file
        except Exception:  # noqa: BLE001 (a truncated or foreign file: compute again and replace it)
            pass
    return None


@contextlib.contextmanager
def _exclusive(path: Path):
    """An flock on ``path`` where the platform has one: the grid's workers compute each file once."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(path: Path, compute: Callable):
    """``compute()``, or what an earlier call saved at ``path``; a worker that finds another
    computing it waits for that file instead of computing it too."""
    value = _load(path)
    if value is not None:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        value = _load(path)
        if value is None:
            value = compute()
            atomic_write(path, lambda fh: torch.save(value, fh))
    return value
