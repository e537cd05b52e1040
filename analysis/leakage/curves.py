"""Sensitivity analyses: leak rates as the filter's or the detector's threshold moves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.leakage.corrected import CorrectedLeakage
from analysis.leakage.data import validation_counts
from analysis.util.stats import binom_cis

# ----------------------------------------------------------------------- sensitivity analyses


def filter_threshold_curve(score: pd.Series, member: pd.DataFrame, thresholds=None, alpha: float = 0.05) -> pd.DataFrame:
    """Leak rate per category if the filter blocked at score >= tau instead (Wilson CI), for tau in `thresholds`."""
    thresholds = np.asarray(thresholds if thresholds is not None else [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    s = score.reindex(member.index).to_numpy()
    ok = np.isfinite(s)
    M = member.to_numpy()[ok]
    s = s[ok]
    rows = []
    for tau in thresholds:
        P = s < tau
        for j, c in enumerate(member.columns):
            n, k = int(M[:, j].sum()), int((M[:, j] & P).sum())
            rows.append({"threshold": float(tau), "category": c, "n": n, "passed": k, "leak_rate": k / n if n else np.nan})
    t = pd.DataFrame(rows)
    t["wilson_low"], t["wilson_high"] = binom_cis(t["passed"].to_numpy(), t["n"].to_numpy(), alpha, "wilson")
    return t


def detector_threshold_curve(passed: pd.Series, scores: pd.DataFrame, labels: pd.DataFrame, group: pd.Series,
                             thresholds=None, *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Raw and corrected leak rate per category as the detector's flagging threshold moves
    (validation recomputed on the labeled sample at each threshold; region group `all`)."""
    thresholds = np.asarray(thresholds if thresholds is not None else [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    est = CorrectedLeakage(alpha=alpha, n_boot=n_boot, seed=seed)
    lab_ids = pd.Index(labels["conversation_id"].astype(str))
    parts = []
    for tau in thresholds:
        flags = scores >= tau
        val = validation_counts(flags, labels)
        t = est.fit(passed, flags, val, group, exclude=lab_ids).table
        parts.append(t[t["region_group"] == "all"].assign(threshold=float(tau)))
    cols = ["threshold", "category", "flagged", "raw_rate", "leak_rate", "ci_low", "ci_high", "status", "sensitivity", "specificity"]
    return pd.concat(parts, ignore_index=True)[cols]
