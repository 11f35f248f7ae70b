"""Leaderboard: mean/std over seeds, failed counts, markdown and CSV."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest

from rsnc_bench.leaderboard import leaderboard, summary_line, to_csv, to_markdown, write_leaderboard
from rsnc_bench.store import ResultStore

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


def row(df: pd.DataFrame, **match) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for col, value in match.items():
        mask &= df[col] == value
    assert mask.sum() == 1, match
    return df[mask].iloc[0]


def test_mean_std_and_counts(results):
    df = leaderboard(results)
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


def test_sort_order(results):
    df = leaderboard(results)
    order = list(zip(df.backbone, df.noise_rate, df.method))
    assert order == [("ViT-B-32-quickgelu", 0.4, "clip-ft"), ("tiny-vit", 0.2, "clip-ft"),
                     ("tiny-vit", 0.4, "ncr"), ("tiny-vit", 0.4, "clip-ft"), ("tiny-vit", 0.4, "dead")]


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
    assert "(val split)" in to_markdown(df)


def test_markdown(results):
    md = to_markdown(leaderboard(results))
    lines = md.splitlines()
    assert "## synthetic / tiny-vit / shuffle noise" in lines
    assert "## synthetic / ViT-B-32-quickgelu / shuffle noise" in lines
    tiny = md.split("## synthetic / tiny-vit / shuffle noise")[1].split("##")[0].splitlines()
    header = next(line for line in tiny if line.startswith("| method"))
    for name in ("noise", "mR", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "n",
                 "failed", "AUROC"):
        assert f" {name} " in header
    clip = next(line for line in lines if line.startswith("| clip-ft") and "42.00" in line)
    cells = [c.strip() for c in clip.strip("|").split("|")]
    assert cells[:4] == ["clip-ft", "0.4", "42.00 ± 2.00", "32.00"] and cells[-3:] == ["3", "0", "0.85"]
    ncr = next(line for line in lines if line.startswith("| ncr"))
    assert "50.00" in ncr and "±" not in ncr
    # a table whose rows have no AUROC and no failures shows neither column
    vit_section = md.split("## synthetic / ViT-B-32-quickgelu")[1].split("##")[0]
    assert "AUROC" not in vit_section and "failed" not in vit_section
    assert all(line.count("|") == header.count("|") for line in tiny if line.startswith("|"))


def test_csv_round_trip(results):
    df = leaderboard(results)
    back = pd.read_csv(io.StringIO(to_csv(df)))
    assert list(back.columns[:7]) == ["dataset", "backbone", "noise_protocol", "noise_rate", "method", "n", "failed"]
    assert {"mr_mean", "mr_std", "t2i_r10_mean", "t2i_r10_std", "auroc_mean"} <= set(back.columns)
    assert len(back) == len(df)
    clip = row(back, method="clip-ft", backbone="tiny-vit", noise_rate=0.4)
    assert clip.mr_mean == pytest.approx(42.0) and clip.mr_std == pytest.approx(2.0)
    assert math.isnan(row(back, method="ncr").mr_std)


def test_write_leaderboard_and_empty(tmp_path, results):
    store = ResultStore(tmp_path)
    md, csv = write_leaderboard(tmp_path, [])
    assert (md, csv) == (tmp_path / "leaderboard.md", tmp_path / "leaderboard.csv")
    assert "No complete results yet" in md.read_text()
    assert pd.read_csv(csv).empty and "mr_mean" in pd.read_csv(csv).columns
    for d in results:
        store.write(d)
    md, csv = write_leaderboard(tmp_path, store.iter_results())
    assert "42.00 ± 2.00" in md.read_text() and len(pd.read_csv(csv)) == 5
    assert len(list(store.iter_results())) == len(results) and store.problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv", "leaderboard.md", "synthetic"]


def test_only_failed_results():
    df = leaderboard([doc(0.0, "failed")])
    assert len(df) == 1 and df.failed[0] == 1 and df.n[0] == 0
    assert "| clip-ft" in to_markdown(df)


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
