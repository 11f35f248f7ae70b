"""``rsnc-bench report``: a result store turned into tables, plots and one HTML page.

``write_report(store_root, options)`` writes into ``<store_root>/report/`` (or ``options.report_dir``):

- ``tables.md``   every table in Markdown (best bold, second underlined), and the missing / failed cells
- ``tables.tex``  the same tables for LaTeX (booktabs)
- ``results.csv`` one tidy long table: configuration, metric, source (measured / reported), mean, std, n
- ``runs.csv``    one row per run (cell), every metric
- ``plots/*.png`` and ``plots/*.pdf``
- ``report.html`` a self-contained page with all of the above, the grid, the environment and the
  missing or failed cells

Modules: ``options`` (what to show), ``frame`` (the store as frames), ``tables``, ``stats``
(the paired test), ``plots``, ``references`` (+ ``references.yaml``), ``html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rsnc_bench.report.options import ReportOptions

__all__ = ["Report", "ReportOptions", "write_report"]


@dataclass
class Report:
    folder: Path
    files: dict[str, Path]  # kind -> path: html, markdown, latex, csv, runs
    plots: list = field(default_factory=list)  # plots.Plot, drawn or skipped
    tables: list = field(default_factory=list)  # tables.Table, in page order
    n_missing: int = 0
    n_failed: int = 0

    @property
    def html(self) -> Path:
        return self.files["html"]


def write_report(store_root: str | Path, options: ReportOptions | None = None,
                 results: Iterable[dict[str, Any]] | None = None, problems: list[str] | None = None) -> Report:
    """Build the report of a result store (``results``: its documents, if already read)."""
    from rsnc_bench.paths import atomic_write_text
    from rsnc_bench.report import frame, html, plots, tables

    options = options or ReportOptions()
    root = Path(store_root)
    data = frame.load(root, options, results, problems)
    folder = Path(options.report_dir) if options.report_dir is not None else root / "report"
    folder.mkdir(parents=True, exist_ok=True)

    leaderboards, detailed = tables.leaderboard_tables(data), tables.detailed_tables(data)
    detection, comparisons = tables.detection_tables(data), tables.significance(data)
    every = [*leaderboards, *detailed, *detection, *(c.table for c in comparisons if c.table)]
    files = {"markdown": folder / "tables.md", "latex": folder / "tables.tex", "csv": folder / "results.csv",
             "runs": folder / "runs.csv", "html": folder / "report.html"}
    atomic_write_text(files["markdown"], _markdown(data, every, comparisons))
    atomic_write_text(files["latex"], _latex(every))
    atomic_write_text(files["csv"], tables.to_csv(tables.long_table(data)))
    atomic_write_text(files["runs"], tables.to_csv(data.runs))

    plot_dir = folder / "plots"
    drawn = plots.draw_all(data, plot_dir)
    for plot in drawn:  # a plot not drawn this time must not leave last time's file behind
        if plot.png is None:
            for suffix in (".png", ".pdf"):
                (plot_dir / f"{plot.name}{suffix}").unlink(missing_ok=True)
    page = html.render(data, leaderboards, detailed, detection, comparisons, drawn,
                       {k: v for k, v in files.items() if k != "html"})
    atomic_write_text(files["html"], page)
    n_missing = int((data.incomplete["status"] == "missing").sum())
    return Report(folder, files, drawn, every, n_missing, len(data.incomplete) - n_missing)


def _markdown(data, every: list, comparisons: list) -> str:
    from rsnc_bench.report.tables import to_markdown

    o = data.options
    out = [f"# rsnc-bench report ({o.split} split, {o.metric_name})", "", f"Results: `{data.root}`", ""]
    if not every:
        out += ["No complete results yet.", ""]
    sections = {"leaderboard": f"Leaderboard: {o.metric_name} by noise rate", "detailed": "All metrics",
                "detection": "Noise detection", "significance": "Significance"}
    seen = set()
    for table in every:
        if table.section not in seen:
            seen.add(table.section)
            out += [f"## {sections[table.section]}", ""]
        out.append(to_markdown(table))
    notes = [c.note for c in comparisons if c.note]
    if notes:
        out += ["## Significance" if "significance" not in seen else "", "", *[f"- {n}" for n in notes], ""]
    out += ["## Missing and failed cells", ""]
    if data.grid_note:
        out += [data.grid_note + ".", ""]
    if data.incomplete.empty:
        out += ["None.", ""]
    for cell in data.incomplete.itertuples(index=False):
        out.append(f"- {cell.label}: {cell.status}" + (f" ({cell.error})" if cell.error else ""))
    return "\n".join(out).rstrip() + "\n"


def _latex(every: list) -> str:
    from rsnc_bench.report.tables import to_latex

    head = ["% rsnc-bench report tables: \\usepackage{booktabs} in the preamble; paste a table environment as is.", ""]
    return "\n".join(head + [to_latex(t) for t in every])
