"""The report's tables, built once as ``Table``s of ``Cell``s and rendered as Markdown, LaTeX and HTML.

- leaderboard: per (dataset, backbone, protocol), rows = methods, columns = noise rates, cells =
  the chosen metric's mean ± std over runs (n); best per column bold, second underlined; a
  "reported" column beside a rate where the references have a number.
- detailed: the six recalls, mR and rSum per method and rate, with the reported rows.
- detection: AUROC, AP and the native flag's precision / recall per method and rate.
- significance: each method against one other (default clip-ft), paired over seeds and rates.

Every metric here is higher-is-better. Best / second compare the values as displayed (two
decimals), so equal-looking numbers share a mark. ``oracle`` trains on the clean labels and is
shown but never ranked.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from rsnc_bench.cell_key import slug
from rsnc_bench.report.frame import TABLE_GROUP, ReportData
from rsnc_bench.report.references import Reference, find
from rsnc_bench.report.stats import ALPHA, sign_flip_test
from rsnc_bench.results import DETECTION, GROUP, METRICS, RECALL_HEADERS, SEEDS, aggregate, pipe_table

DETAIL_METRICS = [*RECALL_HEADERS, "mr", "rsum"]
DETECTION_NAMES = {"auroc": "AUROC", "ap": "AP", "flag_precision": "flag precision", "flag_recall": "flag recall",
                   "flag_f1": "flag F1"}
MIN_SEEDS = 3


# --- model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """A table cell: text, or a mean (± std) over ``n`` runs; rank 1 = best (bold), 2 = second (underlined)."""

    text: str = ""
    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    digits: int = 2
    rank: int = 0
    reported: bool = False  # a reported (paper) number
    mark: str = ""  # a short note after the value, e.g. "n.s."

    @property
    def numeric(self) -> bool:
        return not math.isnan(self.mean)

    def core(self, pm: str = " ± ") -> str:
        if not self.numeric:
            return self.text
        text = f"{self.mean:.{self.digits}f}"
        return text if math.isnan(self.std) else f"{text}{pm}{self.std:.{self.digits}f}"


@dataclass
class Table:
    id: str  # unique, also the HTML anchor and the LaTeX label
    section: str  # leaderboard, detailed, detection, significance
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    n_per_cell: bool = True  # else every value has the same n, said in the notes
    rules_before: set[int] = field(default_factory=set)  # row indexes preceded by a horizontal rule

    def numeric_columns(self) -> list[bool]:
        """Right-aligned columns: those with a number, measured or reported."""
        return [any(row[i].numeric or (row[i].reported and row[i].text[:1].isdigit()) for row in self.rows)
                for i in range(len(self.header))]


def rate_label(rate: float) -> str:
    """0.4 -> "40%"."""
    return f"{rate * 100:.10g}%"


def _ranks(values: list[float], eligible: list[bool], digits: int = 2) -> list[int]:
    """1 for the best displayed value(s), 2 for the second, 0 otherwise; needs two eligible values."""
    shown = [round(v, digits) if ok and not math.isnan(v) else math.nan for v, ok in zip(values, eligible)]
    distinct = sorted({v for v in shown if not math.isnan(v)}, reverse=True)
    if sum(not math.isnan(v) for v in shown) < 2:
        return [0] * len(values)
    top = distinct[:2]
    return [top.index(v) + 1 if not math.isnan(v) and v in top else 0 for v in shown]


def _same_n(cells: Iterable[Cell]) -> int | None:
    counts = {c.n for c in cells if c.numeric}
    return counts.pop() if len(counts) == 1 else None


def _n_note(table: Table, what: str = "runs (noise seed × train seed)") -> None:
    """Drop the per-cell n when it is the same everywhere and say it once instead."""
    n = _same_n(c for row in table.rows for c in row if not c.reported)
    if n is not None:
        table.n_per_cell = False
        table.notes.insert(0, f"mean ± std over n = {n} {what} per value" if n > 1 else
                           "one run per value (n = 1, no std)")
    else:
        table.notes.insert(0, f"mean ± std over the n {what} shown in brackets")


def _table_id(section: str, key: tuple) -> str:
    return "-".join([section, *(slug(str(k)) for k in key)])


def _title(key: tuple) -> str:
    dataset, backbone, protocol = key
    return f"{dataset} / {backbone} / {protocol} noise"


def _method_order(part: pd.DataFrame, column: str, unranked: frozenset[str]) -> list[str]:
    """Methods by their mean of ``column`` over the rates (best first, no value last), oracle last."""
    score = part.groupby("method", sort=False)[column].mean()
    order = sorted(score.index, key=lambda m: (m in unranked, -score[m] if not math.isnan(score[m]) else math.inf, m))
    return list(order)


def _pretrained(data: ReportData, key: tuple, method: str, rate: float) -> list[str | None]:
    done = data.complete
    mask = (done["method"] == method) & (done["noise_rate"] == rate)
    for column, value in zip(TABLE_GROUP, key):
        mask &= done[column] == value
    return list(done.loc[mask, "pretrained"].dropna().unique())


def reference_for(data: ReportData, key: tuple, method: str, rate: float) -> Reference | None:
    if not data.references:
        return None
    return find(data.references, *key, rate, method, _pretrained(data, key, method, rate))


def _failed_mark(failed: int) -> str:
    return f"+{failed} failed" if failed else ""


def _groups(frame: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    if frame.empty:
        return []
    return [(tuple(k), part) for k, part in frame.groupby(TABLE_GROUP, sort=True)]


# --- builders -------------------------------------------------------------------------------------
def leaderboard_tables(data: ReportData) -> list[Table]:
    """Rows = methods, columns = noise rates (+ "reported" columns), the chosen metric."""
    metric, name = data.options.metric, data.options.metric_name
    agg = aggregate(data.runs, metrics=[metric])
    tables = []
    for key, part in _groups(agg):
        rates = sorted(part["noise_rate"].unique())
        methods = _method_order(part, f"{metric}_mean", data.unranked)
        cells = {(r.method, r.noise_rate): r for r in part.itertuples(index=False)}
        refs = {(m, r): reference_for(data, key, m, r) for m in methods for r in rates}
        reported_rates = [r for r in rates if any(ref and ref.value(metric) for (m, rr), ref in refs.items() if rr == r)]
        header = ["method"]
        for rate in rates:
            header += [rate_label(rate)] + ([f"{rate_label(rate)} reported"] if rate in reported_rates else [])
        columns: list[list[Cell]] = []
        for rate in rates:
            values = []
            for m in methods:
                r = cells.get((m, rate))
                if r is None:
                    values.append(Cell("–"))
                elif r.n == 0:
                    values.append(Cell("failed", mark=f"({r.failed})" if r.failed > 1 else ""))
                else:
                    values.append(Cell(mean=getattr(r, f"{metric}_mean"), std=getattr(r, f"{metric}_std"), n=r.n,
                                       mark=_failed_mark(r.failed)))
            ranks = _ranks([c.mean for c in values], [m not in data.unranked for m in methods])
            columns.append([dataclasses.replace(c, rank=k) for c, k in zip(values, ranks)])
            if rate in reported_rates:
                reported = []
                for m in methods:
                    value = refs[(m, rate)].value(metric) if refs[(m, rate)] else None
                    reported.append(Cell(value.text() if value else "", reported=bool(value)))
                columns.append(reported)
        rows = [[Cell(m + ("†" if m in data.unranked else ""))] + [col[i] for col in columns] for i, m in enumerate(methods)]
        table = Table(_table_id("leaderboard", key), "leaderboard", f"{_title(key)}: {name} ({data.options.split} split)",
                      header, rows)
        _n_note(table)
        table.notes.append("best per noise rate in bold, second underlined")
        if any(m in data.unranked for m in methods):
            table.notes.append("† trains on the clean labels (an upper reference); not ranked")
        used = {refs[(m, r)] for m in methods for r in reported_rates if refs[(m, r)] and refs[(m, r)].value(metric)}
        table.notes += [_reference_note(ref) for ref in sorted(used, key=lambda ref: (ref.method, ref.noise_rate))]
        tables.append(table)
    return tables


def _reference_note(ref: Reference) -> str:
    note = f"; {ref.note}" if ref.note else ""
    return f"reported: {ref.method} at {rate_label(ref.noise_rate)} = {ref.label} ({ref.source}{note})"


def detailed_tables(data: ReportData) -> list[Table]:
    """Per method and rate: the six recalls, mR and rSum; the reported rows beneath the measured ones."""
    agg = aggregate(data.runs, by=GROUP, metrics=DETAIL_METRICS)
    tables = []
    for key, part in _groups(agg):
        rows, rules, used = [], set(), []
        ranked = part[part["n"] > 0]
        for rate, block in ranked.groupby("noise_rate", sort=True):
            if rows:
                rules.add(len(rows))
            methods = _method_order(block, f"{data.options.metric}_mean", data.unranked)
            block = block.set_index("method").loc[methods]
            eligible = [m not in data.unranked for m in methods]
            ranks = {k: _ranks(list(block[f"{k}_mean"]), eligible) for k in DETAIL_METRICS}
            for i, m in enumerate(methods):
                r = block.loc[m]
                rows.append([Cell(m + ("†" if m in data.unranked else "")), Cell(rate_label(rate)),
                             *[Cell(mean=r[f"{k}_mean"], std=r[f"{k}_std"], n=int(r["n"]), rank=ranks[k][i])
                               for k in DETAIL_METRICS], Cell(str(int(r["n"])) + (f" (+{int(r['failed'])} failed)" if r["failed"] else ""))])
            for m in methods:
                ref = reference_for(data, key, m, rate)
                if ref is not None:
                    used.append(ref)
                    values = [ref.value(k) for k in DETAIL_METRICS]
                    rows.append([Cell(f"{ref.label} (reported)", reported=True), Cell(rate_label(rate)),
                                 *[Cell(v.text() if v else "–", reported=bool(v)) for v in values], Cell("")])
        if not rows:
            continue
        header = ["method", "noise", *RECALL_HEADERS.values(), "mR", "rSum", "n"]
        table = Table(_table_id("detailed", key), "detailed", f"{_title(key)}: all metrics ({data.options.split} split)",
                      header, rows, n_per_cell=False, rules_before=rules)
        table.notes = ["mean ± std over the n runs (noise seed × train seed) of each row; best per noise rate "
                       "and column in bold, second underlined; i2t = image query → text gallery, t2i = text query "
                       "→ image gallery; rSum = 6 · mR"]
        if (part["method"].isin(data.unranked)).any():
            table.notes.append("† trains on the clean labels (an upper reference); not ranked")
        table.notes += [_reference_note(ref) for ref in dict.fromkeys(used)]
        tables.append(table)
    return tables


def detection_tables(data: ReportData) -> list[Table]:
    """AUROC and AP of each method's clean-ness score, its native flag's precision / recall (noisy = positive)."""
    done = data.complete
    plain = done[(done["variant"] == "plain") & (done["noise_rate"] > 0) & done[DETECTION].notna().any(axis=1)]
    if plain.empty:
        return []
    columns = ["auroc", "ap", "flag_precision", "flag_recall"]
    tables = []
    for key, part in _groups(plain):
        rows, rules = [], set()
        for rate, block in part.groupby("noise_rate", sort=True):
            stats = block.groupby("method", sort=True)[columns].agg(["mean", "std", "count"])
            methods = sorted(stats.index, key=lambda m: (-np.nan_to_num(stats.loc[m, ("auroc", "mean")], nan=-1), m))
            if rows:
                rules.add(len(rows))
            ranks = {c: _ranks([stats.loc[m, (c, "mean")] for m in methods], [m not in data.unranked for m in methods], 3)
                     for c in columns}
            for i, m in enumerate(methods):
                cells = []
                for c in columns:
                    s = stats.loc[m, c]
                    cells.append(Cell("–") if s["count"] == 0 else
                                 Cell(mean=s["mean"], std=s["std"], n=int(s["count"]), digits=3, rank=ranks[c][i]))
                n = int(len(block[block["method"] == m]))
                realized = block.loc[block["method"] == m, "realized_rate"].mean()
                rows.append([Cell(m), Cell(rate_label(rate)), Cell("–", mean=realized * 100, digits=1), *cells, Cell(str(n))])
        table = Table(_table_id("detection", key), "detection", f"{_title(key)}: noise detection (selected epoch)",
                      ["method", "noise", "realised %", *[DETECTION_NAMES[c] for c in columns], "n"], rows,
                      n_per_cell=False, rules_before=rules)
        table.notes = ["noisy train rows are the positives; AUROC and AP rank the method's clean-ness score, "
                       "the flag is its own noisy / clean decision (– where it has none); AUROC 0.5 = chance; "
                       "mean ± std over the n runs of each row; best per noise rate in bold, second underlined"]
        tables.append(table)
    return tables


@dataclass(frozen=True)
class Comparison:
    """What the significance section says for one (dataset, backbone, protocol)."""

    key: tuple
    baseline: str
    table: Table | None
    note: str


def significance(data: ReportData) -> list[Comparison]:
    """Each method against ``compare_to`` (or the best method), paired over seeds and noise rates.

    Pairs share dataset, backbone, protocol, noise rate, noise seed and train seed. A method is
    tested when its pairs cover at least 3 seeds (distinct noise seed × train seed); the two-sided
    sign-flip test of ``stats`` at alpha 0.05 marks a difference that is not significant "n.s.".
    """
    metric, name = data.options.metric, data.options.metric_name
    out = []
    for key, part in _groups(data.complete):
        wide = part.pivot_table(index=["noise_rate", *SEEDS], columns="method", values=metric, aggfunc="mean")
        means = part.groupby("method")[metric].mean().drop(list(data.unranked), errors="ignore").dropna()
        baseline = data.baseline if data.options.compare_to == "baseline" else data.options.compare_to
        if baseline == "best" or baseline not in wide.columns:
            if means.empty:
                continue
            baseline = str(means.idxmax())
        rows, tested = [], 0
        for m in _method_order(part, metric, data.unranked):
            if m == baseline:
                continue
            both = wide[[m, baseline]].dropna()
            seeds = len(set(zip(both.index.get_level_values("noise_seed"), both.index.get_level_values("train_seed"))))
            if seeds < MIN_SEEDS:
                diff = Cell(mean=float((both[m] - both[baseline]).mean())) if len(both) else Cell("–")
                rows.append([Cell(m), Cell(baseline), diff, Cell(str(len(both))), Cell(str(seeds)), Cell("–"), Cell(f"needs ≥ {MIN_SEEDS} seeds")])
                continue
            tested += 1
            test = sign_flip_test(both[m].to_numpy(), both[baseline].to_numpy())
            verdict = "significant" if test.significant else "n.s."
            rows.append([Cell(m), Cell(baseline), Cell(mean=test.mean_diff, mark="" if test.significant else "n.s."),
                         Cell(str(test.n)), Cell(str(seeds)), Cell(mean=test.p_value, digits=4 if test.p_value < 0.01 else 3),
                         Cell(verdict + ("" if test.exact else " (Monte Carlo)"))])
        if not tested:
            most = int(part.drop_duplicates(["method", *SEEDS]).groupby("method").size().max())
            out.append(Comparison(key, baseline, None, f"{_title(key)}: no paired test (needs ≥ {MIN_SEEDS} seeds per "
                                                       f"method; at most {most} here)"))
            continue
        table = Table(_table_id("significance", key), "significance", f"{_title(key)}: {name} against {baseline}",
                      ["method", "against", f"Δ {name}", "pairs", "seeds", "p", "result"], rows, n_per_cell=False)
        table.notes = [f"paired over noise rates and seeds (same noise seed and train seed); Δ = mean of the paired "
                       f"differences (method − {baseline}); two-sided exact sign-flip permutation test (Fisher's "
                       f"randomisation test), alpha = {ALPHA}; n.s. = not significant; with n pairs the smallest "
                       f"possible p is 2/2^n, so fewer than 6 pairs can never be significant"]
        out.append(Comparison(key, baseline, table, ""))
    return out


# --- tidy CSV -------------------------------------------------------------------------------------
LONG_COLUMNS = [*GROUP, "metric", "source", "mean", "std", "n", "failed", "low", "high", "reference"]


def long_table(data: ReportData) -> pd.DataFrame:
    """One row per (configuration, metric, source): measured mean / std / n of every metric and
    detection score, and the matching reported numbers (source "reported")."""
    rows = []
    bad = data.runs[data.runs["status"] != "complete"]
    failed = bad.groupby(GROUP).size().to_dict() if not bad.empty else {}
    done = data.complete
    for key, part in (done.groupby(GROUP, sort=True) if not done.empty else []):
        for metric in [*METRICS, *DETECTION]:
            values = part[metric].dropna()
            if len(values):
                rows.append({**dict(zip(GROUP, key)), "metric": metric, "source": "measured", "mean": values.mean(),
                             "std": values.std(ddof=1) if len(values) > 1 else math.nan, "n": len(values),
                             "failed": failed.get(tuple(key), 0)})
        ref = reference_for(data, tuple(key[:3]), key[4], key[3])
        for metric in METRICS if ref else []:
            value = ref.value(metric)
            if value is not None:
                rows.append({**dict(zip(GROUP, key)), "metric": metric, "source": "reported", "mean": value.mean,
                             "std": value.std, "low": value.low, "high": value.high,
                             "reference": f"{ref.label} ({ref.source})"})
    df = pd.DataFrame(rows, columns=LONG_COLUMNS)
    df["n"] = df["n"].astype("Int64")
    df["failed"] = df["failed"].astype("Int64")
    return df


def to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


# --- renderers ------------------------------------------------------------------------------------
def _md_cell(cell: Cell, n_per_cell: bool) -> str:
    text = cell.core()
    if cell.rank == 1:
        text = f"**{text}**"
    elif cell.rank == 2:
        text = f"<u>{text}</u>"
    if cell.reported and text:
        text = f"*{text}*"
    if n_per_cell and cell.numeric and cell.n:
        text += f" ({cell.n})"
    if cell.mark:
        text += f" {cell.mark}"
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """A pipe table under a ``###`` heading, notes as a list beneath."""
    numeric = table.numeric_columns()
    cells = [[h.replace("|", "\\|") for h in table.header],
             *[[_md_cell(c, table.n_per_cell) for c in row] for row in table.rows]]
    out = [f"### {table.title}", "", *pipe_table(cells, right={i for i, n in enumerate(numeric) if n}), ""]
    out += [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
    return "\n".join(out)


_LATEX_SPECIAL = re.compile(r"[\\&%$#_{}~^]")
_LATEX_MAP = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
              "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "–": "--", "−": "$-$", "≥": r"$\geq$", "Δ": r"$\Delta$", "†": r"\dag{}",
                  "·": r"$\cdot$", "→": r"$\rightarrow$", "×": r"$\times$", "§": r"\S{}"}


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table: the ten special characters, and a few symbols as macros."""
    text = _LATEX_SPECIAL.sub(lambda m: _LATEX_MAP[m.group()], text)
    for char, macro in _LATEX_UNICODE.items():
        text = text.replace(char, macro)
    return text


def _tex_cell(cell: Cell, n_per_cell: bool) -> str:
    if not cell.numeric:
        text = latex_escape(cell.text)
        return rf"\textit{{{text}}}" if cell.reported and text else text
    number = f"{cell.mean:.{cell.digits}f}"
    if cell.rank == 1:
        number = rf"\textbf{{{number}}}"
    elif cell.rank == 2:
        number = rf"\underline{{{number}}}"
    if not math.isnan(cell.std):
        number += rf"\,{{\scriptsize$\pm${cell.std:.{cell.digits}f}}}"
    if n_per_cell and cell.n:
        number += rf"\,{{\scriptsize({cell.n})}}"
    if cell.mark:
        number += rf"\textsuperscript{{{latex_escape(cell.mark)}}}"
    return number


def to_latex(table: Table) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``), notes in the caption, ready to paste."""
    numeric = table.numeric_columns()
    spec = "".join("r" if n else "l" for n in numeric)
    caption = latex_escape(table.title + ". " + "; ".join(table.notes) + ("." if table.notes else ""))
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{tab:{table.id}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    for i, row in enumerate(table.rows):
        if i in table.rules_before:
            lines.append(r"\midrule")
        lines.append(" & ".join(_tex_cell(c, table.n_per_cell) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _html_cell(cell: Cell, n_per_cell: bool, numeric: bool) -> str:
    text = html.escape(cell.core())
    if cell.rank == 1:
        text = f"<strong>{text}</strong>"
    elif cell.rank == 2:
        text = f"<u>{text}</u>"
    if n_per_cell and cell.numeric and cell.n:
        text += f' <span class="n">({cell.n})</span>'
    if cell.mark:
        text += f' <span class="mark">{html.escape(cell.mark)}</span>'
    classes = [c for c, on in (("num", numeric), ("best", cell.rank == 1), ("second", cell.rank == 2),
                               ("reported", cell.reported)) if on]
    return f'<td class="{" ".join(classes)}">{text}</td>' if classes else f"<td>{text}</td>"


def to_html(table: Table) -> str:
    """A ``<table>`` with its caption and notes (styles come from the page)."""
    numeric = table.numeric_columns()
    head = "".join(f'<th class="{"num" if n else ""}">{html.escape(h)}</th>' for h, n in zip(table.header, numeric))
    body = []
    for i, row in enumerate(table.rows):
        rule = ' class="rule"' if i in table.rules_before else ""
        body.append(f"<tr{rule}>" + "".join(_html_cell(c, table.n_per_cell, n) for c, n in zip(row, numeric)) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (f'<figure class="table" id="{html.escape(table.id)}"><h3>{html.escape(table.title)}</h3>'
            f'<table data-table="{html.escape(table.id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>" + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</figure>")
