"""One self-contained HTML page: inline CSS, images as base64 data URIs, no scripts, nothing fetched."""

from __future__ import annotations

import base64
import datetime
import html
import json
from importlib import metadata
from pathlib import Path

import pandas as pd

from rsnc_bench.report.frame import ReportData
from rsnc_bench.report.plots import Plot
from rsnc_bench.report.tables import Comparison, Table, rate_label, to_html

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; margin: 0; background: #fafbfc; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px; border-bottom: 1px solid #d8dee4; padding-bottom: 4px; }
.meta { color: #57606a; margin: 0 0 12px; } .meta code { font-size: 12px; }
nav { position: sticky; top: 0; background: #fafbfc; padding: 6px 0; border-bottom: 1px solid #d8dee4; z-index: 1; }
nav a { margin-right: 14px; color: #0b57d0; text-decoration: none; } nav a:hover { text-decoration: underline; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 20px; } .card.warn { border-color: #d1242f; } .card.warn b { color: #d1242f; }
figure.table { margin: 14px 0 22px; overflow-x: auto; }
table { border-collapse: collapse; background: #fff; font-size: 13px; font-variant-numeric: tabular-nums; }
figure.table h3 { font-size: 14px; margin: 0 0 6px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
thead th { border-top: 2px solid #1d232a; border-bottom: 1px solid #1d232a; text-align: left; }
tbody tr:last-child td { border-bottom: 2px solid #1d232a; } tr.rule td { border-top: 1px solid #8c959f; }
.num { text-align: right; } td.reported { color: #57606a; font-style: italic; background: #f6f8fa; }
.n { color: #8c959f; font-size: 12px; } .mark { color: #bc4c00; font-size: 12px; margin-left: 2px; }
td.best strong { font-weight: 700; } td.second u { text-decoration-thickness: 1.5px; }
ul.notes { margin: 4px 0 0; padding-left: 18px; color: #57606a; font-size: 12.5px; }
figure.plot { margin: 18px 0 28px; } figure.plot img { max-width: 100%; border: 1px solid #d8dee4; background: #fff; }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; }
.skipped { color: #8c959f; } .empty { color: #57606a; font-style: italic; }
pre { background: #fff; border: 1px solid #d8dee4; padding: 10px; overflow-x: auto; font-size: 12px; }
td.status-missing { color: #9a6700; } td.status-failed, td.status-diverged { color: #d1242f; }
"""

SECTIONS = [("summary", "Summary"), ("leaderboard", "Leaderboard"), ("detailed", "All metrics"),
            ("detection", "Noise detection"), ("significance", "Significance"), ("plots", "Plots"),
            ("incomplete", "Missing and failed"), ("grid", "Grid"), ("environment", "Environment")]


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _tables(tables: list[Table], empty: str) -> str:
    return "".join(to_html(t) for t in tables) if tables else f'<p class="empty">{html.escape(empty)}</p>'


def _plain_table(df: pd.DataFrame, table_id: str, caption: str, classes: dict[str, str] | None = None) -> str:
    """A DataFrame as a simple table; ``classes`` maps a column to a cell-class prefix (value appended)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for values in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, values):
            text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
            cls = f' class="{classes[column]}{html.escape(text)}"' if classes and column in classes else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<figure class="table" id="{table_id}"><h3>{html.escape(caption)}</h3><table data-table="{table_id}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></figure>")


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "–"
    return "–" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def _tool_versions() -> str:
    names = ("rsnc-bench", "pandas", "numpy", "matplotlib", "seaborn")
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


def render(data: ReportData, leaderboards: list[Table], detailed: list[Table], detection: list[Table],
           comparisons: list[Comparison], plots: list[Plot], files: dict[str, Path]) -> str:
    """The whole page as a string."""
    o = data.options
    done = data.complete
    filters = [f"{name} {', '.join(values)}" for name, values in (("methods", o.methods), ("datasets", o.datasets),
                                                                   ("backbones", o.backbones)) if values]
    n_missing = int((data.incomplete["status"] == "missing").sum())
    n_failed = len(data.incomplete) - n_missing
    cards = [(len(done[["base_method", "dataset", "backbone", "noise_protocol", "noise_rate", "noise_seed", "train_seed"]].drop_duplicates()),
              "complete cells", False),
             (done["method"].nunique(), "methods", False), (done["dataset"].nunique(), "datasets", False),
             (", ".join(rate_label(r) for r in data.rates) or "–", "noise rates", False),
             (n_missing, "missing cells", n_missing > 0), (n_failed, "failed cells", n_failed > 0)]
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>rsnc-bench report: {html.escape(str(data.root))}</title><style>{CSS}</style></head><body><main>",
           "<h1>rsnc-bench report</h1>",
           f'<p class="meta">results <code>{html.escape(str(data.root.resolve()))}</code> · {o.split} split · metric '
           f"{html.escape(o.metric_name)}" + (f" · filters: {html.escape('; '.join(filters))}" if filters else "")
           + f" · generated {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}</p>",
           "<nav>" + "".join(f'<a href="#{s}">{t}</a>' for s, t in SECTIONS) + "</nav>",
           '<section id="summary"><h2>Summary</h2><div class="cards">'
           + "".join(f'<div class="card{" warn" if warn else ""}"><b>{html.escape(str(v))}</b>{t}</div>' for v, t, warn in cards)
           + "</div>"]
    if data.problems:
        out.append("<p>Unreadable result files (skipped):</p><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in data.problems) + "</ul>")
    out.append("<p>Files: " + ", ".join(f"<code>{html.escape(p.name)}</code> ({html.escape(k)})" for k, p in files.items())
               + ", and every plot as PNG and PDF under <code>plots/</code>.</p></section>")

    out.append(f'<section id="leaderboard"><h2>Leaderboard: test {html.escape(o.metric_name)} by noise rate</h2>')
    out.append(_tables(leaderboards, "No complete results yet.") + "</section>")
    out.append('<section id="detailed"><h2>All metrics</h2>' + _tables(detailed, "No complete results yet.") + "</section>")
    out.append('<section id="detection"><h2>Noise detection</h2>'
               + _tables(detection, "No method in these results reports a clean-ness signal.") + "</section>")
    out.append('<section id="significance"><h2>Significance</h2>')
    if not comparisons:
        out.append('<p class="empty">No complete results to compare.</p>')
    for c in comparisons:
        out.append(to_html(c.table) if c.table else f'<p class="empty">{html.escape(c.note)}</p>')
    out.append("</section>")

    out.append('<section id="plots"><h2>Plots</h2>')
    for p in plots:
        if p.png is None:
            out.append(f'<p class="skipped" id="plot-{p.name}">{html.escape(p.title)}: not drawn, {html.escape(p.skipped)}.</p>')
        else:
            out.append(f'<figure class="plot" id="plot-{p.name}"><img alt="{html.escape(p.title)}" src="{_img(p.png)}">'
                       f"<figcaption><b>{html.escape(p.title)}</b>: {html.escape(p.caption)} "
                       f"(<code>plots/{p.png.name}</code>, <code>plots/{p.pdf.name}</code>)</figcaption></figure>")
    out.append("</section>")

    out.append('<section id="incomplete"><h2>Missing and failed cells</h2>')
    if data.grid_note:
        out.append(f"<p>{html.escape(data.grid_note)}.</p>")
    if data.incomplete.empty:
        out.append('<p class="empty">None: every cell of the grid has a complete result.</p>' if data.grid is not None
                   else '<p class="empty">No failed cells.</p>')
    else:
        cells = data.incomplete[["label", "status", "error"]]
        out.append(_plain_table(cells, "incomplete-cells", f"{n_missing} missing, {n_failed} failed or diverged "
                                                         "(rerun `rsnc-bench run` with the same grid to fill them)",
                                {"status": "status-"}))
    out.append("</section>")

    out.append('<section id="grid"><h2>Grid</h2>')
    if data.grid is not None:
        settings = pd.DataFrame([(k, _setting(v)) for k, v in data.grid.items()], columns=["setting", "value"])
        out.append(_plain_table(settings, "grid-config", f"the last grid run into this folder (grid.json): "
                                                         f"{data.grid_cells} cells"))
    else:
        out.append('<p class="empty">No saved grid (<code>grid.json</code> is written by <code>rsnc-bench run</code>).</p>')
    out.append("</section>")

    out.append('<section id="environment"><h2>Environment</h2>')
    if data.environments.empty:
        out.append('<p class="empty">The results record no environment.</p>')
    else:
        out.append(_plain_table(data.environments, "environment", "what the results were computed with "
                                                                  "(each distinct value, with how many results have it)"))
    out.append(f"<p>Report made with {html.escape(_tool_versions())}.</p></section>")
    out.append("</main></body></html>\n")
    return "\n".join(out)
