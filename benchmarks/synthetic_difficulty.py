"""Is the built-in synthetic dataset learnable, and does noise visibly hurt? A small probe.

    python benchmarks/synthetic_difficulty.py [--epochs 12] [--rates 0,0.6]

Trains a deliberately small dual encoder (a 3-layer CNN on 32 px images, a bag-of-words text
encoder, symmetric InfoNCE) on the default synthetic train split, once per noise rate (rrsitr
protocol, seed 42), and prints test mR for each. Expect mR far above chance at rate 0 and a
clear drop at 0.6. This is a probe of the data, not a method; methods come with the harness.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsnc_bench.config import parse_floats
from rsnc_bench.data import load_dataset
from rsnc_bench.data.images import SplitImages
from rsnc_bench.engine.retrieval import cosine_blocks, grouped_recall
from rsnc_bench.noise import make_manifest


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class Probe(nn.Module):
    def __init__(self, vocab: int, dim: int = 64):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, dim))
        self.text = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.text_head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))

    def encode_text(self, ids, offsets):
        return self.text_head(self.text(ids, offsets))


def pack(captions: list[str], vocab: dict[str, int]):
    ids = [[vocab.get(t, 0) for t in tokens(c)] or [0] for c in captions]
    offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
    return torch.tensor([i for x in ids for i in x]), offsets


def run(data, rate: float, epochs: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    train = data["train"]
    if rate > 0:
        train = make_manifest(train, "synthetic", "rrsitr", rate, 42).apply(train)
    vocab = {w: i + 1 for i, w in enumerate(sorted({t for c in data["train"].captions for t in tokens(c)}))}
    pixels = {s: torch.stack([SplitImages(data[s], 32)[i] for i in range(data[s].n_images)]).float() / 255
              for s in ("train", "test")}
    model = Probe(len(vocab) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.RandomState(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(train.n_rows), train.n_rows // 100):
            img = model.image(pixels["train"][train.img_of[batch]])
            txt = model.encode_text(*pack([train.captions[r] for r in batch], vocab))
            logits = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T / 0.05
            target = torch.arange(len(batch))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        test = data["test"]
        metrics = grouped_recall(cosine_blocks(model.encode_text(*pack(list(test.captions), vocab)),
                                               model.image(pixels["test"])), test.img_of)
    return metrics.mr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rates", default="0,0.6")
    args = parser.parse_args()
    data = load_dataset("synthetic")
    chance = 100 * np.mean([1 / data["test"].n_images * k for k in (1, 5, 10)] * 2)
    print(f"synthetic default test set: {data['test'].n_images} images; chance mR about {chance:.1f}\n")
    print("| noise rate (rrsitr, seed 42) | test mR |\n|---|---|")
    for rate in parse_floats(args.rates, "rates"):
        print(f"| {rate:g} | {run(data, rate, args.epochs):.2f} |")


if __name__ == "__main__":
    main()
