"""Split data as tensors for training and evaluation: images in memory, captions tokenised once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsnc_bench.backbones import DualEncoder
from rsnc_bench.data.images import SplitImages
from rsnc_bench.data.split import Split
from rsnc_bench.methods import Batch


@dataclass
class SplitTensors:
    """A split ready for the model: uint8 images [N_img, 3, S, S], token ids [N_rows, L], and
    the image of each caption row."""

    images: torch.Tensor
    text: torch.Tensor
    img_of: torch.Tensor

    @property
    def n_rows(self) -> int:
        return len(self.text)


def split_tensors(split: Split, backbone: DualEncoder, cache_dir: Path | None = None) -> SplitTensors:
    images = SplitImages(split, backbone.image_size, cache_dir=cache_dir).stacked()
    text = backbone.tokenize(list(split.captions))
    return SplitTensors(images, text, torch.tensor(np.asarray(split.img_of), dtype=torch.long))


class Preprocess:
    """uint8 -> normalised float, with the shared pipeline's training augmentation
    (methods.md 2.6): RandomResizedCrop at scale 0.9-1.0, bicubic, no flip."""

    def __init__(self, backbone: DualEncoder, augment: bool, generator: torch.Generator | None = None):
        self.size = backbone.image_size
        self.mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std).view(1, 3, 1, 1)
        self.augment, self.generator = augment, generator

    def __call__(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = images.to(device, non_blocking=True).float().div_(255)
        if self.augment:
            x = self._random_resized_crop(x)
        return (x - self.mean.to(device)) / self.std.to(device)

    def _random_resized_crop(self, x: torch.Tensor, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
        # torchvision's RandomResizedCrop area/ratio sampling, drawn from our own generator
        n, _, h, w = x.shape
        area = torch.empty(n).uniform_(*scale, generator=self.generator) * h * w
        log_ratio = torch.empty(n).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=self.generator)
        aspect = torch.exp(log_ratio)
        cw = torch.sqrt(area * aspect).round().clamp(1, w).long()
        ch = torch.sqrt(area / aspect).round().clamp(1, h).long()
        top = (torch.rand(n, generator=self.generator) * (h - ch + 1)).long()
        left = (torch.rand(n, generator=self.generator) * (w - cw + 1)).long()
        out = [
            F.interpolate(x[i: i + 1, :, t: t + c_h, l: l + c_w], size=(self.size, self.size), mode="bicubic", align_corners=False)
            for i, (t, l, c_h, c_w) in enumerate(zip(top.tolist(), left.tolist(), ch.tolist(), cw.tolist()))
        ]
        return torch.cat(out).clamp_(0, 1)


def train_batches(data: SplitTensors, rows: np.ndarray, batch_size: int, generator: torch.Generator):
    """Shuffled batches of train rows; the incomplete last batch is dropped (methods.md 2.9)."""
    order = torch.as_tensor(rows)[torch.randperm(len(rows), generator=generator)]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        picked = order[start: start + batch_size]
        ids = data.img_of[picked]
        yield picked, ids


def make_batch(data: SplitTensors, rows: torch.Tensor, image_ids: torch.Tensor, preprocess: Preprocess, device: torch.device) -> Batch:
    return Batch(
        images=preprocess(data.images[image_ids], device),
        text=data.text[rows].to(device, non_blocking=True),
        rows=rows.to(device),
        image_ids=image_ids.to(device),
    )


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return n_rows // batch_size
