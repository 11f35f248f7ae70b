"""Noise-detection metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rsnc_bench.engine.detection import auroc, average_precision, detection_metrics


def brute_auroc(noisiness, is_noisy):
    pairs = list(itertools.product(noisiness[is_noisy], noisiness[~is_noisy]))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def brute_ap(noisiness, is_noisy):
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(noisiness), reverse=True):
        chosen = noisiness >= t
        recall = (chosen & is_noisy).sum() / is_noisy.sum()
        ap += (recall - last_recall) * (chosen & is_noisy).sum() / chosen.sum()
        last_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_their_definitions_with_ties(seed):
    rng = np.random.RandomState(seed)
    noisiness = np.round(rng.randn(60), 1)
    is_noisy = rng.rand(60) < 0.4
    assert auroc(noisiness, is_noisy) == pytest.approx(brute_auroc(noisiness, is_noisy))
    assert average_precision(noisiness, is_noisy) == pytest.approx(brute_ap(noisiness, is_noisy))


def test_hand_made_case_with_flag_and_unscored_rows():
    clean_score = [0.9, 0.8, 0.3, 0.1, np.nan]
    clean = [True, False, True, False, False]
    m = detection_metrics(clean_score, clean, flagged_noisy=[False, True, True, False, True])
    assert m.auroc == pytest.approx(0.75)  # 3 of 4 (noisy, clean) pairs ordered right
    assert m.ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert (m.n_scored, m.n_noisy, m.n_flagged) == (4, 2, 2)
    assert (m.flag_precision, m.flag_recall, m.flag_f1) == pytest.approx((0.5, 0.5, 0.5))


def test_undefined_values_become_none():
    m = detection_metrics([0.1, 0.2], [True, True], flagged_noisy=[False, False])
    assert math.isnan(m.auroc) and math.isnan(m.ap)
    assert m.as_dict()["auroc"] is None and m.as_dict()["flag_precision"] is None


def test_perfect_signal():
    m = detection_metrics([1, 1, 0, 0], [True, True, False, False])
    assert m.auroc == 1.0 and m.ap == 1.0
