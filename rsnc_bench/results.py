"""The results model: result documents as one tidy frame of runs, and its aggregation over seeds.

A configuration is (dataset, backbone, noise_protocol, noise_rate, method); its runs are the
complete cells with distinct (noise_seed, train_seed). Cells that failed or diverged are
counted in ``failed`` so a table shows what is missing.

A method's further test scorers (``test_variants``: a re-ranker such as "sar") get a row of
their own, method ``<method>+<tag>``, next to the plain one. Documents are read through
``ResultRecord.load``, the one loader (older schemas upgraded there).

``runs`` is the tidy per-run frame and ``aggregate`` its mean / std per configuration; the
report (``rsnc_bench.report``), the one place tables are rendered, builds its tables and plots on
both (``pipe_table`` is its Markdown renderer).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from rsnc_bench.cell_key import CellKey
from rsnc_bench.record import ResultFormatError, ResultRecord

GROUP = ["dataset", "backbone", "noise_protocol", "noise_rate", "method"]
SEEDS = ["noise_seed", "train_seed"]
RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
METRICS = ["mr", *RECALLS, "rsum"]  # rSum = sum of the six recalls = 6 * mR (protocol.md 5.1)
DETECTION = ["auroc", "ap", "flag_precision", "flag_recall", "flag_f1"]
RECALL_HEADERS = {k: f"{k[:3]} R@{k[5:]}" for k in RECALLS}
RUN_COLUMNS = [*GROUP, *SEEDS, "base_method", "variant", "role", "status", "error", *METRICS, *DETECTION,
               "realized_rate", "selected_epoch", "pretrained", "scores", "finished_at"]


def latest(docs: Iterable[dict[str, Any] | ResultRecord]) -> dict[CellKey, ResultRecord]:
    """One record per cell (documents through ``ResultRecord.load``; those it cannot load are left
    out): complete beats not complete, then the later ``finished_at``."""
    best: dict[CellKey, ResultRecord] = {}
    for doc in docs:
        try:
            record = doc if isinstance(doc, ResultRecord) else ResultRecord.load(doc)
        except ResultFormatError:
            continue
        old = best.get(record.key)
        if old is None or (record.complete, record.finished_at or "") >= (old.complete, old.finished_at or ""):
            best[record.key] = record
    return best


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _rows(record: ResultRecord, split: str) -> list[tuple[str, str, Any]]:
    """(method name, variant, metrics) per row a complete record contributes: the plain one
    (named ``<method>@<score_tag>`` when its scorer was tagged), plus ``<method>+<tag>`` (variant
    "rerank") per further scorer on the test split."""
    method = f"{record.key.method}@{record.score_tag}" if record.score_tag else record.key.method
    rows = [(method, "plain", record.metrics(split))]
    if split == "test":
        rows += [(f"{method}+{tag}", "rerank", metrics) for tag, metrics in record.test_variants.items()]
    return rows


def _role(record: ResultRecord) -> str | None:
    """The role the record declares; for records written before roles were, the registered method's."""
    if "role" in (record.config.get("capabilities") or {}):
        return record.role
    from rsnc_bench.methods import METHODS  # only for older results: the registry imports torch

    return METHODS.entry(record.key.method).role if record.key.method in METHODS else None


def _metrics(metrics: dict[str, Any]) -> dict[str, float]:
    values = {m: _number(metrics.get(m)) for m in METRICS}
    if math.isnan(values["rsum"]) and not any(math.isnan(values[k]) for k in RECALLS):
        values["rsum"] = sum(values[k] for k in RECALLS)
    return values


def runs(results: Iterable[dict[str, Any] | ResultRecord], split: str = "test") -> pd.DataFrame:
    """One row per run (columns ``RUN_COLUMNS``): every complete cell's metrics of ``split``, a
    ``<method>+<tag>`` row per further test scorer, and one metric-less row per failed or diverged
    cell (its ``status`` and ``error``). A complete cell without metrics for ``split`` is left out;
    a cell found twice (same key) counts once (see ``latest``). Detection columns are the selected
    epoch's (NaN without a clean-ness signal); ``scores`` is the relative path of the per-row
    detection scores, if saved."""
    rows = []
    for key, record in latest(results).items():
        base = {**{name: getattr(key, name) for name in GROUP}, "noise_seed": key.noise_seed, "train_seed": key.train_seed,
                "base_method": key.method, "finished_at": record.finished_at,
                "pretrained": (record.config.get("backbone") or {}).get("pretrained")}
        if not record.complete:
            rows.append({**base, "variant": "plain", "status": record.status, "error": record.error})
            continue
        detection = record.detection or {}
        extra = {**{m: _number(detection.get(m)) for m in DETECTION}, "status": "complete", "error": None,
                 "realized_rate": _number(record.noise.get("realized_rate")), "selected_epoch": record.selected_epoch,
                 "scores": record.detection_scores}
        role = _role(record)
        for method, variant, metrics in _rows(record, split):
            if metrics is not None:
                rows.append({**base, **extra, "method": method, "variant": variant, "role": role if variant == "plain" else None,
                             **_metrics(metrics)})
    df = pd.DataFrame(rows).reindex(columns=RUN_COLUMNS)
    if not df.empty:
        df[SEEDS] = df[SEEDS].astype(int)
    df.attrs["split"] = split
    return df


def aggregate(table: pd.DataFrame, by: list[str] | None = None, metrics: Iterable[str] = METRICS) -> pd.DataFrame:
    """Mean and std (ddof=1; NaN for one run) of ``metrics`` over the complete runs of each ``by``
    group (default ``GROUP``), ``n`` runs, ``failed`` cells, and ``auroc_mean`` when the runs have
    an ``auroc`` column. Groups with only failed cells are kept (n = 0)."""
    by = list(by or GROUP)
    metrics = list(metrics)
    done = table[table["status"] == "complete"]
    frames = []
    if not done.empty:
        stats = done.groupby(by, sort=False)
        agg = stats[metrics].agg(["mean", "std"])
        agg.columns = [f"{m}_{s}" for m, s in agg.columns]
        agg["n"] = stats.size()
        if "auroc" in done:
            agg["auroc_mean"] = stats["auroc"].mean()
        frames.append(agg)
    bad = table[table["status"] != "complete"]
    if not bad.empty:
        frames.append(bad.groupby(by, sort=False).size().rename("failed").to_frame())
    columns = [*by, "n", "failed", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "auroc_mean"]
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, axis=1).reset_index().reindex(columns=columns)
    df[["n", "failed"]] = df[["n", "failed"]].fillna(0).astype(int)
    return df


def pipe_table(cells: list[list[str]], right: set[int]) -> list[str]:
    """The lines of a Markdown pipe table (``cells[0]`` the header, ``|`` already escaped), columns
    padded to one width; those in ``right`` right-aligned."""
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(cells[0]))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), rule, *(line(r) for r in cells[1:])]


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def summary_line(doc: dict[str, Any]) -> str:
    """One line for a finished cell: test mR, the selected val mR and epoch, train seconds; or the error."""
    record = ResultRecord.load(doc)
    if not record.complete:
        return f"{record.key.label()}: {record.status}: {record.error or 'no error message'}"
    parts = [f"test mR {_fmt(_number((record.test or {}).get('mr')))}"]
    if record.val:
        at = f" @ epoch {record.selected_epoch}" if record.selected_epoch is not None else ""
        parts[-1] += f" (val {_fmt(_number(record.val.get('mr')))}{at})"
    seconds = _number(record.timings.get("train_seconds"))
    if not math.isnan(seconds):
        parts.append(f"{seconds:.1f} s")
    return f"{record.key.label()}: " + ", ".join(parts)
