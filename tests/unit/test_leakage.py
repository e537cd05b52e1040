"""Leakage stage (analysis/leakage/, notebook 03): estimates recover the simulated truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.contract.art9 import ART9
from analysis.contract.rundir import RunDir
from analysis.engines.pandas import PandasEngine
from analysis.leakage.corrected import CorrectedLeakage
from analysis.leakage.data import validation_counts
from analysis.stages.leakage import read_inputs

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
        r = CorrectedLeakage(n_boot=2000).fit(pd.Series(passed, index=idx), flags, val, pd.Series("included", index=idx)).table
        ests[s] = r[r["region_group"] == "all"].iloc[0]
    for s, r in ests.items():
        assert r["raw_rate"] > 0.2  # ~1,900 false positives among the passed swamp ~250 true leaks
        assert r["ci_low"] <= leak <= r["ci_high"]
        assert abs(r["leak_rate"] - leak) < 0.015
    assert abs(ests[0.6]["leak_rate"] - ests[0.95]["leak_rate"]) < 0.02


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


