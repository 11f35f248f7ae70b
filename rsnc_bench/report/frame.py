"""A result store as tidy pandas frames, filtered: runs, training curves, incomplete cells, environments."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from rsnc_bench.data.split import describe_val
from rsnc_bench.errors import ConfigError, RsncError
from rsnc_bench.record import ResultRecord
from rsnc_bench.report.options import ReportOptions
from rsnc_bench.report.references import Reference, load_references
from rsnc_bench.results import GROUP, METRICS, SEEDS, latest, runs
from rsnc_bench.store import GRID_NAME, CellKey, ResultStore

TABLE_GROUP = GROUP[:3]  # one table / panel per (dataset, backbone, noise protocol)
CELL_COLUMNS = ["label", "status", "error", "method", "dataset", "backbone", "noise_protocol", "noise_rate",
                "noise_seed", "train_seed"]


@dataclass
class ReportData:
    root: Path
    options: ReportOptions
    runs: pd.DataFrame  # leaderboard.RUN_COLUMNS: complete runs and one row per failed cell
    history: pd.DataFrame  # GROUP + SEEDS + epoch + the val METRICS, per epoch of every complete run
    incomplete: pd.DataFrame  # CELL_COLUMNS: grid cells without a complete result (missing), failed cells
    references: list[Reference] = field(default_factory=list)
    grid: dict[str, Any] | None = None  # the saved grid (grid.json), as written
    grid_note: str = ""  # why the grid's missing cells could not be listed, if so
    grid_cells: int = 0  # cells of the saved grid (after the filters)
    environments: pd.DataFrame = field(default_factory=pd.DataFrame)  # field, value, results
    problems: list[str] = field(default_factory=list)  # unreadable result files

    @property
    def complete(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "complete"]

    @functools.cached_property
    def unranked(self) -> frozenset[str]:
        """Methods shown for reference but never ranked: those that see the clean labels."""
        return frozenset(self.runs.loc[self.runs["role"] == "upper-bound", "method"])

    @property
    def baseline(self) -> str | None:
        """The method the paired test compares with by default: the one whose results record the
        role "baseline" (the plain fine-tune), never found by its name."""
        names = sorted(set(self.complete.loc[self.complete["role"] == "baseline", "method"]))
        return names[0] if names else None

    def role_of(self, method: str) -> str | None:
        roles = self.runs.loc[self.runs["method"] == method, "role"].dropna()
        return str(roles.iloc[0]) if len(roles) else None

    @property
    def rates(self) -> list[float]:
        return sorted(self.complete["noise_rate"].unique())

    def scores(self, relpath: str) -> dict | None:
        return ResultStore(self.root).read_scores(relpath)


def _matches(value: Any, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(str(value), p) for p in patterns)


def _check_filter(name: str, patterns: tuple[str, ...], values: set[str], root: Path) -> None:
    """Every pattern of a filter must match something: a typo fails instead of giving an empty report."""
    for pattern in patterns:
        if not any(fnmatchcase(v, pattern) for v in values):
            known = ", ".join(sorted(values)) or "none"
            raise ConfigError(f"--{name} {pattern!r} matches no result in {root} ({name} there: {known})")


def _selected(options: ReportOptions, dataset: str, backbone: str, *methods: str) -> bool:
    """The filters: a row is kept when any of its method names matches (``ebaker`` keeps ``ebaker+sar``)."""
    return ((not options.methods or any(_matches(m, options.methods) for m in methods))
            and (not options.datasets or _matches(dataset, options.datasets))
            and (not options.backbones or _matches(backbone, options.backbones)))


def _history(records: dict[CellKey, ResultRecord]) -> pd.DataFrame:
    rows = []
    for key, record in records.items():
        if not record.complete:
            continue
        method = f"{key.method}@{record.score_tag}" if record.score_tag else key.method
        base = {**{n: getattr(key, n) for n in GROUP}, "method": method, "noise_seed": key.noise_seed,
                "train_seed": key.train_seed}
        for entry in record.history:
            val = entry.get("val")
            if isinstance(val, dict) and isinstance(entry.get("epoch"), int):
                rows.append({**base, "epoch": entry["epoch"],
                             **{m: float(val[m]) if isinstance(val.get(m), (int, float)) else math.nan for m in METRICS}})
    return pd.DataFrame(rows, columns=[*GROUP, *SEEDS, "epoch", *METRICS])


def _provenance(record: ResultRecord) -> dict[str, str]:
    """What a result was computed with beyond the environment: its val split and its precisions."""
    out = {}
    dataset = record.config.get("dataset") or {}
    if dataset.get("val"):
        out[f"val split ({dataset.get('name')})"] = describe_val(dataset["val"])
    for name, label in (("precision", "training precision"), ("eval_precision", "evaluation precision")):
        if record.timings.get(name):
            out[label] = record.timings[name]
    return out


def _environments(records: Iterable[ResultRecord]) -> pd.DataFrame:
    """Distinct values of each environment and provenance field over the results, with how many results have each."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        env = record.environment
        if not env:
            continue
        flat = {k: v for k, v in env.items() if k != "packages"}
        flat.update({f"package {k}": v for k, v in (env.get("packages") or {}).items()})
        flat.update(_provenance(record))
        for name, value in flat.items():
            counts[(name, str(value))] = counts.get((name, str(value)), 0) + 1
    rows = [{"field": k, "value": v, "results": n} for (k, v), n in counts.items()]
    return pd.DataFrame(rows, columns=["field", "value", "results"])


def _saved_grid(root: Path) -> tuple[dict[str, Any] | None, list[CellKey] | None, str]:
    """The saved grid's config, its cells, and a note when there is none or it cannot be read."""
    try:
        saved = ResultStore(root).read_grid()
    except RsncError as exc:
        return None, None, f"{exc}; only failed cells are listed"
    if saved is None:
        return None, None, f"no {GRID_NAME} in {root} (written by `rsnc-bench run`): only failed cells are listed"
    return saved[0], saved[1], ""


def load(root: str | Path, options: ReportOptions, results: Iterable[dict] | None = None,
         problems: list[str] | None = None) -> ReportData:
    """Read the store (or use ``results``, its documents), apply the filters, match the grid."""
    root = Path(root)
    if results is None:
        store = ResultStore(root)
        results = list(store.iter_results())
        problems = store.problems
    docs = latest(results)
    table = runs(docs.values(), options.split)
    references = load_references(options.references) if options.use_references else []
    grid, grid_keys, grid_note = _saved_grid(root)

    keys = list(docs) + [k for k in grid_keys or () if k not in docs]
    _check_filter("methods", options.methods, {*table["method"], *(k.method for k in keys)}, root)
    _check_filter("datasets", options.datasets, {k.dataset for k in keys}, root)
    _check_filter("backbones", options.backbones, {k.backbone for k in keys}, root)

    keep = [_selected(options, *row) for row in table[["dataset", "backbone", "method", "base_method"]].itertuples(index=False)]
    table = table.loc[np.array(keep, dtype=bool)]
    done = table[table["status"] == "complete"]
    rates = sorted(done["noise_rate"].unique())
    if options.rate is not None and rates and not np.isclose(rates, options.rate, atol=1e-9).any():
        raise ConfigError(f"--rate {options.rate:g}: no results at that noise rate in {root} "
                          f"(rates there: {', '.join(f'{r:g}' for r in rates)})")
    if options.compare_to not in ("best", "baseline") and options.compare_to not in set(done["method"]):
        raise ConfigError(f"--compare-to {options.compare_to!r}: no such method in the results of {root} "
                          f"(methods there: {', '.join(sorted(set(done['method'])))}; or 'baseline', or 'best')")
    table = table.reset_index(drop=True)
    table.attrs["split"] = options.split
    incomplete = []
    for key in keys:
        record = docs.get(key)
        if (record is not None and record.complete) or not _selected(options, key.dataset, key.backbone, key.method):
            continue
        incomplete.append({"label": key.label(), "status": "missing" if record is None else record.status,
                           "error": None if record is None else (record.error or "no error message"), **key.as_dict()})
    cells = pd.DataFrame(incomplete, columns=CELL_COLUMNS).sort_values("label", kind="stable").reset_index(drop=True)
    shown = set(table[["base_method", "dataset", "backbone", "noise_protocol", "noise_rate", *SEEDS]].itertuples(index=False, name=None))
    kept = {k: d for k, d in docs.items() if (k.method, k.dataset, k.backbone, k.noise_protocol, k.noise_rate,
                                               k.noise_seed, k.train_seed) in shown}
    return ReportData(root=root, options=options, runs=table, history=_history(kept), incomplete=cells,
                      references=references, grid=grid, grid_note=grid_note,
                      grid_cells=sum(_selected(options, k.dataset, k.backbone, k.method) for k in grid_keys or ()),
                      environments=_environments(kept.values()), problems=list(problems or []))
