"""Region-level permutation for region-assigned contrasts; one violation family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.leakage.regional import region_permutation_test, violation_family


def _users(rng, R=10, k=5, shock=0.0, effect=0.0, n=60):
    region = np.repeat([f"r{i}" for i in range(R)], n)
    inc = np.repeat(np.arange(R) < k, n)
    y = rng.normal(size=R * n) + np.repeat(rng.normal(size=R) * shock, n) + effect * inc
    return y, region, inc


def test_region_permutation_holds_its_level_under_region_shocks_where_a_user_level_test_does_not():
    rng = np.random.default_rng(0)
    rej_region, rej_user = [], []
    for _ in range(200):
        y, region, inc = _users(rng, shock=0.5)
        rej_region.append(region_permutation_test(y, region, inc, seed=1)["p_value"] < 0.05)
        rej_user.append(stats.ttest_ind(y[inc], y[~inc], equal_var=False).pvalue < 0.05)
    assert np.mean(rej_region) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)
    assert np.mean(rej_user) > 0.3


def test_region_permutation_is_exact_and_finds_a_large_effect():
    rng = np.random.default_rng(1)
    y, region, inc = _users(rng, effect=1.0)
    r = region_permutation_test(y, region, inc)
    assert r["exact"] and r["assignments"] == 252 and r["min_p"] == pytest.approx(1 / 252)
    assert r["p_value"] <= 2 / 252 + 1e-12
    assert r["effect"] == pytest.approx(y[inc].mean() - y[~inc].mean())


def test_region_permutation_rejects_mixed_regions_and_too_few():
    with pytest.raises(ValueError, match="both included and excluded"):
        region_permutation_test([1.0, 2.0, 3.0, 4.0], ["a", "a", "b", "c"], [True, False, True, False])
    with pytest.raises(ValueError, match="at least two regions per group"):
        region_permutation_test([1.0, 2.0, 3.0], ["a", "b", "c"], [True, False, False])


def test_one_family_keeps_the_false_alarm_rate_at_alpha_under_the_global_null():
    rng = np.random.default_rng(2)
    regions = [f"r{i}" for i in range(11)]
    alarms = []
    for _ in range(100):
        tests = pd.DataFrame({"test": [f"region {r}" for r in regions] + [f"category {j}" for j in range(12)],
                              "region": regions + ["ALL excluded"] * 12, "p_value": rng.random(23)})
        flags, statement = violation_family(tests)
        alarms.append(flags["flagged"].any())
    assert np.mean(alarms) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 100)
    assert "23 exposure tests in one Holm family" in statement


def test_chat_impressions_flag_on_their_own():
    tests = pd.DataFrame({"test": ["region DE"], "region": ["DE"], "p_value": [0.9]})
    flags, _ = violation_family(tests, chat_impressions=pd.Series({"DE": 0, "FR": 12}))
    assert flags.set_index("region")["flagged"].to_dict() == {"DE": False, "FR": True}
    with pytest.raises(ValueError, match="lack column"):
        violation_family(pd.DataFrame({"region": ["DE"]}))
