"""The report: tables from a hand-made store with known values, the paired test, plots, missing
cells, the HTML page (in headless Chromium when it can start), the CLI, and a tiny real run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsnc_bench.errors import ConfigError
from rsnc_bench.report import ReportOptions, write_report
from rsnc_bench.report.frame import load
from rsnc_bench.report.references import DEFAULT_PATH, load_references
from rsnc_bench.report.stats import sign_flip_test
from rsnc_bench.report.tables import detailed_tables, detection_tables, latex_escape, leaderboard_tables, long_table, significance, to_latex, to_markdown
from rsnc_bench.store import ResultStore

from .test_cli import TINY, assert_user_error, run
from .test_store import make_doc, make_key

ODD = "my_method&co"  # a name every renderer must escape
KEY = dict(dataset="rsitmd", backbone="ViT-B-32-quickgelu", noise_protocol="rrsitr", noise_seed=0)
MR = {  # method -> rate -> mR per train seed 1, 2, 3
    "clip-ft": {0.0: [40, 42, 44], 0.4: [30, 31, 32]},
    "rrsitr": {0.0: [45, 46, 47], 0.4: [40, 42, 44]},
    ODD: {0.0: [41, 41, 41], 0.4: [35, 36, 37]},
    "twin": {0.0: [40, 42, 44], 0.4: [30, 31, 32]},  # identical to clip-ft
    "oracle": {0.0: [50, 50, 50], 0.4: [49, 49, 49]},
}


def result(method: str, rate: float, seed: int, mr: float, **extra) -> dict:
    doc = make_doc(make_key(method=method, noise_rate=rate, train_seed=seed, **KEY), mr=mr, **extra)
    doc["test"]["i2t_r1"] = mr - 10
    doc["test"]["rsum"] = sum(v for k, v in doc["test"].items() if k not in ("mr", "rsum"))
    doc["history"] = [{"epoch": e, "val": {"mr": mr - 3 + e}} for e in (1, 2, 3)]
    doc["environment"] = {"python": "3.11.7", "device": "cpu", "packages": {"torch": "2.4.0"}}
    doc["finished_at"] = f"2026-01-0{seed}T00:00:00+00:00"
    return doc


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "runs"
    s = ResultStore(root)
    rng = np.random.default_rng(0)
    for method, rates in MR.items():
        for rate, values in rates.items():
            for seed, mr in enumerate(values, start=1):
                doc = result(method, rate, seed, mr)
                if method == "rrsitr" and rate == 0.4:
                    doc["detection"] = {"auroc": [0.8, 0.9, 0.85][seed - 1], "ap": 0.7, "flag_precision": 0.6,
                                        "flag_recall": [0.5, 0.7, 0.6][seed - 1]}
                    key = make_key(method=method, noise_rate=rate, train_seed=seed, **KEY)
                    clean = rng.random(200) > 0.4
                    score = np.where(clean, 1.0, 0.0) + rng.normal(0, 0.6, 200)
                    doc["detection_scores"] = s.write_scores(key, score, clean, score < 0.5)
                s.write(doc)
    s.write(result("solo", 0.0, 1, 30.0))  # one seed: in the tables, not in the paired test
    s.write(make_doc(make_key(method=ODD, noise_rate=0.4, train_seed=4, **KEY), "failed"))
    keys = [make_key(method=m, noise_rate=r, train_seed=t, **KEY) for m in MR for r in (0.0, 0.4) for t in (1, 2, 3)]
    keys.append(make_key(method="clip-ft", noise_rate=0.8, train_seed=1, **KEY))  # never run: missing
    keys.append(make_key(method=ODD, noise_rate=0.4, train_seed=4, **KEY))
    s.write_grid({"methods": list(MR), "noise": [0.0, 0.4, 0.8]}, keys)
    return root


def cells_of(markdown: str, first: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {first} "))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def test_results_means_stds_counts_and_marks(store):
    data = load(store, ReportOptions())
    [table] = leaderboard_tables(data)
    assert table.header == ["method", "0%", "0% reported", "40%", "40% reported"]
    rows = {row[0].text: row for row in table.rows}
    assert [row[0].text for row in table.rows][-1] == "oracle†"  # shown last, never ranked
    clip, rr, odd = rows["clip-ft"], rows["rrsitr"], rows[ODD]
    assert (clip[1].mean, clip[1].std, clip[1].n) == (42.0, 2.0, 3)
    assert (rr[3].mean, rr[3].std) == (42.0, 2.0) and odd[3].mean == 36.0 and odd[3].mark == "+1 failed"
    assert (rr[1].rank, clip[1].rank, rows["twin"][1].rank, odd[1].rank, rows["oracle†"][1].rank) == (1, 2, 2, 0, 0)
    assert (rr[3].rank, odd[3].rank, clip[3].rank) == (1, 2, 0)
    assert rows["solo"][3].text == "–" and rows["solo"][1].n == 1
    assert rr[2].reported and rr[2].text == "46.10 ± 1.08" and rr[4].text == "43.64"  # methods.md §7.1, §7.2
    assert clip[2].text == "40–46" and not rows[ODD][2].text  # the sanity band of protocol.md §8
    md = to_markdown(table)
    assert cells_of(md, "rrsitr") == ["rrsitr", "**46.00 ± 1.00** (3)", "*46.10 ± 1.08*", "**42.00 ± 2.00** (3)", "*43.64*"]
    assert cells_of(md, "clip-ft")[1] == "<u>42.00 ± 2.00</u> (3)"
    assert cells_of(md, "my_method&co")[3] == "<u>36.00 ± 1.00</u> (3) +1 failed"
    assert cells_of(md, "solo")[1] == "30.00 (1)"  # one run: no std
    assert "methods.md §7.1" in md and "methods.md §7.2" in md


def test_latex_booktabs_and_escaping(store):
    tex = to_latex(leaderboard_tables(load(store, ReportOptions()))[0])
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrr}"):
        assert rule in tex
    assert r"my\_method\&co" in tex and "my_method&co" not in tex
    assert r"\textbf{46.00}\,{\scriptsize$\pm$1.00}\,{\scriptsize(3)}" in tex
    assert r"\underline{42.00}" in tex and r"\textit{46.10 $\pm$ 1.08}" in tex
    assert r"0\% reported" in tex and r"\label{tab:leaderboard-rsitmd-ViT-B-32-quickgelu-rrsitr}" in tex
    assert latex_escape(r"a_b%c$d#e{f}g~h^i\j&") == (r"a\_b\%c\$d\#e\{f\}g\textasciitilde{}h\textasciicircum{}i"
                                                     r"\textbackslash{}j\&")


def test_detailed_table_has_every_metric_and_the_reported_rows(store):
    [table] = detailed_tables(load(store, ReportOptions()))
    assert table.header == ["method", "noise", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10",
                            "mR", "rSum", "n"]
    row = next(r for r in table.rows if r[0].text == "rrsitr" and r[1].text == "0%")
    assert row[2].mean == 36.0 and row[8].mean == 46.0 and row[9].mean == pytest.approx(5 * 46 + 36)
    assert row[2].rank == 1 and row[-1].text == "3"
    reported = next(r for r in table.rows if r[0].text == "RRSITR (CVPR'26) (reported)" and r[1].text == "0%")
    assert reported[2].text == "25.44 ± 0.54" and reported[8].text == "46.10 ± 1.08"
    assert reported[9].text == "276.60 ± 6.48"  # rSum = 6 mR
    assert table.rules_before  # a rule between the noise-rate blocks


def test_detection_table(store):
    [table] = detection_tables(load(store, ReportOptions()))
    assert table.header[:7] == ["method", "noise", "realised %", "AUROC", "AP", "flag precision", "flag recall"]
    [row] = table.rows
    assert row[0].text == "rrsitr" and row[1].text == "40%"
    assert row[3].mean == pytest.approx(0.85) and row[3].std == pytest.approx(0.05) and row[3].digits == 3
    assert row[6].mean == pytest.approx(0.6) and row[-1].text == "3"
    assert "0.850 ± 0.050" in to_markdown(table)


def test_significance_marks_only_real_differences(store):
    [comparison] = significance(load(store, ReportOptions()))
    assert comparison.baseline == "clip-ft"
    rows = {r[0].text: r for r in comparison.table.rows}
    rr, twin = rows["rrsitr"], rows["twin"]
    assert rr[2].mean == pytest.approx(7.5) and rr[3].text == "6" and rr[4].text == "3"
    assert rr[5].mean == pytest.approx(2 / 64) and rr[6].text == "significant" and not rr[2].mark
    assert twin[5].mean == 1.0 and twin[6].text == "n.s." and twin[2].mark == "n.s."
    assert rows["solo"][6].text == "needs ≥ 3 seeds"
    assert "oracle" in rows  # tested, but never the automatic baseline
    best = significance(load(store, ReportOptions(compare_to="best")))[0]
    assert best.baseline == "rrsitr"


def test_sign_flip_test_exact_and_monte_carlo():
    assert sign_flip_test(np.array([1.0, 2, 3]), np.zeros(3)).p_value == pytest.approx(0.25)  # 2 of 8 patterns
    same = sign_flip_test(np.ones(6), np.ones(6))
    assert same.p_value == 1.0 and not same.significant
    mixed = sign_flip_test(np.array([1.0, -1, 2, -2, 1, -1]), np.zeros(6))
    assert mixed.p_value == 1.0
    big = sign_flip_test(np.arange(1, 21, dtype=float), np.zeros(20))
    assert not big.exact and big.significant and big.p_value < 1e-3
    assert big.p_value == sign_flip_test(np.arange(1, 21, dtype=float), np.zeros(20)).p_value  # fixed seed


def test_filters_metric_and_options(store):
    data = load(store, ReportOptions(methods=("rrsitr", "clip*"), metric="i2t_r1"))
    assert set(data.runs["method"]) == {"rrsitr", "clip-ft"}
    [table] = leaderboard_tables(data)
    assert table.rows[0][1].mean == 36.0 and "i2t R@1" in table.title
    assert ReportOptions(metric="RSUM").metric == "rsum"
    with pytest.raises(ConfigError, match="matches no result"):
        load(store, ReportOptions(methods=("nope",)))
    with pytest.raises(ConfigError, match="unknown metric 'r@1'"):
        ReportOptions(metric="r@1")
    assert not load(store, ReportOptions(use_references=False)).references


def test_tidy_csv(store):
    df = long_table(load(store, ReportOptions()))
    assert list(df.columns[:7]) == ["dataset", "backbone", "noise_protocol", "noise_rate", "method", "metric", "source"]
    measured = df[(df.method == "clip-ft") & (df.noise_rate == 0.0) & (df.metric == "mr") & (df.source == "measured")]
    assert measured["mean"].item() == 42.0 and measured["std"].item() == 2.0 and measured["n"].item() == 3
    reported = df[(df.method == "rrsitr") & (df.noise_rate == 0.4) & (df.source == "reported")]
    assert reported.set_index("metric")["mean"].to_dict() == {"mr": 43.64, "rsum": pytest.approx(261.84)}
    assert df[(df.method == ODD) & (df.noise_rate == 0.4)]["failed"].eq(1).all()
    assert {"auroc", "ap", "flag_precision", "flag_recall"} <= set(df[df.method == "rrsitr"]["metric"])


@pytest.mark.slow
def test_report_files_plots_and_incomplete_cells(store):
    report = write_report(store)
    folder = store / "report"
    assert report.folder == folder and report.html == folder / "report.html"
    for name in ("tables.md", "tables.tex", "results.csv", "runs.csv", "report.html"):
        assert (folder / name).stat().st_size > 200, name
    drawn = {p.name: p for p in report.plots}
    assert set(drawn) == {"metric_vs_noise", "recall_heatmap", "detection_roc", "training_curves"}
    for plot in drawn.values():
        assert not plot.skipped, plot
        assert plot.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.png.stat().st_size > 5000
        assert plot.pdf.read_bytes()[:5] == b"%PDF-" and plot.pdf.stat().st_size > 2000
    assert (report.n_missing, report.n_failed) == (1, 1)
    md = (folder / "tables.md").read_text()
    assert "- clip-ft rsitmd ViT-B-32-quickgelu rrsitr r0.8 n0 s1: missing" in md
    assert f"- {ODD} rsitmd ViT-B-32-quickgelu rrsitr r0.4 n0 s4: failed (CUDA out of memory)" in md
    page = (folder / "report.html").read_text()
    assert "r0.8 n0 s1" in page and "CUDA out of memory" in page and "my_method&amp;co" in page
    assert len(pd.read_csv(folder / "runs.csv")) == len(list(ResultStore(store).iter_results()))
    # without grid.json only the failed cell is listed
    (store / "grid.json").unlink()
    again = write_report(store)
    assert (again.n_missing, again.n_failed) == (0, 1)
    assert "no grid.json" in (folder / "tables.md").read_text()


def test_plots_skipped_with_one_rate_and_no_scores(tmp_path):
    s = ResultStore(tmp_path)
    for seed in (1, 2):
        s.write(result("clip-ft", 0.4, seed, 40.0 + seed))
    report = write_report(tmp_path)
    skipped = {p.name: p.skipped for p in report.plots if p.skipped}
    assert set(skipped) == {"metric_vs_noise", "detection_roc"}
    assert "two noise rates" in skipped["metric_vs_noise"]
    page = report.html.read_text()
    assert "not drawn" in page and "per-row detection scores" in page
    assert not (report.folder / "plots" / "detection_roc.png").exists()


def test_empty_store_still_gives_a_page(tmp_path):
    report = write_report(tmp_path)
    assert "No complete results yet" in report.html.read_text()
    assert all(p.skipped for p in report.plots)


def test_html_is_self_contained(store):
    page = write_report(store).html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 4
    tables = set(re.findall(r'data-table="([^"]+)"', page))
    assert {"leaderboard-rsitmd-ViT-B-32-quickgelu-rrsitr", "detailed-rsitmd-ViT-B-32-quickgelu-rrsitr",
            "detection-rsitmd-ViT-B-32-quickgelu-rrsitr", "significance-rsitmd-ViT-B-32-quickgelu-rrsitr",
            "incomplete-cells", "grid-config", "environment"} <= tables


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def test_html_renders_in_headless_chromium(store, tmp_path):
    browser = _chromium()
    report = write_report(store)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = report.html.resolve().as_uri()
    try:
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium could not start: {exc}")
    if dom.returncode != 0 or "<html" not in dom.stdout:
        pytest.skip(f"chromium could not start (exit {dom.returncode}): {dom.stderr.strip()[-300:]}")
    rendered = set(re.findall(r'data-table="([^"]+)"', dom.stdout))
    expected = {t.id for t in report.tables} | {"incomplete-cells", "grid-config", "environment"}
    assert expected <= rendered
    assert dom.stdout.count("<img") == 4
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", url],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_cli_report_options_and_errors(store, tmp_path):
    out = tmp_path / "elsewhere"
    result = run("report", "--out", store, "--report-dir", out, "--methods", "rrsitr,clip-ft", "--metric", "rsum",
                 "--rate", "0.4", "--compare-to", "best")
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output and f"leaderboard: {out / 'tables.md'}" in result.output
    md = (out / "tables.md").read_text()
    assert "rSum by noise rate" in md and "twin" not in md.split("## Missing")[0]
    assert_user_error(run("report", "--out", store, "--methods", "rrsitrr"), "--methods 'rrsitrr' matches no result",
                      "rrsitr")
    assert_user_error(run("report", "--out", store, "--metric", "map"), "unknown metric 'map'", "rsum")
    assert_user_error(run("report", "--out", store, "--rate", "0.5"), "--rate 0.5: no results", "0, 0.4")
    assert_user_error(run("report", "--out", store, "--compare-to", "clip"), "--compare-to 'clip'", "clip-ft")
    assert_user_error(run("report", "--out", store, "--references", tmp_path / "none.yaml"), "none.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("references:\n  - {method: rrsitr, dataset: rsitmd, noise_rate: 0, metrics: {mr: 'lots'}}\n")
    assert_user_error(run("report", "--out", store, "--references", bad), "bad.yaml, reference 1, mr", "lots")


def test_shipped_references_load_and_are_package_data():
    refs = load_references()
    rrsitr = [r for r in refs if r.method == "rrsitr"]
    assert {(r.dataset, r.noise_rate) for r in rrsitr} == {("rsitmd", 0.0), ("rsicd", 0.0), ("nwpu", 0.0), ("rsitmd", 0.2),
                                                           ("rsitmd", 0.4), ("rsitmd", 0.6), ("rsitmd", 0.8)}
    band = next(r for r in refs if r.method == "clip-ft" and r.metrics["mr"].is_band)
    assert (band.metrics["mr"].low, band.metrics["mr"].high) == (40, 46)
    zeroshot = next(r for r in refs if r.method == "zeroshot" and r.dataset == "rsicd" and r.pretrained is None)
    assert zeroshot.metrics["mr"].mean == 15.74  # protocol.md §8
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"rsnc_bench.report" = ["{DEFAULT_PATH.name}"]' in pyproject  # shipped in the wheel


@pytest.mark.slow
def test_tiny_run_leaves_a_report(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    result = run("run", "--backbone", "tiny-vit", "--methods", "clip-ft,rrsitr-calibrated", "--noise", "0,0.4", "--seeds", "3", "--data-root", synthetic_root,
                 *TINY, "-t", "epochs=2", "-t", "batch_size=16", "--out", out)
    assert result.exit_code == 0, result.output
    folder = out / "report"
    for name in ("report.html", "tables.md", "tables.tex", "results.csv", "runs.csv", "plots/metric_vs_noise.png",
                 "plots/recall_heatmap.pdf", "plots/training_curves.png", "plots/detection_roc.png"):
        assert (folder / name).is_file(), name
    assert (out / "grid.json").is_file() and f"report: {folder / 'report.html'}" in result.output
    scores = sorted(out.rglob("*.scores.npz"))
    assert [p.parent.name for p in scores] == ["rrsitr-calibrated"] * 2
    doc = ResultStore(out).read(next(k for k in _keys(out) if k.method == "rrsitr-calibrated"))
    arrays = ResultStore(out).read_scores(doc["detection_scores"])
    assert set(arrays) == {"clean_score", "clean", "flagged_noisy"} and len(arrays["clean"]) == TINY_ROWS
    assert "| clip-ft" in (folder / "tables.md").read_text()


TINY_ROWS = 48 * 5  # n_train images x 5 captions


def _keys(root: Path):
    from rsnc_bench.store import CellKey

    return [CellKey.from_dict(d["key"]) for d in ResultStore(root).iter_results()]


def test_reference_rows_are_found_by_their_recorded_role_not_their_name(tmp_path):
    """A results folder where "oracle" is an ordinary competitor and other names hold the roles."""
    root = tmp_path / "runs"
    s = ResultStore(root)
    roles = {"plain-ft": "baseline", "label-peek": "upper-bound", "oracle": None, "robust": None}
    values = {"plain-ft": [40, 41, 42], "label-peek": [60, 60, 60], "oracle": [45, 46, 47], "robust": [43, 44, 45]}
    for method, role in roles.items():
        for seed, mr in enumerate(values[method], start=1):
            doc = result(method, 0.4, seed, mr)
            doc["config"] = {"capabilities": {"role": role}}
            s.write(doc)
    data = load(root, ReportOptions(use_references=False))
    assert data.unranked == {"label-peek"} and data.baseline == "plain-ft"
    (table,) = leaderboard_tables(data)
    names = [row[0].text for row in table.rows]
    assert names[-1] == "label-peek†" and "oracle" in names  # oracle is ranked here: its results say it is a competitor
    (comparison,) = significance(data)
    assert {row[1].text for row in comparison.table.rows} == {"plain-ft"}  # every method tested against the recorded baseline
