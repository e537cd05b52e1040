"""Coverage and false-positive rates in adversarial worlds (issue 14), the fast version of
bench/validation_worlds.py: fewer worlds, so each band is 0.95 (or 0.05) +/- 3 Monte Carlo SEs for
its number of worlds (the benchmark's 1,000 worlds per kind give the figures in docs/)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.validation import studies as V
from analysis.validation.adversarial import LEAK_KINDS, LIFT_KINDS

pytestmark = pytest.mark.slow

N_LIFT, N_LEAK = 120, 80


def band(n: int, p: float) -> tuple[float, float]:
    half = max(3 * np.sqrt(p * (1 - p) / n), 0.02)
    return p - half, p + half


@pytest.fixture(scope="module")
def lift():
    return {k: V.lift_rows(k, range(5000, 5000 + N_LIFT), n_permutations=400) for k in LIFT_KINDS}


@pytest.fixture(scope="module")
def leak():
    return {k: V.leak_rows(k, range(7000, 7000 + N_LEAK), n_boot=500) for k in LEAK_KINDS}


@pytest.mark.parametrize("kind", LIFT_KINDS)
def test_region_did_holds_in_every_lift_world(lift, kind):
    r = lift[kind]
    null, eff = r[~r["effect"]], r[r["effect"]]
    lo, hi = band(N_LIFT, 0.95)
    assert lo <= eff["region_did_covers"].mean() <= hi
    flo, fhi = band(N_LIFT, 0.05)
    assert (null["region_did_p"] < 0.05).mean() <= fhi
    assert (null["region_ri_p"] < 0.05).mean() <= fhi


def test_todays_lift_estimators_fail_where_the_issue_says(lift):
    for kind in ("region_shocks", "few_regions"):
        null = lift[kind][~lift[kind]["effect"]]
        assert (null["did_user_p"] < 0.05).mean() > 0.10, f"user-clustered DiD should over-reject under {kind}"
    null = lift["regional_baseline"][~lift["regional_baseline"]["effect"]]
    assert (null["region_cuped_p"] < 0.05).mean() > 0.5, "region CUPED carries the regions' baseline difference"
    # A/B CUPED, randomized within included regions, is unaffected
    for kind in LIFT_KINDS:
        eff = lift[kind][lift[kind]["effect"]]
        assert eff["ab_cuped_covers"].mean() >= band(N_LIFT, 0.95)[0]


@pytest.mark.parametrize("kind", LEAK_KINDS)
@pytest.mark.parametrize("col", ["clustered_covers", "ppi_covers"])
def test_clustered_and_ppi_leak_rates_hold_per_category(leak, kind, col):
    r = leak[kind]
    lo, hi = band(len(r), 0.95)
    assert lo <= r[col].mean() <= hi, f"{col} pooled over categories in {kind}"
    per = r.groupby("category")[col].mean()
    # per category the 1,000-world benchmark puts both intervals at 0.93-0.97 (docs/leakage.md): hold each
    # category to the band's floor minus 3 MC SEs of N_LEAK worlds
    clo, chi = band(N_LEAK, 0.93)
    assert (per >= clo).all(), f"{col} in {kind}: {per[per < clo].to_dict()}"


def test_todays_leak_intervals_fail_where_the_issue_says(leak):
    assert leak["clustered_misses"]["wilson_covers"].mean() < 0.925, "Wilson ignores user-clustered misses"
    assert leak["correlated_detector"]["rg_covers"].mean() < 0.5, "Rogan-Gladen assumes non-differential detector error"
    assert leak["benign"]["rg_covers"].mean() >= band(len(leak["benign"]), 0.95)[0], "RG holds where its assumption does"


N_CATEGORY = 30


def test_per_category_lift_intervals_hold_per_category_not_only_pooled():
    """Issue 14, item 7: 32 categories with 12-190 users on the chat side (the default world's range),
    each judged on its own over N_CATEGORY worlds. The user-clustered WLS interval it replaced covered
    0.75-0.87 in the categories with < 35 chat users (0.92 pooled)."""
    r = V.category_rows(range(9000, 9000 + N_CATEGORY))
    per = r.groupby("ad_category").agg(coverage=("covers", "mean"), z_mean=("z", "mean"), z_sd=("z", "std"), n=("z", "size"))
    lo, hi = band(len(r), 0.95)
    assert lo <= r["covers"].mean() <= hi
    assert (per["coverage"] >= 0.75).all(), per[per["coverage"] < 0.75]
    assert (per["z_mean"].abs() <= 4 / np.sqrt(per["n"])).all(), per  # no category biased
    assert (per["z_sd"] <= 1.5).all(), per  # nor too confident
    small = r[r["users_chat"] < 30]
    assert small["covers"].mean() >= band(len(small), 0.95)[0], "few users on the chat side"
