"""Evaluate a method on a split: encode once, score in chunks, grouped recall.

Evaluation is always fp32 with autocast switched off, whatever the training precision: bf16
cosines take about 180 distinct values per 1,093-image row and move recalls by up to half a
point (RemoteCLIP evaluates in fp32, protocol.md 8). Results record ``eval_precision``.
"""

from __future__ import annotations

import torch

from rsnc_bench.backbones import Features
from rsnc_bench.engine.batches import Preprocess, SplitTensors
from rsnc_bench.engine.retrieval import Reranked, RetrievalMetrics, grouped_recall, grouped_recall_reranked
from rsnc_bench.methods import Method

EVAL_PRECISION = "fp32"


def _concat(parts: list[Features]) -> Features:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Features(cat("embedding"), cat("tokens"), cat("mask"))


def full_precision(device: torch.device):
    """A context that switches off any autocast the caller entered (training, a user's)."""
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def encode_split(method: Method, data: SplitTensors, device: torch.device, batch_size: int = 256) -> tuple[Features, Features]:
    """(text features of every caption row, image features of every image) in fp32, kept on ``device``."""
    preprocess = Preprocess(method.backbone, augment=False)
    images, texts = [], []
    with full_precision(device):
        for start in range(0, len(data.images), batch_size):
            images.append(method.encode_images(preprocess(data.images[start: start + batch_size], device)))
        for start in range(0, data.n_rows, batch_size):
            texts.append(method.encode_texts(data.text[start: start + batch_size].to(device)))
    return _concat(texts), _concat(images)


def _chunk(features: Features, start: int, stop: int) -> Features:
    pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
    return Features(pick(features.embedding), pick(features.tokens), pick(features.mask))


@torch.no_grad()
def score_blocks(method: Method, texts: Features, images: Features, chunk: int):
    """Score rows of caption chunks against all images (methods score in chunks, methods.md 2.11),
    each block in fp32 whatever autocast the caller is in."""
    device = texts.embedding.device
    with full_precision(device):
        method.begin_scoring(texts, images)
    n = len(texts.embedding)
    for start in range(0, n, chunk):
        with full_precision(device):
            block = method.score(_chunk(texts, start, min(n, start + chunk)), images).float().cpu()
        yield block


@torch.no_grad()
def evaluate(method: Method, data: SplitTensors, device: torch.device, chunk: int = 1024) -> dict[str, RetrievalMetrics]:
    """``{"plain": metrics}``, plus ``{"rerank": metrics}`` when the method has a re-ranker; in fp32."""
    was_training = method.training
    method.eval()
    try:
        texts, images = encode_split(method, data, device)
        img_of = data.img_of.numpy()
        if type(method).rerank is Method.rerank:  # no re-ranker: stream the blocks
            return {"plain": grouped_recall(score_blocks(method, texts, images, chunk), img_of, chunk=chunk)}
        scores = torch.cat(list(score_blocks(method, texts, images, chunk)))
        out = {"plain": grouped_recall(scores, img_of, chunk=chunk)}
        with full_precision(scores.device):
            reranked = method.rerank(scores)
        if isinstance(reranked, Reranked):  # one matrix per direction (SAR)
            out["rerank"] = grouped_recall_reranked(reranked, img_of, chunk=chunk)
        elif reranked is not None:
            out["rerank"] = grouped_recall(reranked, img_of, chunk=chunk)
        return out
    finally:
        method.train(was_training)
