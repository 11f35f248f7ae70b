"""Image loading: decode, convert to RGB, resize, and optionally cache the result.

With a ``size``, images are resized so that the shorter side is ``size`` (bicubic) and
centre-cropped to ``size x size``, the evaluation transform of the CLIP pipeline (methods.md 2.6);
for the square RS images this is a plain resize. With ``size=None`` they keep their native
resolution (training crops are cut from the original image, as RandomResizedCrop does, not from a
resized copy), padded at the bottom / right to the split's largest height and width; ``sizes()``
gives each image's true (height, width). Training augmentation and normalisation operate on
these uint8 tensors later.

With a cache folder, a split's images are decoded once into one uint8 array file
(N x size x size x 3) that later epochs and grid cells memory-map instead of decoding
JPEG / TIF again. The file's name carries a hash of the image paths, sizes and modification
times and of the target size, so a changed image or size builds a new file. A split too large
for memory is read from that file batch by batch (``MappedImages``) instead of being copied in.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rsnc_bench.data.split import Split
from rsnc_bench.errors import ImageReadError
from rsnc_bench.paths import temporary_path
from rsnc_bench.progress import bar

CACHE_VERSION = "2"  # bump when the decode / resize rule changes


def _unreadable(path, exc) -> ImageReadError:
    return ImageReadError(f"{path}: cannot read image ({exc}); replace the file or drop it from the annotations")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def to_rgb(image: Image.Image, path) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips integer and float greyscale at 255, so a 16-bit PNG
    came out almost white: those are scaled by their bit depth instead (16 bit: / 257)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        if values.min() < 0 or top > 1:
            raise ImageReadError(f"{path}: a floating-point image with values in [{values.min():g}, {top:g}], not [0, 1]; "
                                 "convert it to 8-bit RGB")
        scale = 255.0
    else:
        if values.min() < 0 or top > 65535:
            raise ImageReadError(f"{path}: a 32-bit integer image with values beyond 16 bits; convert it to 8-bit RGB")
        scale = 1.0 if image.mode == "I" and top <= 255 else 1 / 257
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def load_image(path: str | Path, size: int | None) -> np.ndarray:
    """The image at ``path`` as a uint8 array (size, size, 3), or (h, w, 3) at its native
    resolution when ``size`` is None; an ImageReadError when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = to_rgb(image, path)
            if size is None:
                return np.array(image, dtype=np.uint8)
            w, h = image.size
            scale = size / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((rw, rh), Image.BICUBIC)
            left, top = (rw - size) // 2, (rh - size) // 2
            image = image.crop((left, top, left + size, top + size))
            return np.array(image, dtype=np.uint8)
    except ImageReadError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


class SplitImages:
    """The images of a split as uint8 tensors (3, size, size), indexed like ``split.images``;
    with ``size=None`` at native resolution on a common canvas (see the module doc)."""

    def __init__(self, split: Split, size: int | None, cache_dir: str | Path | None = None, workers: int | None = None):
        self.split, self.size = split, size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._sizes: np.ndarray | None = None
        self._array: np.ndarray | None = None
        if cache_dir is not None:
            self._array = self._cached(Path(cache_dir))

    def sizes(self) -> np.ndarray:
        """[N, 2] int64 native (height, width) of each image, read from the file headers once."""
        if self._sizes is None:
            paths = [self.split.image_path(i) for i in range(self.split.n_images)]
            with ThreadPoolExecutor(self.workers) as pool:
                self._sizes = np.array(list(pool.map(image_size, paths)), dtype=np.int64).reshape(-1, 2)
        return self._sizes

    def _canvas(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.sizes().max(axis=0)) if self.split.n_images else (1, 1)

    def _load(self, index: int) -> np.ndarray:
        """One image on the split's canvas (a no-op pad at a fixed size or for equal native sizes)."""
        pixels = load_image(self.split.image_path(index), self.size)
        if self.size is not None:
            return pixels
        height, width = self._canvas()
        if pixels.shape[:2] == (height, width):
            return pixels
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[: pixels.shape[0], : pixels.shape[1]] = pixels
        return canvas

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._array is not None:
            pixels = np.array(self._array[index])  # copy out of the read-only memory map
        else:
            pixels = self._load(index)
        return torch.from_numpy(pixels).permute(2, 0, 1)

    @property
    def nbytes(self) -> int:
        """The decoded split's size in bytes (what ``stacked`` would hold in memory)."""
        height, width = (self.size, self.size) if self.size is not None else self._canvas()
        return self.split.n_images * height * width * 3

    def mapped(self) -> MappedImages:
        """The split read from its cache file on demand (needs ``cache_dir``)."""
        if self._array is None:
            raise ValueError("SplitImages.mapped needs a cache_dir: the images are read from the cache file")
        return MappedImages(self._array)

    def stacked(self) -> torch.Tensor:
        """Every image of the split in one uint8 tensor [N, 3, size, size] (or [N, 3, H, W], the canvas)."""
        if self._array is not None:
            pixels = np.array(self._array)  # a writable copy out of the memory map
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                pixels = np.stack(list(pool.map(self._load, range(self.split.n_images))))
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)

    def cache_key(self) -> str:
        h = hashlib.sha256(f"v{CACHE_VERSION}:{self.size or 'native'}".encode())
        for i in range(self.split.n_images):
            path = self.split.image_path(i)
            stat = path.stat()
            h.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def _cached(self, cache_dir: Path) -> np.ndarray:
        resolution = "native" if self.size is None else f"{self.size}px"
        path = cache_dir / f"{self.split.name}-{resolution}-{self.cache_key()}.npy"
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(path)
            height, width = (self.size, self.size) if self.size is not None else self._canvas()
            shape = (self.split.n_images, height, width, 3)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            try:
                with ThreadPoolExecutor(self.workers) as pool:
                    decoded = pool.map(self._load, range(self.split.n_images))
                    for i, pixels in enumerate(bar(decoded, total=self.split.n_images, desc=f"caching {self.split.name} images", unit="img", leave=False)):
                        array[i] = pixels
                array.flush()
                del array
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return np.load(path, mmap_mode="r")


class MappedImages:
    """A split's images left in their memory-mapped cache file ([N, H, W, 3] uint8) and read on
    demand: indexed like the in-memory tensor (``images[ids]``, ``images[a:b]``) it returns uint8
    [B, 3, H, W] tensors, so a split larger than memory trains and evaluates batch by batch. The
    pages a batch touches come from the page cache once they have been read."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, height, width, channels = self.array.shape
        return n, channels, height, width

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            pixels = np.array(self.array[index])  # out of the read-only map
        else:
            index = index.cpu().numpy() if torch.is_tensor(index) else np.asarray(index)
            pixels = np.take(self.array, index, axis=0)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)
