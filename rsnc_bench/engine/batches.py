"""Split data as tensors for training and evaluation: images in memory (or memory-mapped from the
image cache when a split is too large), captions tokenised once."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np
import torch

from rsnc_bench.backbones import DualEncoder
from rsnc_bench.data.images import MappedImages, SplitImages
from rsnc_bench.data.split import Split
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import Batch


@dataclass
class SplitTensors:
    """A split ready for the model: uint8 images [N_img, 3, H, W], token ids [N_rows, L], and
    the image of each caption row. Evaluation splits hold images at the model size; a training
    split holds them at native resolution on a common canvas, with each image's true
    (height, width) in ``sizes`` [N_img, 2]. ``images`` is a tensor, or ``MappedImages`` read from
    the cache file batch by batch (indexed alike)."""

    images: torch.Tensor | MappedImages
    text: torch.Tensor
    img_of: torch.Tensor
    sizes: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return len(self.text)

    # TrainData
    random_access = True

    def steps(self, rows: np.ndarray, batch_size: int) -> int:
        return steps_per_epoch(len(rows), batch_size)

    def epoch_batches(self, rows: np.ndarray, batch_size: int, generator: torch.Generator, resume: int | None = None) -> Iterator[RawBatch]:
        done = resume or 0  # batches taken before: the same order is drawn, and they are passed over
        return (raw_batch(self, picked, ids)._replace(position=i + 1)
                for i, (picked, ids) in enumerate(train_batches(self, rows, batch_size, generator)) if i >= done)

    def raw_rows(self, rows: torch.Tensor) -> RawBatch:
        rows = torch.as_tensor(rows).cpu()
        return raw_batch(self, rows, self.img_of[rows])


IN_MEMORY_SHARE = 0.25  # images="auto" holds a split in memory when it takes at most this share of the available memory


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# Where a split's decoded images live while a cell runs (TrainConfig.images): given the loader and
# whether it has a cache file, True to hold them in memory, False to read them from the file.
IMAGE_STORAGE = {
    "memory": lambda loader, cached: True,
    "disk": lambda loader, cached: False,
    "auto": lambda loader, cached: not cached or loader.nbytes <= IN_MEMORY_SHARE * available_memory(),
}


def split_tensors(split: Split, backbone: DualEncoder, cache_dir: Path | None = None, native: bool = False,
                  images: str = "memory") -> SplitTensors:
    """``native``: keep the images' own resolution (a training split, cropped per batch by Preprocess).
    ``images``: a key of ``IMAGE_STORAGE``; "disk" and a large split under "auto" are read from the
    memory-mapped cache in ``cache_dir`` instead of being copied into memory."""
    if images not in IMAGE_STORAGE:
        raise ConfigError(f"images={images!r}; choose one of {', '.join(IMAGE_STORAGE)}")
    if images == "disk" and cache_dir is None:
        raise ConfigError("images='disk' reads the decoded images from the image cache, and this run has none; use images=memory")
    loader = SplitImages(split, None if native else backbone.image_size, cache_dir=cache_dir)
    pixels = loader.stacked() if IMAGE_STORAGE[images](loader, cache_dir is not None) else loader.mapped()
    text = backbone.tokenize(list(split.captions))
    sizes = torch.from_numpy(loader.sizes()) if native else None
    return SplitTensors(pixels, text, torch.tensor(np.asarray(split.img_of), dtype=torch.long), sizes)


def bicubic_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """[B, out_size, in_size] resampling matrices that take pixels [start, start + length) of an
    axis of ``in_size`` pixels to ``out_size`` pixels: PIL's antialiased bicubic resize (a = -0.5,
    support 2, widened by the scale factor when shrinking, weights normalised per output pixel
    over the crop; Pillow's ImagingResample), applied to a crop without cutting it out. Boxes are
    whole pixels, so a batch repeats few (start, length) pairs: each is computed once per process."""
    pairs = torch.stack([start.long().cpu(), length.long().cpu()], 1).tolist()
    return torch.stack([_axis_weights(s, n, out_size, in_size) for s, n in pairs]).to(start.device)


@functools.lru_cache(maxsize=4096)
def _axis_weights(start: int, length: int, out_size: int, in_size: int) -> torch.Tensor:
    """One [out_size, in_size] matrix of ``bicubic_weights``, computed in float64."""
    scale = length / out_size
    widen = max(scale, 1.0)
    centre = start + (torch.arange(out_size, dtype=torch.float64).view(-1, 1) + 0.5) * scale
    pixel = torch.arange(in_size, dtype=torch.float64).view(1, -1)
    x = ((pixel + 0.5 - centre) / widen).abs()
    a = -0.5  # Keys' cubic with PIL's a; torch's non-antialiased bicubic uses -0.75
    w = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)))
    w = w * ((pixel >= start) & (pixel < start + length))
    return (w / w.sum(-1, keepdim=True)).float()


class Preprocess:
    """uint8 -> normalised float. Training batches (native images with their sizes) get the shared
    pipeline's augmentation (methods.md 2.6): torchvision's RandomResizedCrop at scale 0.9-1.0,
    ratio 3/4-4/3, bicubic, no flip; with ``augment`` off, the evaluation transform (shorter-side
    resize and centre crop). Crops are drawn on the CPU from ``generator`` (the same crops on
    every device) and resampled on the batch's device in one batched pass, without a per-image loop.
    """

    ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params

    def __init__(self, backbone: DualEncoder, augment: bool, generator: torch.Generator | None = None,
                 scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size = backbone.image_size
        self.mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std).view(1, 3, 1, 1)
        self.augment, self.generator = augment, generator
        self.scale, self.ratio = scale, ratio

    def __call__(self, images: torch.Tensor, device: torch.device, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """``sizes`` [B, 2]: the images are native-resolution training images to crop and resize;
        None: they are already at the model size (evaluation). Float ``images`` are not pixels but a
        frozen image trunk's outputs (trunk_outputs.py): they pass through."""
        if images.is_floating_point():
            return images.to(device, non_blocking=True)
        x = images.to(device, non_blocking=True).float().div_(255)
        if sizes is not None:
            top, left, height, width = self.crop_boxes(sizes) if self.augment else self.centre_boxes(sizes)
            x = self.resized_crop(x, top.to(device), left.to(device), height.to(device), width.to(device))
        return (x - self.mean.to(device)) / self.std.to(device)

    def skip(self, batches: int, rows: int) -> None:
        """Draw what ``batches`` training batches of ``rows`` images would draw from the generator (a
        crop's draws do not depend on the image), so that a resumed epoch crops as it would have."""
        if self.augment:
            for _ in range(batches):
                self.crop_boxes(torch.ones(rows, 2, dtype=torch.long))

    def crop_boxes(self, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(top, left, height, width), each [B] long: torchvision's RandomResizedCrop.get_params for a
        batch. Ten attempts of area in ``scale`` and log-uniform aspect in ``ratio``; the first whose
        box fits the image is placed uniformly; with none, the centre crop of the whole image with
        its aspect clamped to ``ratio``."""
        n, k = len(sizes), self.ATTEMPTS
        img_h, img_w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
        area = img_h * img_w * torch.empty(n, k, dtype=torch.float64).uniform_(*self.scale, generator=self.generator)
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        aspect = torch.exp(torch.empty(n, k, dtype=torch.float64).uniform_(log_lo, log_hi, generator=self.generator))
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        fits = (w > 0) & (w <= img_w) & (h > 0) & (h <= img_h)
        u_top, u_left = (torch.rand(n, k, 2, dtype=torch.float64, generator=self.generator)).unbind(-1)
        first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((n,), -1)).long()
        pick = first.clamp_min(0).unsqueeze(1)
        h, w = h.gather(1, pick).squeeze(1), w.gather(1, pick).squeeze(1)
        top = (u_top.gather(1, pick).squeeze(1) * (img_h.squeeze(1) - h + 1)).floor()
        left = (u_left.gather(1, pick).squeeze(1) * (img_w.squeeze(1) - w + 1)).floor()
        fallback = first < 0
        if fallback.any():
            ft, fl, fh, fw = self._fallback(sizes[fallback])
            top[fallback], left[fallback], h[fallback], w[fallback] = ft, fl, fh, fw
        return top.long(), left.long(), h.long(), w.long()

    def _fallback(self, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """torchvision's fallback: the whole image, its aspect clamped to ``ratio``, centred."""
        img_h, img_w = sizes[:, 0].double(), sizes[:, 1].double()
        aspect = img_w / img_h
        w = torch.where(aspect > self.ratio[1], (img_h * self.ratio[1]).round(), img_w)
        h = torch.where(aspect < self.ratio[0], (w / self.ratio[0]).round(), img_h)
        return ((img_h - h) // 2), ((img_w - w) // 2), h, w

    def centre_boxes(self, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The evaluation transform as a box: the centred square of the shorter side."""
        side = sizes.min(1).values
        return (sizes[:, 0] - side) // 2, (sizes[:, 1] - side) // 2, side, side

    def resized_crop(self, x: torch.Tensor, top, left, height, width) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, S, S]: each image's box resized with antialiased bicubic weights."""
        rows = bicubic_weights(top, height, self.size, x.shape[-2]).to(x.device)
        cols = bicubic_weights(left, width, self.size, x.shape[-1]).to(x.device)
        return (rows.unsqueeze(1) @ x @ cols.unsqueeze(1).transpose(-1, -2)).clamp_(0, 1)


class RawBatch(NamedTuple):
    """A training batch as stored, before preprocessing: train rows [B], the id of each row's image
    [B], the images (uint8 [B, 3, H, W], native on a common canvas for a training split), their
    true (height, width) [B, 2] (None: already at the model size) and token ids [B, L]."""

    rows: torch.Tensor
    image_ids: torch.Tensor
    images: torch.Tensor
    sizes: torch.Tensor | None
    text: torch.Tensor
    position: Any = None  # where the epoch stands after this batch: given back to ``epoch_batches``, it goes on from here


class TrainData(Protocol):
    """What the trainer draws training batches from: ``SplitTensors`` (the split in memory or
    memory-mapped), or a stream of shards. Every rank of a data-parallel cell receives the same
    global batches."""

    @property
    def n_rows(self) -> int: ...  # rows of the train split (the manifest's), seen or not

    def steps(self, rows: np.ndarray, batch_size: int) -> int: ...  # full batches per epoch over ``rows``

    def epoch_batches(self, rows: np.ndarray, batch_size: int, generator: torch.Generator, resume: Any = None) -> Iterator[RawBatch]:
        """The epoch's batches, drawing its order from ``generator``; ``resume``: a batch's ``position``
        (the generator in the state it had at the epoch's start), to go on after that batch."""

    random_access: bool  # whether ``raw_rows`` works (a stream reads its shards in order only)

    def raw_rows(self, rows: torch.Tensor) -> RawBatch: ...  # any rows, in the order given


def train_batches(data: SplitTensors, rows: np.ndarray, batch_size: int, generator: torch.Generator):
    """Shuffled batches of train rows; the incomplete last batch is dropped (methods.md 2.9)."""
    order = torch.as_tensor(rows)[torch.randperm(len(rows), generator=generator)]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        picked = order[start: start + batch_size]
        ids = data.img_of[picked]
        yield picked, ids


def raw_batch(data: SplitTensors, rows: torch.Tensor, image_ids: torch.Tensor) -> RawBatch:
    return RawBatch(rows, image_ids, data.images[image_ids], None if data.sizes is None else data.sizes[image_ids], data.text[rows])


def to_batch(raw: RawBatch, preprocess: Preprocess, device: torch.device) -> Batch:
    """The batch on ``device``; on CUDA the images and tokens are copied from pinned memory without blocking."""
    images, text = raw.images, raw.text
    if device.type == "cuda":
        images, text = images.pin_memory(), text.pin_memory()
    return Batch(
        images=preprocess(images, device, raw.sizes),
        text=text.to(device, non_blocking=True),
        rows=raw.rows.to(device),
        image_ids=raw.image_ids.to(device),
    )


def make_batch(data: SplitTensors, rows: torch.Tensor, image_ids: torch.Tensor, preprocess: Preprocess, device: torch.device) -> Batch:
    return to_batch(raw_batch(data, rows, image_ids), preprocess, device)


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return n_rows // batch_size
