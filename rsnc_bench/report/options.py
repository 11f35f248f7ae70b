"""What a report shows: filters, the metric, the rate of the per-rate plots, the references."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rsnc_bench.errors import ConfigError
from rsnc_bench.results import METRICS, RECALL_HEADERS

METRIC_NAMES = {"mr": "mR", "rsum": "rSum", **RECALL_HEADERS}  # every metric is higher-is-better


@dataclass(frozen=True)
class ReportOptions:
    methods: tuple[str, ...] = ()  # wildcards on the row name (``ebaker+sar``) or the cell's method; () = all
    datasets: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    metric: str = "mr"  # mr, rsum or a recall key (i2t_r1 ... t2i_r10)
    rate: float | None = None  # noise rate of the heatmap and ROC plots; None = the highest one present
    references: Path | None = None  # YAML of reported numbers; None = the shipped file
    use_references: bool = True
    # the method every other is tested against: "baseline" = the one whose results record that role
    # (clip-ft), "best" = the best by the metric, or a method's name
    compare_to: str = "baseline"
    split: str = "test"  # test, val or test_last
    report_dir: Path | None = None  # None = <store>/report

    def __post_init__(self) -> None:
        metric = str(self.metric).strip().lower()
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        object.__setattr__(self, "metric", metric)
        if self.split not in ("test", "val", "test_last"):
            raise ConfigError(f"unknown split {self.split!r}; choose test, val or test_last")
        if self.rate is not None and (not isinstance(self.rate, (int, float)) or math.isnan(self.rate)
                                      or not 0 <= self.rate <= 1):
            raise ConfigError(f"--rate must be a noise rate in [0, 1], got {self.rate!r}")

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]
