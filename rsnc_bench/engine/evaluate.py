"""Evaluate a method on a split: encode once, run its scorers, grouped recall per scorer.

Evaluation is always fp32 with autocast switched off, whatever the training precision: bf16
cosines take about 180 distinct values per 1,093-image row and move recalls by up to half a
point (RemoteCLIP evaluates in fp32, protocol.md 8). Results record ``eval_precision``.
"""

from __future__ import annotations

import torch

from rsnc_bench.backbones import Features
from rsnc_bench.engine.batches import Preprocess, SplitTensors
from rsnc_bench.engine.embedding_cache import EmbeddingCache
from rsnc_bench.engine.retrieval import Reranked, RetrievalMetrics, grouped_recall, grouped_recall_reranked
from rsnc_bench.engine.scoring import EncodedSplit, Scorer, full_precision
from rsnc_bench.methods import Method

EVAL_PRECISION = "fp32"


def _concat(parts: list[Features]) -> Features:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Features(cat("embedding"), cat("tokens"), cat("mask"))


@torch.no_grad()
def encode_split(method: Method, data: SplitTensors, device: torch.device, batch_size: int = 256) -> tuple[Features, Features]:
    """(text features of every caption row, image features of every image) in fp32, kept on
    ``device``; token features too when the method declares ``needs_tokens``."""
    preprocess = Preprocess(method.backbone, augment=False)
    tokens = method.capabilities.needs_tokens
    images, texts = [], []
    with full_precision(device):
        for start in range(0, len(data.images), batch_size):
            images.append(method.backbone.encode_image(preprocess(data.images[start: start + batch_size], device), tokens=tokens))
        for start in range(0, data.n_rows, batch_size):
            texts.append(method.backbone.encode_text(data.text[start: start + batch_size].to(device), tokens=tokens))
    return _concat(texts), _concat(images)


@torch.no_grad()
def evaluate(method: Method, data: SplitTensors, device: torch.device, chunk: int = 1024,
             scorers: list[Scorer] | None = None, cache: EmbeddingCache | None = None) -> dict[str, RetrievalMetrics]:
    """Metrics per scorer tag, in the order of ``scorers`` (default: the method's own), in fp32.
    The first is the method's own row. With a ``cache``, a method that does not train encodes a
    split once across cells."""
    scorers = method.scorers() if scorers is None else scorers
    was_training = method.training
    method.eval()
    try:
        encode = lambda: encode_split(method, data, device)  # noqa: E731
        texts, images = encode() if cache is None else cache.encoded(method, data.images, data.text, device, EVAL_PRECISION, encode)
        split = EncodedSplit(method, texts, images, chunk, keep=len(scorers) > 1)
        img_of = data.img_of.numpy()
        out = {}
        for scorer in scorers:
            ranked = scorer(split)
            if isinstance(ranked, Reranked):  # one matrix per direction (SAR)
                out[scorer.tag] = grouped_recall_reranked(ranked, img_of, chunk=chunk)
            else:
                out[scorer.tag] = grouped_recall(ranked, img_of, chunk=chunk)
        return out
    finally:
        method.train(was_training)


def own_metrics(results: dict[str, RetrievalMetrics]) -> RetrievalMetrics:
    """The method's own row of an ``evaluate`` result."""
    return next(iter(results.values()))
