"""Key figures of a stage, written to `metrics/<stage>.json` for tests, batch comparisons and the summary."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.contract import metric_names
from analysis.contract.rundir import RunDir
from analysis.util.storage import write_json


@dataclass
class Metric:
    metric: str
    estimate: float | int | None
    group: dict[str, Any] = field(default_factory=dict)
    ci_low: float | None = None
    ci_high: float | None = None
    truth: float | int | None = None
    n: int | None = None
    note: str | None = None  # why there is no estimate ("not computed: ...")

    def covers_truth(self) -> bool | None:
        if self.truth is None or self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low <= self.truth <= self.ci_high


class MetricsRecorder:
    """Collects a stage's key numbers and writes them atomically as a list of records."""

    def __init__(self, run_dir: str | Path | RunDir, stage: str):
        self.stage = stage
        self.path = RunDir.of(run_dir).metrics_file(stage)
        self.records: list[Metric] = []

    def add(self, metric: str, estimate, *, group=None, ci=None, truth=None, n=None, note=None) -> Metric:
        """Record one figure. A figure on an empty denominator (n = 0) or without a value is recorded
        as not computed, with `note` saying why: never as 0.0 or NaN."""
        metric_names.check(self.stage, metric)
        lo, hi = ci if ci is not None else (None, None)
        est, n = _num(estimate), None if n is None or pd.isna(n) else int(n)
        if n == 0:
            est, lo, hi = None, None, None
            note = note or "not computed: no observations (n = 0)"
        elif est is None and note is None:
            note = "not computed"
        m = Metric(metric, est, dict(group or {}), _num(lo), _num(hi), _num(truth), n, note)
        self.records.append(m)
        return m

    def skip(self, metric: str, reason: str, *, group=None, truth=None) -> Metric:
        """Record that a figure could not be computed in this run, and why (the summary says so)."""
        return self.add(metric, None, group=group, truth=truth, note=f"not computed: {reason}")

    def to_frame(self) -> pd.DataFrame:
        return metrics_frame([asdict(r) for r in self.records])

    def write(self) -> Path:
        return write_json([asdict(r) for r in self.records], self.path)


def read_metrics(run_dir: str | Path | RunDir, stage: str | None = None) -> pd.DataFrame:
    """All metric records of a run (or one stage) as a tidy frame with a `stage` column."""
    paths = sorted(RunDir.of(run_dir).metrics_dir.glob(f"{stage or '*'}.json"))
    rows = []
    for p in paths:
        for rec in json.loads(p.read_text()):
            rows.append({"stage": p.stem, **rec})
    return metrics_frame(rows)


def metrics_frame(records: list[dict]) -> pd.DataFrame:
    cols = ["stage", "metric", "group", "estimate", "ci_low", "ci_high", "truth", "n", "note"]
    df = pd.DataFrame(records)
    for c in cols:
        if c not in df:
            df[c] = None
    return df[[c for c in cols]]


def _num(x):
    if x is None:
        return None
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(x, bool):
        return x
    f = float(x)
    if math.isfinite(f) and f == int(f) and not isinstance(x, float) and abs(f) < 2**53:
        return int(f)
    return f
