"""Clustered and prediction-powered leak rates, compliance verdicts and the label budget."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from analysis.leakage.inference import ClusteredLeakRate, PPILeakRate, clustered_proportion, compliance, label_budget
from analysis.validation.adversarial import leak_world


def test_independent_units_give_wilson_up_to_the_df_adjustment():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.05
    r = clustered_proportion(y, np.arange(2000))  # every unit its own cluster
    lo, hi = proportion_confint(y.sum(), 2000, method="wilson")
    assert (r["wilson_low"], r["wilson_high"]) == pytest.approx((lo, hi))
    assert r["deff"] == pytest.approx(1.0, abs=0.01)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=2e-4)


def test_whole_clusters_passing_together_widen_the_interval_by_the_design_effect():
    rng = np.random.default_rng(1)
    cl = np.repeat(np.arange(200), 5)  # 200 users x 5 conversations, all passed or all blocked
    y = np.repeat(rng.random(200) < 0.1, 5)
    r = clustered_proportion(y, cl)
    assert r["deff"] == pytest.approx(5, rel=0.05)
    assert r["clusters"] == 200
    assert (r["ci_high"] - r["ci_low"]) > 2 * (r["wilson_high"] - r["wilson_low"])
    assert r["lower_1s"] > r["ci_low"] and r["upper_1s"] < r["ci_high"]


def test_compliance_verdicts():
    assert compliance(0.008, 0.001, 0.01) == "shown below"
    assert compliance(0.03, 0.005, 0.01) == "not shown to exceed"
    assert compliance(0.05, 0.02, 0.01) == "exceeds"
    assert compliance(np.nan, np.nan, 0.01) == "not shown to exceed"


def test_label_budget_grows_as_the_rate_nears_the_tolerance_and_shrinks_with_a_better_detector():
    a = label_budget(0.002, 0.01, 0.03)
    b = label_budget(0.006, 0.01, 0.03)
    assert b > a > 0
    assert label_budget(0.006, 0.01, 0.03, variance_factor=0.5) < b
    assert label_budget(0.01, 0.01, 0.03) == float("inf")
    # no leak at all: the one-sided Wilson bound still needs ~268 conversations about the category
    assert label_budget(0.0, 0.01, 1.0) == pytest.approx(268, abs=2)
    with pytest.raises(ValueError, match="prevalence"):
        label_budget(0.001, 0.01, 0)


def test_ppi_is_unbiased_where_the_detector_fails_with_the_filter_and_rogan_gladen_is_not():
    est, truth = [], None
    for s in range(30):
        w = leak_world("correlated_detector", s, n_conversations=12000)
        t = PPILeakRate().fit(w.passed, w.member, w.labeled, w.score, w.user, categories=w.categories, truth=w.truth).table
        est.append(t.set_index("category")["rate"])
        truth = w.truth
    mean = np.mean(est, axis=0)
    expect = np.array([truth[c] for c in est[0].index])
    assert np.abs(mean - expect).max() < 0.012  # MC SE of a 30-world mean ~0.003-0.006
    # the raw detector-based rate among flagged conversations is far off (the filter's misses are the detector's)
    F = w.score >= 0.5
    raw = (F & w.passed[:, None]).sum(0) / F.sum(0)
    assert (np.abs(raw - expect) > 0.03).any()


def test_ppi_columns_and_verdicts():
    w = leak_world("benign", 5)
    r = PPILeakRate().fit(w.passed, w.member, w.labeled, w.score, w.user, categories=w.categories, truth=w.truth)
    t = r.table
    assert list(t["category"]) == list(w.categories)
    assert (t["ci_low"] <= t["rate"]).all() and (t["rate"] <= t["ci_high"]).all()
    assert set(t["verdict"]) <= {"shown below", "not shown to exceed", "exceeds"}
    assert (t["clusters"] > 1000).all() and "stratified" in r.to_markdown()
    assert ((t["lambda_passed"] >= 0) & (t["lambda_passed"] <= 1)).all()


def test_bad_input_is_named():
    w = leak_world("benign", 0, n_conversations=3000)
    with pytest.raises(ValueError, match="scores must lie in"):
        PPILeakRate().fit(w.passed, w.member, w.labeled, w.score * 2, w.user)
    with pytest.raises(ValueError, match="one row per"):
        ClusteredLeakRate().fit(w.passed[:10], w.member, w.user)
    with pytest.raises(ValueError, match="tolerance"):
        ClusteredLeakRate(tolerance=0)


def test_ppi_variance_factor_measures_the_detectors_quality_for_the_label_budget():
    """The budget's factor is PPI++'s variance relative to labels alone: well below 1 with a sharp detector,
    about 1 (no gain, only clustering) with a detector that does not know the category."""
    sharp = leak_world("benign", 3, sensitivity=0.995, specificity=0.9995)
    useless = leak_world("benign", 3, sensitivity=0.1, specificity=0.9)
    f = {}
    for name, w in (("sharp", sharp), ("useless", useless)):
        t = PPILeakRate().fit(w.passed, w.member, w.labeled, w.score, w.user, categories=w.categories).table
        f[name] = t["variance_factor"].to_numpy()
    assert np.median(f["sharp"]) < 0.6, f["sharp"]
    assert np.all(f["useless"] > 0.85) and np.median(f["useless"]) < 1.3, f["useless"]
    # the budget follows the factor
    assert label_budget(0.004, 0.01, 0.03, variance_factor=np.median(f["sharp"])) < label_budget(0.004, 0.01, 0.03)
