"""The tables results/README.md reads the RSICD leaderboard from, computed from its per-cell records.

For every noise protocol and rate: each method's test mR (mean ± std over the training seeds), its
paired difference from clip-ft (same noise, same seed), and its noise-detection AUROC; then the
ranking by mean mR. "Beyond the seed spread" means every paired difference has the same sign and
their mean exceeds the larger of the two methods' seed standard deviations. The exact sign-flip
test (rsnc_bench.report.stats) is printed too; with three seeds its smallest p is 0.25, so it can
never reach 0.05 here.

    python benchmarks/leaderboard_reading.py results/rsicd-leaderboard/cells > results/rsicd-leaderboard/reading.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from rsnc_bench.report.stats import sign_flip_test

BASELINE = "clip-ft"


def load(folder: Path) -> dict[tuple, dict[str, dict[int, dict]]]:
    """{(protocol, rate): {method: {seed: record}}} of the complete cells under ``folder``."""
    cells: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(folder.rglob("*.json")):
        record = json.loads(path.read_text())
        if record.get("status") != "complete":
            continue
        key = record["key"]
        method = key["method"] + (f"@{record['score_tag']}" if record.get("score_tag") else "")
        cells[(key["noise_protocol"], key["noise_rate"])][method][key["train_seed"]] = record
    return cells


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def verdict(diffs: np.ndarray, own: list[float], base: list[float]) -> str:
    if len(diffs) < 2:
        return "n/a"
    bar = max(np.std(own, ddof=1), np.std(base, ddof=1))
    if (np.all(diffs > 0) or np.all(diffs < 0)) and abs(diffs.mean()) > bar:
        return "**better**" if diffs.mean() > 0 else "**worse**"
    return "within spread"


def table(protocol: str, rate: float, runs: dict[str, dict[int, dict]]) -> list[str]:
    base = runs.get(BASELINE, {})
    lines = [f"### {protocol}, noise {rate:g}", "",
             "| method | test mR | Δ vs clip-ft (paired) | seeds better | sign-flip p | verdict | AUROC | selected epochs |",
             "|---|---|---|---|---|---|---|---|"]
    ranked = sorted(runs, key=lambda m: -np.mean([r["test"]["mr"] for r in runs[m].values()]))
    for method in ranked:
        seeds = sorted(runs[method])
        mr = [runs[method][s]["test"]["mr"] for s in seeds]
        shared = [s for s in seeds if s in base]
        if method != BASELINE and shared:
            own = np.array([runs[method][s]["test"]["mr"] for s in shared])
            ref = np.array([base[s]["test"]["mr"] for s in shared])
            diffs = own - ref
            test = sign_flip_test(own, ref)
            paired = (f"{diffs.mean():+.2f}" + (f" ± {np.std(diffs, ddof=1):.2f}" if len(diffs) > 1 else ""), f"{int((diffs > 0).sum())}/{len(diffs)}",
                      f"{test.p_value:.2f}", verdict(diffs, list(own), list(ref)))
        else:
            paired = ("—", "—", "—", "—")
        auroc = [r["detection"]["auroc"] for r in runs[method].values() if (r.get("detection") or {}).get("auroc") is not None]
        epochs = ",".join(str(runs[method][s]["selected_epoch"]) for s in seeds)
        lines.append(f"| {method} | {spread(mr)} | {' | '.join(paired)} | {spread(auroc) if auroc else '—'} | {epochs} |")
    return lines + [""]


def matrix(cells: dict, value) -> list[str]:
    """Methods x (protocol, rate): ``value(records)`` of each configuration ("" where none)."""
    columns = sorted(cells, key=lambda k: (k[0] != "rrsitr", k[0], k[1]))
    methods = sorted({m for runs in cells.values() for m in runs}, key=lambda m: (m != BASELINE, m))
    lines = ["| method | " + " | ".join(f"{p} {r:g}" for p, r in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in methods:
        row = [value(list(cells[c].get(method, {}).values())) for c in columns]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]


def test_mr(records: list[dict]) -> str:
    return spread([r["test"]["mr"] for r in records]) if records else ""


def auroc(records: list[dict]) -> str:
    values = [r["detection"]["auroc"] for r in records if (r.get("detection") or {}).get("auroc") is not None]
    return spread(values) if values else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path, help="folder of per-cell JSON records (searched recursively)")
    cells = load(parser.parse_args().cells)
    out = ["# Reading the RSICD leaderboard", "",
           "Test mR mean ± std over the training seeds; Δ: mean ± std of the per-seed differences from clip-ft "
           "(same noise, same seed); verdict: **better** / **worse** when every difference has the same sign and "
           "the mean exceeds the larger seed std of the two methods; AUROC: the method's own clean-ness signal "
           "against the injected noise at the selected epoch; selected epochs by seed.", ""]
    out += ["## Test mR", ""] + matrix(cells, test_mr) + ["## Noise detection: AUROC of each method's clean-ness signal", ""]
    out += matrix(cells, auroc) + ["## Each configuration against clip-ft", ""]
    for (protocol, rate) in sorted(cells, key=lambda k: (k[0] != "rrsitr", k[0], k[1])):
        out += table(protocol, rate, cells[(protocol, rate)])
    print("\n".join(out))


if __name__ == "__main__":
    main()
