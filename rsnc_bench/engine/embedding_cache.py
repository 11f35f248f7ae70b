"""Encoded splits of methods that do not train, kept on disk and reused across cells.

A method that does not train (``zeroshot``) scores the same val and test splits with the same
weights in every cell of a grid: five noise rates, three seeds, fifteen identical encodings. This
cache encodes each split once. Its key is a hash of everything the encoding depends on: the
method's weights (its state dict), the preprocessing (image size, mean and std; the resize is in
the pixels), the split's uint8 images and token ids as given to the encoder, whether
token features are kept, the evaluation precision, and torch's version; a change to any of them
encodes anew. Methods that train are encoded every time (their weights differ each epoch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rsnc_bench.backbones import Features
from rsnc_bench.methods import Method
from rsnc_bench.paths import atomic_write

KEY_VERSION = "1"  # bump when what an encoding depends on changes outside the hashed inputs
BLOCK = 256  # images hashed at a time (a memory-mapped split is read in pieces)


def update_hash(h, tensor: torch.Tensor) -> None:
    h.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    h.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())


def encoding_key(method: Method, images, text: torch.Tensor, precision: str) -> str:
    """A hash of the weights, the preprocessing and the split's inputs (see the module doc)."""
    backbone = method.backbone
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{KEY_VERSION}|{torch.__version__}|{type(method).__name__}|{backbone.image_size}|{tuple(backbone.mean)}|"
             f"{tuple(backbone.std)}|tokens={method.capabilities.needs_tokens}|{precision}".encode())
    for name, value in method.state_dict().items():
        if torch.is_tensor(value):
            h.update(name.encode())
            update_hash(h, value.float() if value.dtype == torch.bfloat16 else value)
    for start in range(0, len(images), BLOCK):
        update_hash(h, images[start: start + BLOCK])
    update_hash(h, text)
    return h.hexdigest()


class EmbeddingCache:
    """Encoded splits in ``folder``, one file per key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def encoded(self, method: Method, images, text: torch.Tensor, device: torch.device, precision: str,
                encode: Callable[[], tuple[Features, Features]]) -> tuple[Features, Features]:
        """``encode()``'s (texts, images), from the cache when ``method`` does not train and the
        same inputs were encoded before; on ``device``."""
        if method.capabilities.trains:
            return encode()
        path = self.folder / f"{encoding_key(method, images, text, precision)}.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location=device, weights_only=True)
                return Features(**saved["texts"]), Features(**saved["images"])
            except Exception:  # noqa: BLE001 (a truncated or foreign file: encode again and replace it)
                pass
        texts, encoded_images = encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        plain = lambda f: {k: None if v is None else v.cpu() for k, v in vars(f).items()}  # noqa: E731
        atomic_write(path, lambda fh: torch.save({"texts": plain(texts), "images": plain(encoded_images)}, fh))
        return texts, encoded_images
