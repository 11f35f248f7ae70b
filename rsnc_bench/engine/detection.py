"""How well a method's clean-ness signal finds the injected noisy rows.

Noisy rows are the positives. Given one clean-ness score per train row (higher = cleaner, the
``LossOutput.clean`` convention), AUROC and average precision measure the ranking; a method's
native binary flag ("this row is noisy") gets precision, recall and F1. Rows a method never
scored (NaN) are left out and counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rsnc_bench.errors import ConfigError


@dataclass(frozen=True)
class DetectionMetrics:
    auroc: float
    ap: float
    n_scored: int
    n_noisy: int
    flag_precision: float = math.nan
    flag_recall: float = math.nan
    flag_f1: float = math.nan
    n_flagged: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        """NaN (undefined: no noisy rows, nothing flagged) becomes None, for JSON."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    bounds = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ranks[order[lo:hi]] = (lo + 1 + hi) / 2
    return ranks


def auroc(noisiness: np.ndarray, is_noisy: np.ndarray) -> float:
    """P(a noisy row scores noisier than a clean one), ties counted half (Mann-Whitney U)."""
    pos, neg = int(is_noisy.sum()), int((~is_noisy).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = _average_ranks(noisiness)
    return float((ranks[is_noisy].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(noisiness: np.ndarray, is_noisy: np.ndarray) -> float:
    """Sum over distinct thresholds of (recall step) x precision, the usual step-wise AP."""
    pos = int(is_noisy.sum())
    if pos == 0:
        return math.nan
    order = np.argsort(-noisiness, kind="stable")
    scores, labels = noisiness[order], is_noisy[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(labels)[last_of_tie]
    seen = (np.arange(1, len(labels) + 1))[last_of_tie]
    recall_steps = np.diff(np.r_[0, tp]) / pos
    return float((recall_steps * tp / seen).sum())


def detection_metrics(clean_score, clean, flagged_noisy=None) -> DetectionMetrics:
    """Score a per-row clean-ness signal (higher = cleaner) against the manifest's clean flags."""
    clean_score = np.asarray(clean_score, dtype=np.float64)
    clean = np.asarray(clean, dtype=bool)
    if clean_score.shape != clean.shape:
        raise ConfigError(f"{len(clean_score)} clean-ness scores for {len(clean)} train rows; give one per row")
    scored = ~np.isnan(clean_score)
    is_noisy = ~clean[scored]
    noisiness = -clean_score[scored]
    metrics = dict(auroc=auroc(noisiness, is_noisy), ap=average_precision(noisiness, is_noisy),
                   n_scored=int(scored.sum()), n_noisy=int(is_noisy.sum()))
    if flagged_noisy is not None:
        flagged = np.asarray(flagged_noisy, dtype=bool)[scored]
        tp = int((flagged & is_noisy).sum())
        precision = tp / flagged.sum() if flagged.any() else math.nan
        recall = tp / is_noisy.sum() if is_noisy.any() else math.nan
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
        metrics.update(flag_precision=float(precision), flag_recall=float(recall), flag_f1=float(f1), n_flagged=int(flagged.sum()))
    return DetectionMetrics(**metrics)
