"""A stand-in backbone for method unit tests: token features from a lookup table, so row r of a
batch always gets the same random text and image tokens."""

from __future__ import annotations

import torch
from torch import nn

from rsnc_bench.backbones import Features
from rsnc_bench.methods import Batch


class TokenBackbone(nn.Module):
    embed_dim = 8

    def __init__(self, rows: int = 10):
        super().__init__()
        self.text = nn.Parameter(torch.randn(rows, 4, self.embed_dim))
        self.image = nn.Parameter(torch.randn(rows, 3, self.embed_dim))

    def encode_text(self, ids, tokens=False):
        t = self.text[ids[:, 0]]
        return Features(t.mean(1), t, torch.ones(t.shape[:2], dtype=torch.bool))

    def encode_image(self, images, tokens=False):
        v = self.image[images[:, 0, 0, 0].long()]
        return Features(v.mean(1), v, torch.ones(v.shape[:2], dtype=torch.bool))


def token_batch(rows: list[int]) -> Batch:
    """A batch whose text ids and images carry the row index the stub looks up."""
    index = torch.tensor(rows)
    return Batch(index.float()[:, None, None, None].expand(-1, 3, 1, 1), index[:, None], index, index)
