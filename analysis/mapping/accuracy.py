"""Tier-1 accuracy of the mapping against labels, cluster-robust by topic."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.util.taxonomy import load_taxonomy


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


def tier1_confusion(predicted, truth, taxonomy: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per labeled tier-1 (ids or names as resolved by `util.taxonomy.resolve_tier1`; None/NaN = "none"):
    labeled, categorized_as (conversations predicted as it), correct, recall, precision and the most
    frequent wrong answer; and the full label x prediction table (tier-1 names)."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    names = dict(zip(tax["id"].astype(str), tax["label"]))

    def name(v):
        return "none" if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else names.get(str(v), str(v))

    t = pd.Series([name(v) for v in truth], name="label")
    p = pd.Series([name(v) for v in predicted], name="predicted")
    table = pd.crosstab(t, p)
    rows = []
    for lab, n in t.value_counts().items():
        wrong = p[(t == lab) & (p != lab)].value_counts()
        hit = int(((t == lab) & (p == lab)).sum())
        n_pred = int((p == lab).sum())
        rows.append({"tier1": lab, "labeled": int(n), "categorized_as": n_pred, "correct": hit, "recall": hit / n,
                     "precision": hit / n_pred if n_pred else np.nan,
                     "most_confused_with": f"{wrong.index[0]} ({int(wrong.iloc[0])})" if len(wrong) else ""})
    return pd.DataFrame(rows), table
