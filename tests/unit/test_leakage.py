"""Leakage stage (analysis/leakage/, notebook 03): estimates recover the simulated truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.contract.art9 import ART9
from analysis.contract.rundir import RunDir
from analysis.engines.pandas import PandasEngine
from analysis.leakage.corrected import (
    ESTIMATED,
    LOWER,
    UPPER,
    WITHHELD,
    CorrectedLeakage,
    assumption_checks,
    published_interval,
    published_limits,
)
from analysis.leakage.data import validation_counts
from analysis.stages.leakage import read_inputs, record_metrics

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_rogan_gladen_removes_the_false_positive_bias_and_sensitivity_cancels():
    rng = np.random.default_rng(1)
    n, prev, leak, sp = 200_000, 0.03, 0.05, 0.99
    T = rng.random(n) < prev
    passed = np.where(T, rng.random(n) < leak, rng.random(n) < 0.98)
    ests = {}
    for s in (0.6, 0.95):
        F = np.where(T, rng.random(n) < s, rng.random(n) < 1 - sp)
        idx = pd.Index([f"c{i}" for i in range(n)])
        flags = pd.DataFrame({"health": F}, index=idx)
        val = pd.DataFrame([{"category": "health", "tp": int(s * 1000), "fn": int((1 - s) * 1000), "tn": int(sp * 50_000), "fp": int((1 - sp) * 50_000)}])
        res = CorrectedLeakage(n_boot=2000).fit(pd.Series(passed, index=idx), flags, val, pd.Series("included", index=idx))
        lo, hi = res.interval()  # two-sided, or [0, U] when the floor binds in > 2.5% of draws (Se 0.6: ~3%)
        ests[s] = res.table.assign(pub_low=lo, pub_high=hi).query("region_group == 'all'").iloc[0]
    for s, r in ests.items():
        assert r["raw_rate"] > 0.2  # ~1,900 false positives among the passed swamp ~250 true leaks
        assert r["status"] != "withheld" and r["pub_low"] <= leak <= r["pub_high"]
        assert abs(r["rg_point"] - leak) < 0.015
    assert abs(ests[0.6]["rg_point"] - ests[0.95]["rg_point"]) < 0.02


def _rg_one(cells, tp=180, fn=20, tn=1990, fp=10, seed=3):
    val = pd.DataFrame([{"category": "health", "tp": tp, "fn": fn, "tn": tn, "fp": fp}]).set_index("category")
    return CorrectedLeakage(n_boot=2000, seed=seed)._one(np.array(cells), val, "health", np.random.default_rng(seed))


def test_ordinary_case_publishes_the_same_two_sided_interval_as_before():
    # x_P 40 of 4,000 passed, x_B 400 of 1,000 blocked, f 0.005: A = 20, B = 395, far from the floor.
    # Values from the estimator before the boundary rule (commit 2acb085), same seed: unchanged.
    r = _rg_one([40, 3960, 400, 600])
    assert r["status"] == "estimated" and r["reason"] == ""
    assert r["leak_rate"] == pytest.approx(0.048192771084337345, abs=1e-12)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.005907223327027622, 0.08497531681584485), abs=1e-12)
    assert np.isnan(r["upper_bound"]) and r["floor_passed"] <= 0.025


def test_floor_binding_case_is_withheld_or_one_sided_never_a_zero_interval():
    # f 0.02 of 2,000 passed = 40 expected false flags > 5 flagged: the floor binds in every draw
    r = _rg_one([5, 1995, 60, 140], tp=90, fn=10, tn=980, fp=20)
    assert r["status"] == "withheld" and r["reason"].startswith("not identified") and r["floor_passed"] > 0.95
    assert all(np.isnan(r[k]) for k in ("leak_rate", "ci_low", "ci_high", "upper_bound", "lower_bound"))
    # f 0.005 of 2,000 = 10 expected against 12 flagged: the floor binds in part of the draws -> upper bound only
    r = _rg_one([12, 1988, 60, 140], tp=90, fn=10, tn=1990, fp=10)
    assert r["status"] == "upper bound only" and 0.025 < r["floor_passed"] < 0.95 and r["reason"].startswith("one-sided 97.5% bound (the 95% interval's upper limit)")
    assert np.isnan(r["leak_rate"]) and np.isnan(r["ci_low"]) and 0 < r["upper_bound"] < 1
    # a detector no better than chance (Se <= f): not identified, whatever the counts
    r = _rg_one([12, 1988, 60, 140], tp=0, fn=10, tn=990, fp=10)
    assert r["status"] == "withheld" and "sensitivity" in r["reason"]
    r = _rg_one([12, 1988, 60, 140], tp=0, fn=0, tn=990, fp=10)  # no labeled conversation about it: Se unmeasured
    assert r["status"] == "withheld" and "no conversation about the category" in r["reason"]


def test_rejected_assumptions_withhold_the_category_and_the_metric_says_why(tmp_path):
    rng = np.random.default_rng(7)
    n = 6000
    idx = pd.Index([f"c{i}" for i in range(n)])
    T = rng.random(n) < 0.1
    passed = pd.Series(np.where(T, rng.random(n) < 0.2, rng.random(n) < 0.95), index=idx)
    lab = rng.random(n) < 0.4
    # health: the detector errs differently in the two strata (Se 0.9 blocked, 0.3 passed); religion: flags
    # on labeled conversations (tuned on them) at a different false-positive rate than on the counted ones
    se = np.where(passed, 0.3, 0.9)
    f_rel = np.where(lab, 0.05, 0.005)
    flags = pd.DataFrame({"health": np.where(T, rng.random(n) < se, rng.random(n) < 0.005),
                          "religion": np.where(T, rng.random(n) < 0.9, rng.random(n) < f_rel)}, index=idx)
    labels = pd.DataFrame({"conversation_id": idx[lab], "art9": [["health", "religion"] if t else [] for t in T[lab]]})
    ch = assumption_checks(passed, flags, labels).set_index("category")
    assert ch.loc["health", "differential_reason"].startswith("the detector errs differently") and ch.loc["health", "representative_reason"] == ""
    assert ch.loc["religion", "representative_reason"].startswith("labeled and counted") and ch.loc["religion", "differential_reason"] == ""
    val = validation_counts(flags, labels)
    res = CorrectedLeakage(n_boot=500).fit(passed, flags, val, pd.Series("included", index=idx), exclude=pd.Index(labels["conversation_id"]), checks=ch.reset_index())
    t = res.summary()
    assert (t["status"] == "withheld").all() and t["reason"].str.startswith("assumption rejected").all() and t["ci_low"].isna().all()
    # with per-stratum error rates the non-differential assumption is not needed: health is not withheld for it
    strat = validation_counts(flags, labels, pd.Series(np.where(passed, "passed", "blocked"), index=idx))
    t2 = CorrectedLeakage(n_boot=500).fit(passed, flags, strat, pd.Series("included", index=idx), exclude=pd.Index(labels["conversation_id"]), checks=ch.reset_index()).table
    assert not t2[t2["category"] == "health"]["reason"].str.startswith("assumption rejected").any()
    assert t2[t2["category"] == "religion"]["status"].eq("withheld").all()

    class _Report:  # record_metrics reads only the parts it finds
        whitebox = clustered = ppi = label_budget = exposure = violations = None
        corrected, skipped = res, {}
    (tmp_path / "metrics").mkdir()
    recs = record_metrics(_Report(), tmp_path).to_frame()
    rg = recs[recs["metric"] == "leak_rate_corrected"]
    assert rg["estimate"].isna().all() and rg["ci_low"].isna().all() and rg["note"].str.startswith("withheld: assumption rejected").all()


def test_published_limits_and_interval_say_the_same_per_status():
    # one mapping: the metrics record the ends a row publishes (None for the open side); coverage counts [0, U] / [L, 1]
    base = {"ci_low": 0.1, "ci_high": 0.3, "upper_bound": 0.4, "lower_bound": 0.05}
    rows = {s: base | {"status": s} for s in (ESTIMATED, UPPER, LOWER, WITHHELD)}
    assert published_limits(rows[ESTIMATED]) == (0.1, 0.3) and published_interval(rows[ESTIMATED]) == (0.1, 0.3)
    assert published_limits(rows[UPPER]) == (None, 0.4) and published_interval(rows[UPPER]) == (0.0, 0.4)
    assert published_limits(rows[LOWER]) == (0.05, None) and published_interval(rows[LOWER]) == (0.05, 1.0)
    assert published_limits(rows[WITHHELD]) is None and np.isnan(published_interval(rows[WITHHELD])).all()


def test_validation_counts_and_differential_check():
    ids = pd.Index(["a", "b", "c", "d", "e"])
    flags = pd.DataFrame({c: [False] * 5 for c in ART9}, index=ids)
    flags.loc[["a", "b", "e"], "health"] = True
    labels = pd.DataFrame({"conversation_id": ["a", "b", "c", "d", "zz"], "art9": [["health"], [], ["health"], [], ["health"]]})
    v = validation_counts(flags, labels).set_index("category").loc["health"]
    assert (v["tp"], v["fp"], v["fn"], v["tn"]) == (1, 1, 1, 1)  # "e" unlabeled, "zz" unknown: ignored
    strat = validation_counts(flags, labels, pd.Series(["passed", "passed", "blocked", "blocked", "passed"], index=ids))
    h = strat[strat["category"] == "health"].set_index("stratum")
    assert h.loc["passed", "tp"] == 1 and h.loc["blocked", "fn"] == 1


def test_stage_fails_clearly_without_stage_02(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="conversation_categories.parquet.*stage 02"):
        read_inputs(RunDir(tmp_path), PandasEngine())


