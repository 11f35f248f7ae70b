"""The results model: one frame of runs, mean/std over seeds, failed counts."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rsnc_bench.results import aggregate, runs, summary_line

from .test_store import make_doc, make_key

RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]


def doc(mr: float, status: str = "complete", auroc: float | None = None, **key) -> dict:
    d = make_doc(make_key(**key), status, mr=mr)
    if d["test"]:
        d["test"]["i2t_r1"] = mr - 10  # distinct recall to check it is averaged too
    d["detection"] = {"auroc": auroc, "ap": 0.5} if auroc is not None else None
    return d


@pytest.fixture
def results() -> list[dict]:
    return [
        doc(40.0, noise_seed=0, train_seed=0, auroc=0.8),
        doc(42.0, noise_seed=0, train_seed=1, auroc=0.9),
        doc(44.0, noise_seed=1, train_seed=0, auroc=None),
        doc(50.0, method="ncr", noise_seed=0, train_seed=0),
        doc(0.0, "failed", method="ncr", noise_seed=0, train_seed=1),
        doc(0.0, "diverged", method="dead", noise_seed=0, train_seed=0),
        doc(30.0, noise_rate=0.2),
        doc(60.0, backbone="ViT-B-32-quickgelu"),
    ]


def leaderboard(results, split: str = "test") -> pd.DataFrame:
    return aggregate(runs(results, split))


def row(df: pd.DataFrame, **match) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for col, value in match.items():
        mask &= df[col] == value
    assert mask.sum() == 1, match
    return df[mask].iloc[0]


def test_mean_std_and_counts(results):
    df = leaderboard(results)
    assert list(df.columns[:7]) == ["dataset", "backbone", "noise_protocol", "noise_rate", "method", "n", "failed"]
    clip = row(df, method="clip-ft", backbone="tiny-vit", noise_rate=0.4)
    assert clip.n == 3 and clip.failed == 0
    assert clip.mr_mean == pytest.approx(42.0) and clip.mr_std == pytest.approx(2.0)
    assert clip.i2t_r1_mean == pytest.approx(32.0) and clip.t2i_r10_std == pytest.approx(2.0)
    assert clip.auroc_mean == pytest.approx(0.85)
    ncr = row(df, method="ncr")
    assert ncr.n == 1 and ncr.failed == 1 and ncr.mr_mean == 50.0 and math.isnan(ncr.mr_std)
    dead = row(df, method="dead")
    assert dead.n == 0 and dead.failed == 1 and math.isnan(dead.mr_mean)
    assert len(df) == 5


def test_duplicate_cell_counted_once(results):
    dup = doc(99.0, noise_seed=0, train_seed=0, auroc=0.8)
    dup["finished_at"] = "2030-01-01T00:00:00"
    df = leaderboard([*results, dup])
    clip = row(df, method="clip-ft", backbone="tiny-vit", noise_rate=0.4)
    assert clip.n == 3 and clip.mr_mean == pytest.approx((99 + 42 + 44) / 3)


def test_other_split(results):
    for d in results:
        if d["test"]:
            d["val"] = {**d["test"], "mr": d["test"]["mr"] + 1}
    df = leaderboard(results, split="val")
    assert row(df, method="clip-ft", backbone="tiny-vit", noise_rate=0.4).mr_mean == pytest.approx(43.0)


def test_only_failed_results():
    df = leaderboard([doc(0.0, "failed")])
    assert len(df) == 1 and df.failed[0] == 1 and df.n[0] == 0 and math.isnan(df.mr_mean[0])


def test_summary_line():
    d = doc(45.123, noise_seed=0, train_seed=1)
    d.update(val={"mr": 47.0}, selected_epoch=3, timings={"train_seconds": 12.34})
    assert summary_line(d) == "clip-ft synthetic tiny-vit shuffle r0.4 n0 s1: test mR 45.12 (val 47.00 @ epoch 3), 12.3 s"
    assert summary_line(doc(0.0, "failed")) == "clip-ft synthetic tiny-vit shuffle r0.4 n0 s1: failed: CUDA out of memory"


def test_score_tag_names_its_own_row():
    """A result whose scorer was tagged (PMPGuard re-scoring a first stage's top K) never
    averages with the method's full-score results."""
    tagged = doc(20.0, method="pmpguard", train_seed=2)
    tagged["score_tag"] = "top100"
    df = leaderboard([doc(30.0, method="pmpguard"), tagged])
    assert row(df, method="pmpguard").mr_mean == 30.0
    assert row(df, method="pmpguard@top100").mr_mean == 20.0
