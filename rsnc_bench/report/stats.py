"""Paired significance test between two methods: an exact sign-flip permutation test.

Fisher's randomisation test for paired data (R. A. Fisher, *The Design of Experiments*, 1935, §21;
see also P. Good, *Permutation, Parametric and Bootstrap Tests of Hypotheses*, 3rd ed., 2005, §3.1):
under the null hypothesis that the two methods are exchangeable, each paired difference is
equally likely to carry either sign. The two-sided p-value is the share of the 2^n sign patterns
whose |mean difference| is at least the observed one (the observed pattern included, so p > 0).
All 2^n patterns are enumerated up to n = 16; above that a fixed-seed Monte Carlo sample of
patterns is used, with p = (1 + hits) / (1 + draws) (Phipson & Smyth, 2010).

With n pairs the smallest attainable p is 2 / 2^n: at least 6 pairs are needed to reach p < 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
EXACT_MAX_PAIRS = 16  # 2^16 sign patterns
MONTE_CARLO_DRAWS = 2**16
SEED = 0


@dataclass(frozen=True)
class PairedTest:
    n: int  # paired differences
    mean_diff: float  # mean of a - b
    p_value: float
    exact: bool

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def min_p(self) -> float:
        """The smallest p-value this many pairs can give (exact test)."""
        return 2.0 / 2**self.n if self.n else 1.0


def sign_flip_test(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0 (pairs with a NaN are dropped)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    n = len(diff)
    if n == 0:
        return PairedTest(0, math.nan, 1.0, True)
    observed = abs(diff.mean())
    tol = 1e-9 * max(1.0, float(np.abs(diff).max()))  # float ties count as "at least as extreme"
    if n <= EXACT_MAX_PAIRS:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        stats = np.abs(signs @ diff) / n
        p = float(np.mean(stats >= observed - tol))
        return PairedTest(n, float(diff.mean()), p, True)
    rng = np.random.default_rng(SEED)
    hits = 0
    for start in range(0, MONTE_CARLO_DRAWS, 4096):
        signs = rng.choice([-1.0, 1.0], size=(min(4096, MONTE_CARLO_DRAWS - start), n))
        hits += int(np.sum(np.abs(signs @ diff) / n >= observed - tol))
    return PairedTest(n, float(diff.mean()), (1 + hits) / (1 + MONTE_CARLO_DRAWS), False)
