"""Tier-1 accuracy of the mapping against labels, cluster-robust by topic."""

from __future__ import annotations

import numpy as np
import pandas as pd


def tier1_accuracy(predicted, truth, topic, *, alpha: float = 0.05) -> dict:
    """Share of conversations whose mapped tier-1 is the true one, with a CI cluster-robust by topic.

    A topic's conversations share one mapping, so errors come in blocks of a topic; a Wilson
    interval over conversations would treat them as independent and be far too narrow. The CI is
    statsmodels' cluster-robust OLS of the hit indicator on a constant, t with (topics - 1) df."""
    import statsmodels.api as sm

    pred = np.asarray(predicted, dtype=object)
    ok = np.array([isinstance(p, str) and p == t for p, t in zip(pred, np.asarray(truth, dtype=object))], dtype=float)
    groups = pd.factorize(pd.Series(np.asarray(topic)).astype(str))[0]
    out = {"accuracy": float(ok.mean()) if len(ok) else np.nan, "n": int(len(ok)), "topics": int(len(set(groups))),
           "unmapped": float(np.mean([not isinstance(p, str) for p in pred])) if len(pred) else np.nan,
           "ci_method": "cluster-robust by topic"}
    if out["topics"] >= 2 and ok.std() > 0:
        fit = sm.OLS(ok, np.ones((len(ok), 1))).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        lo, hi = fit.conf_int(alpha)[0]
        out.update(ci_low=float(max(lo, 0.0)), ci_high=float(min(hi, 1.0)))
    else:  # one topic, or all right / all wrong: no spread to estimate a cluster variance from
        out.update(ci_low=np.nan, ci_high=np.nan)
    return out
