"""The report's plots (matplotlib Agg, seaborn styles), each saved as PNG and PDF.

- ``metric_vs_noise``: the metric against the noise rate per method, a band of ± one std over the
  runs, one panel per (dataset, backbone, protocol); clip-ft and oracle drawn as dashed references,
  reported numbers as crosses.
- ``recall_heatmap``: the six recalls per method at one noise rate.
- ``detection_roc``: ROC curves of noise detection (noisy rows = positives) per method at one rate,
  from the per-row scores saved beside the results; the native flag as a dot.
- ``training_curves``: the validation metric per epoch, mean over runs, one panel per group and rate.

A plot that cannot be drawn (one noise rate, no per-row scores, ...) is skipped with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure  # figures without pyplot: rendered by Agg (PNG) and the PDF backend, no display

from rsnc_bench.cell_key import format_rate
from rsnc_bench.engine.detection import auroc
from rsnc_bench.report.frame import TABLE_GROUP, ReportData
from rsnc_bench.report.tables import rate_label, reference_for
from rsnc_bench.results import RECALL_HEADERS, RECALLS, aggregate

ROLE_STYLE = {"baseline": dict(color="0.15", linestyle="--"), "upper-bound": dict(color="0.55", linestyle=":")}  # by Method.role
MAX_ROC_POINTS = 400
DPI = 130


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    caption: str
    png: Path | None = None
    pdf: Path | None = None
    skipped: str = ""  # why it was not drawn


def _style() -> dict:
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.9),
            "axes.titlesize": 11, "legend.fontsize": 9, "legend.frameon": False}


def _styles(data: ReportData, methods: list[str]) -> dict[str, dict]:
    """A fixed line style per method across every plot: the baseline and the upper bound (found by
    their recorded role) in black / grey, dashed / dotted; every other method a colour, solid."""
    roles = {m: data.role_of(m) for m in sorted(set(methods))}
    others = [m for m, role in roles.items() if role not in ROLE_STYLE]
    palette = sns.color_palette("colorblind" if len(others) <= 10 else "husl", max(len(others), 1))
    styles = {m: dict(color=palette[i], linestyle="-") for i, m in enumerate(others)}
    styles.update({m: ROLE_STYLE[role] for m, role in roles.items() if role in ROLE_STYLE})
    return styles


def _is_reference(styles: dict[str, dict], method: str) -> bool:
    return styles[method] in ROLE_STYLE.values()


def _grid(n: int, width: float = 5.0, height: float = 3.8, max_cols: int = 3) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + 2.2, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(key: tuple) -> str:
    return f"{key[0]} / {key[1]} / {key[2]}"


def _save(fig: Figure, folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    fig.savefig(png, dpi=DPI)
    fig.savefig(pdf)
    return png, pdf


def _legend(fig: Figure, axes: list) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    labels.sort(key=lambda label: label in ("chance", "reported (×)"))  # markers explained after the methods
    if handles:
        fig.legend([handles[label] for label in labels], labels, loc="outside right upper")


def chosen_rate(data: ReportData, rates: list[float]) -> float | None:
    """The --rate if given (it must be present), else the highest rate present."""
    if not rates:
        return None
    if data.options.rate is None:
        return max(rates)
    return next((r for r in rates if math.isclose(r, data.options.rate, abs_tol=1e-9)), None)


def metric_vs_noise(data: ReportData, folder: Path, styles: dict) -> Plot:
    metric, name = data.options.metric, data.options.metric_name
    title = f"{name} versus noise rate"
    agg = aggregate(data.runs, metrics=[metric])
    agg = agg[agg["n"] > 0]
    groups = [(tuple(k), part) for k, part in agg.groupby(TABLE_GROUP, sort=True)] if not agg.empty else []
    groups = [(k, part) for k, part in groups if part["noise_rate"].nunique() >= 2]
    if not groups:
        return Plot("metric_vs_noise", title, "", skipped="needs at least two noise rates in one dataset; "
                                                          "the results have one or none")
    fig, axes = _grid(len(groups))
    for ax, (key, part) in zip(axes, groups):
        for method, rows in sorted(part.groupby("method"), key=lambda kv: (_is_reference(styles, kv[0]), kv[0])):
            rows = rows.sort_values("noise_rate")
            x, y, sd = rows["noise_rate"] * 100, rows[f"{metric}_mean"], rows[f"{metric}_std"].fillna(0)
            style = styles[method]
            ax.plot(x, y, marker="o", markersize=4, linewidth=1.8, label=method, zorder=3 if _is_reference(styles, method) else 2, **style)
            if (rows["n"] > 1).any():
                ax.fill_between(x, y - sd, y + sd, color=style["color"], alpha=0.15, linewidth=0)
            for rate in rows["noise_rate"]:
                ref = reference_for(data, key, method, rate)
                value = ref.value(metric) if ref else None
                if value is not None:
                    ax.scatter([rate * 100], [value.centre], marker="x", s=45, color=style["color"], zorder=4,
                               label="reported (×)")
        ax.set(title=_title(key), xlabel="noise rate (%)", ylabel=f"test {name} (%)")
        ax.set_xticks(sorted(part["noise_rate"].unique() * 100))
    _legend(fig, axes)
    png, pdf = _save(fig, folder, "metric_vs_noise")
    return Plot("metric_vs_noise", title, "mean over runs per method; band = ± one std over seeds; dashed = clip-ft, "
                                          "dotted = oracle; × = a reported number", png, pdf)


def recall_heatmap(data: ReportData, folder: Path) -> Plot:
    agg = aggregate(data.runs, metrics=RECALLS)
    agg = agg[agg["n"] > 0]
    rate = chosen_rate(data, sorted(agg["noise_rate"].unique()) if not agg.empty else [])
    title = "six recalls per method" + (f" at {rate_label(rate)} noise" if rate is not None else "")
    if rate is None:
        return Plot("recall_heatmap", title, "", skipped=_no_rate(data, "results"))
    at = agg[np.isclose(agg["noise_rate"], rate)]
    groups = [(tuple(k), part) for k, part in at.groupby(TABLE_GROUP, sort=True)]
    height = max(2.6, 0.42 * max(len(p) for _, p in groups) + 1.4)
    fig, axes = _grid(len(groups), width=6.4, height=height, max_cols=2)
    for ax, (key, part) in zip(axes, groups):
        part = part.assign(order=part["method"].isin(data.unranked)).sort_values(["order", "method"])
        grid = part.set_index("method")[[f"{k}_mean" for k in RECALLS]]
        grid.columns = list(RECALL_HEADERS.values())
        sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", cmap="crest", cbar_kws={"label": "recall (%)"},
                    linewidths=0.5, annot_kws={"fontsize": 9})
        ax.set(title=f"{_title(key)} @ {rate_label(rate)}", xlabel="", ylabel="")
        ax.tick_params(axis="x", rotation=30)
        ax.tick_params(axis="y", rotation=0)
    png, pdf = _save(fig, folder, "recall_heatmap")
    return Plot("recall_heatmap", title, "test recalls (%), mean over runs; i2t = image query, t2i = text query", png, pdf)


def _no_rate(data: ReportData, what: str) -> str:
    if data.options.rate is not None:
        return f"no {what} at noise rate {format_rate(data.options.rate)} (--rate)"
    return f"no {what}"


def roc_curve(noisiness: np.ndarray, is_noisy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (noisy = positive), from (0, 0) to (1, 1)."""
    order = np.argsort(-noisiness, kind="stable")
    scores, labels = noisiness[order], is_noisy[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last row of each tied run
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    pos, neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def _thin(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_ROC_POINTS points, the ends kept, so the PDF stays small."""
    if len(fpr) <= MAX_ROC_POINTS:
        return fpr, tpr
    keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, MAX_ROC_POINTS).astype(int), len(fpr) - 1])
    return fpr[keep], tpr[keep]


def detection_roc(data: ReportData, folder: Path, styles: dict) -> Plot:
    done = data.complete
    scored = done[(done["variant"] == "plain") & done["scores"].notna() & (done["noise_rate"] > 0)]
    rate = chosen_rate(data, sorted(scored["noise_rate"].unique()))
    title = "noise-detection ROC" + (f" at {rate_label(rate)} noise" if rate is not None else "")
    if rate is None:
        why = _no_rate(data, "per-row detection scores")
        return Plot("detection_roc", title, "", skipped=f"{why}: only methods with a clean-ness signal save them, "
                                                        "at noise rates above 0, in results written by this version")
    at = scored[np.isclose(scored["noise_rate"], rate)]
    groups = [(tuple(k), part) for k, part in at.groupby(TABLE_GROUP, sort=True)]
    fig, axes = _grid(len(groups), width=4.0, height=4.2)
    drawn = 0
    for ax, (key, part) in zip(axes, groups):
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=1, linestyle="--", label="chance")
        for method, rows in part.groupby("method", sort=True):
            aurocs = []
            for i, relpath in enumerate(rows["scores"]):
                arrays = data.scores(relpath)
                if arrays is None or "clean_score" not in arrays or "clean" not in arrays:
                    continue
                score, noisy = arrays["clean_score"].astype(np.float64), ~arrays["clean"].astype(bool)
                ok = np.isfinite(score)
                if len(score) != len(noisy) or noisy[ok].all() or not noisy[ok].any():
                    continue
                fpr, tpr = roc_curve(-score[ok], noisy[ok])
                aurocs.append(auroc(-score[ok], noisy[ok]))  # the detection table's AUROC, so label and table agree
                style = styles[method]
                ax.plot(*_thin(fpr, tpr), linewidth=1.6, alpha=1.0 if len(rows) == 1 else 0.6, **style,
                        label=None if i else method)
                if "flagged_noisy" in arrays and len(arrays["flagged_noisy"]) == len(noisy):
                    flag = arrays["flagged_noisy"].astype(bool)[ok]
                    ax.scatter([(flag & ~noisy[ok]).sum() / max((~noisy[ok]).sum(), 1)], [(flag & noisy[ok]).sum() / noisy[ok].sum()],
                               color=style["color"], s=28, zorder=4, edgecolor="white", linewidth=0.6)
                drawn += 1
            if aurocs:
                label = f"{method}: AUROC {np.mean(aurocs):.3f}" + (f" ± {np.std(aurocs, ddof=1):.3f}" if len(aurocs) > 1 else "")
                ax.text(0.98, 0.03 + 0.07 * sum(1 for t in ax.texts), label, transform=ax.transAxes, ha="right",
                        fontsize=8, color=styles[method]["color"])
        ax.set(title=f"{_title(key)} @ {rate_label(rate)}", xlabel="false-positive rate (clean rows flagged)",
               ylabel="true-positive rate (noisy rows found)", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    if not drawn:
        return Plot("detection_roc", title, "", skipped=f"the per-row score files at {rate_label(rate)} are missing or unreadable")
    _legend(fig, axes)
    png, pdf = _save(fig, folder, "detection_roc")
    return Plot("detection_roc", title, "noisy train rows are the positives, ranked by the method's clean-ness score "
                                        "(selected epoch); one curve per run; dot = the method's own noisy flag", png, pdf)


def training_curves(data: ReportData, folder: Path, styles: dict) -> Plot:
    metric, name = data.options.metric, data.options.metric_name
    title = f"validation {name} per epoch"
    hist = data.history.dropna(subset=[metric])
    if hist.empty:
        return Plot("training_curves", title, "", skipped="no per-epoch validation metrics in the results")
    panels = [(tuple(k), part) for k, part in hist.groupby([*TABLE_GROUP, "noise_rate"], sort=True)]
    fig, axes = _grid(len(panels), width=4.6, height=3.3, max_cols=2)
    for ax, (key, part) in zip(axes, panels):
        for method, rows in sorted(part.groupby("method"), key=lambda kv: (_is_reference(styles, kv[0]), kv[0])):
            stats = rows.groupby("epoch")[metric].agg(["mean", "std"]).reset_index()
            style = styles[method]
            ax.plot(stats["epoch"], stats["mean"], marker="o" if len(stats) < 12 else None, markersize=3,
                    linewidth=1.5, label=method, **style)
            if stats["std"].notna().any():
                sd = stats["std"].fillna(0)
                ax.fill_between(stats["epoch"], stats["mean"] - sd, stats["mean"] + sd, color=style["color"], alpha=0.12, linewidth=0)
        ax.set(title=f"{_title(key[:3])} @ {rate_label(key[3])}", xlabel="epoch", ylabel=f"val {name} (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(fig, axes)
    png, pdf = _save(fig, folder, "training_curves")
    return Plot("training_curves", title, "clean-validation metric after every epoch, mean over runs (band ± one std); "
                                          "a single point = a method that does not train", png, pdf)


def draw_all(data: ReportData, folder: Path) -> list[Plot]:
    """Every plot into ``folder`` (PNG and PDF)."""
    methods = [*data.runs["method"].dropna(), *data.history["method"].dropna()]
    styles = _styles(data, methods)
    with matplotlib.rc_context(_style()):
        return [metric_vs_noise(data, folder, styles), recall_heatmap(data, folder),
                detection_roc(data, folder, styles), training_curves(data, folder, styles)]
