"""One shape for every benchmark's figures, so that ``run_all.py`` can print them side by side.

A benchmark script ends with ``save(name, setup, figures, **details)``: it writes
``results/<name>.json`` with its setup, its figures (each a value with its target and whether the
target is met) and whatever details it wants kept, and returns the path. A figure that could not
be measured (a tool not installed, no GPU) keeps ``value=None`` and says why in ``note``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


@dataclass
class Figure:
    benchmark: str  # e.g. "1 evaluator vs CLIP_benchmark"
    name: str  # what was measured, e.g. "speed ratio at 1,093 x 5,465"
    value: float | None  # None: not measured (see note)
    unit: str  # "x", "%", "ms", ...
    target: str  # e.g. ">= 10", "" when the figure is context only
    met: bool | None  # None: no target, or not measured
    note: str = ""

    def cells(self) -> list[str]:
        if self.value is None:
            shown = "not measured"
        elif self.unit == "%":
            shown = f"{100 * self.value:.1f} %"
        else:
            shown = f"{self.value:.3g} {self.unit}".rstrip()
        verdict = {True: "met", False: "MISSED", None: "-"}[self.met]
        return [self.benchmark, self.name, shown, self.target or "-", verdict, self.note]


def save(name: str, setup: dict, figures: list[Figure], **details) -> Path:
    """Write ``results/<name>.json``: the setup, the figures and any details; returns its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"setup": setup, "figures": [asdict(f) for f in figures], **details}, indent=2) + "\n")
    return path


def load(path: Path) -> list[Figure]:
    return [Figure(**f) for f in json.loads(path.read_text()).get("figures", [])]


def table(figures: list[Figure]) -> str:
    """The figures as one Markdown table."""
    lines = ["| benchmark | figure | value | target | verdict | note |", "|---|---|---:|---|---|---|"]
    lines += ["| " + " | ".join(f.cells()) + " |" for f in figures]
    return "\n".join(lines)
