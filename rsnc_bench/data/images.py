"""Image loading: decode, convert to RGB, resize, and optionally cache the result.

Images are resized so that the shorter side is ``size`` (bicubic) and centre-cropped to
``size x size``, the evaluation transform of the CLIP pipeline (methods.md 2.6); for the square
RS images this is a plain resize. Training augmentation and normalisation operate on these
uint8 tensors later.

With a cache folder, a split's images are decoded once into one uint8 array file
(N x size x size x 3) that later epochs and grid cells memory-map instead of decoding
JPEG / TIF again. The file's name carries a hash of the image paths, sizes and modification
times and of the target size, so a changed image or size builds a new file.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from rsnc_bench.data.split import Split
from rsnc_bench.errors import ImageReadError

CACHE_VERSION = "1"  # bump when the decode / resize rule changes


def load_image(path: str | Path, size: int) -> np.ndarray:
    """The image at ``path`` as a uint8 array (size, size, 3), or an ImageReadError."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((rw, rh), Image.BICUBIC)
            left, top = (rw - size) // 2, (rh - size) // 2
            image = image.crop((left, top, left + size, top + size))
            return np.array(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc}); replace the file or drop it from the annotations") from None


class SplitImages:
    """The images of a split as uint8 tensors (3, size, size), indexed like ``split.images``."""

    def __init__(self, split: Split, size: int, cache_dir: str | Path | None = None, workers: int | None = None):
        self.split, self.size = split, size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._array: np.ndarray | None = None
        if cache_dir is not None:
            self._array = self._cached(Path(cache_dir))

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._array is not None:
            pixels = np.array(self._array[index])  # copy out of the read-only memory map
        else:
            pixels = load_image(self.split.image_path(index), self.size)
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def stacked(self) -> torch.Tensor:
        """Every image of the split in one uint8 tensor [N, 3, size, size]."""
        if self._array is not None:
            pixels = np.array(self._array)  # a writable copy out of the memory map
        else:
            paths = [self.split.image_path(i) for i in range(self.split.n_images)]
            with ThreadPoolExecutor(self.workers) as pool:
                pixels = np.stack(list(pool.map(lambda p: load_image(p, self.size), paths)))
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)

    def cache_key(self) -> str:
        h = hashlib.sha256(f"v{CACHE_VERSION}:{self.size}".encode())
        for i in range(self.split.n_images):
            path = self.split.image_path(i)
            stat = path.stat()
            h.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def _cached(self, cache_dir: Path) -> np.ndarray:
        path = cache_dir / f"{self.split.name}-{self.size}px-{self.cache_key()}.npy"
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shape = (self.split.n_images, self.size, self.size, 3)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            paths = [self.split.image_path(i) for i in range(self.split.n_images)]
            try:
                with ThreadPoolExecutor(self.workers) as pool:
                    decoded = pool.map(lambda p: load_image(p, self.size), paths)
                    for i, pixels in enumerate(tqdm(decoded, total=len(paths), desc=f"caching {self.split.name} images", unit="img", leave=False, disable=None)):
                        array[i] = pixels
                array.flush()
                del array
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return np.load(path, mmap_mode="r")
