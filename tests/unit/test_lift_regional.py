"""RegionDiD: the estimate, its CR3 variance and the randomization test against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from analysis.lift.regional import RegionCells, RegionDiD
from analysis.validation.adversarial import did_user_clustered, lift_world


def _cells(seed=0, R=8, k=4):
    rng = np.random.default_rng(seed)
    n = rng.integers(5_000, 50_000, size=(R, 2)).astype(float)
    c = rng.binomial(n.astype(int), 0.02 * rng.lognormal(0, 0.05, size=(R, 2))).astype(float)
    return RegionCells([f"r{i}" for i in range(R)], np.arange(R) < k, c, n)


def test_estimate_is_the_ratio_of_ctr_ratios_and_equals_the_saturated_poisson_glm():
    cells = _cells()
    r = RegionDiD(max_exact=100).fit(cells)
    inc = cells.included
    R = lambda m, t: cells.clicks[m, t].sum() / cells.impressions[m, t].sum()  # noqa: E731
    expect = (R(inc, 1) / R(inc, 0)) / (R(~inc, 1) / R(~inc, 0)) - 1
    assert r.rel_lift == pytest.approx(expect, rel=1e-12)
    # the same number from statsmodels: Poisson GLM of clicks on group x period, offset log impressions
    df = pd.DataFrame({"inc": np.repeat(inc, 2).astype(float), "post": np.tile([0.0, 1.0], len(inc)),
                       "c": cells.clicks.ravel(), "n": cells.impressions.ravel()})
    X = sm.add_constant(np.column_stack([df.inc, df.post, df.inc * df.post]))
    glm = sm.GLM(df.c.to_numpy(), X, family=sm.families.Poisson(), offset=np.log(df.n.to_numpy())).fit()
    assert r.theta == pytest.approx(glm.params[3], abs=1e-9)


def test_cr3_variance_is_the_groupwise_leave_one_region_out_jackknife():
    cells = _cells(1, R=9, k=4)
    r = RegionDiD(max_exact=200).fit(cells)
    inc = cells.included

    def theta(keep):
        m = np.asarray(keep)
        i, e = inc & m, ~inc & m
        lr = lambda s, t: math.log(cells.clicks[s, t].sum() / cells.impressions[s, t].sum())  # noqa: E731
        return (lr(i, 1) - lr(i, 0)) - (lr(e, 1) - lr(e, 0))

    comps = []
    for g in (inc, ~inc):
        idx = np.flatnonzero(g)
        loo = np.array([theta(np.arange(len(inc)) != j) for j in idx])
        comps.append((len(idx) - 1) / len(idx) * ((loo - loo.mean()) ** 2).sum())
    assert r.se == pytest.approx(math.sqrt(sum(comps)), rel=1e-10)
    df = sum(comps) ** 2 / (comps[0] ** 2 / 3 + comps[1] ** 2 / 4)
    assert r.df == pytest.approx(df, rel=1e-10)
    assert r.regions_included == 4 and r.regions_excluded == 5
    assert "4 included + 5 excluded" in r.clusters


def test_randomization_test_enumerates_every_assignment_and_counts_the_observed_one():
    r = RegionDiD(max_exact=100, min_regions=5).fit(_cells(2))
    assert r.exact and r.n_assignments == math.comb(8, 4)
    assert 1 / 70 <= r.p_randomization <= 1
    assert (r.p_randomization * 70) == pytest.approx(round(r.p_randomization * 70))
    assert "randomization p-value cannot go below 0.0143" in r.caveat
    assert "cannot go below" not in RegionDiD(max_exact=100).fit(_cells(2)).caveat


def test_rejects_bad_input_with_clear_messages():
    with pytest.raises(ValueError, match="at least two included and two excluded"):
        RegionDiD().fit(_cells(R=5, k=1))
    with pytest.raises(ValueError, match="without impressions"):
        RegionCells(["a", "b"], [True, False], [[1, 1], [1, 1]], [[10, 0], [10, 10]])
    with pytest.raises(ValueError, match="both included and excluded"):
        RegionCells.from_frame(pd.DataFrame({"region": ["a", "a"], "included": [True, False], "post": [False, True],
                                             "clicks": [1, 1], "impressions": [10, 10]}))


def test_user_clustered_did_matches_statsmodels_cluster_wls():
    up = lift_world("benign", 3, n_users=800).user_period()
    d = did_user_clustered(up)
    X = np.column_stack([np.ones(len(up)), up.included, up.post, up.included * up.post]).astype(float)
    res = sm.WLS((up.clicks / up.impressions).to_numpy(), X, weights=up.impressions.to_numpy(float)).fit(
        cov_type="cluster", cov_kwds={"groups": up.user.to_numpy()}, use_t=True)
    assert d["abs_lift"] == pytest.approx(res.params[3], rel=1e-9)
    assert d["se"] == pytest.approx(res.bse[3], rel=1e-9)
    assert d["p_value"] == pytest.approx(res.pvalues[3], rel=1e-7)


def test_region_did_from_user_rows_equals_from_region_cells():
    w = lift_world("region_shocks", 4, n_users=1500)
    up = w.user_period()
    a = RegionDiD(seed=1).fit(up)
    b = RegionDiD(seed=1).fit(RegionCells.from_frame(up))
    assert a.rel_lift == b.rel_lift and a.se == b.se and a.p_randomization == b.p_randomization
    assert {"summary", "to_frame", "to_markdown"} <= set(dir(a))
    assert "region DiD" in a.to_markdown()


# ------------------------------------------------------------------ region-level event study

from analysis.lift.regional import RegionEventStudy  # noqa: E402
from analysis.validation.adversarial import weekly_world  # noqa: E402


def _week_cells(seed=0, R=8, k=4, W=8, trend=0.0):
    rng = np.random.default_rng(seed)
    n = rng.integers(5_000, 40_000, size=(R, W)).astype(float)
    weeks = np.arange(-W // 2, W // 2)
    inc = np.arange(R) < k
    p = 0.02 * rng.lognormal(0, 0.04, size=(R, W)) * np.exp(np.outer(inc * trend, weeks))
    c = rng.binomial(n.astype(int), p).astype(float)
    return np.array([f"r{i}" for i in range(R)]), inc, weeks, c, n


def test_event_study_coefficients_and_cr3_match_direct_leave_one_region_out():
    regions, inc, weeks, c, n = cells = _week_cells(2, R=7, k=3)
    r = RegionEventStudy(max_exact=100).fit(cells=cells)

    def gap(keep):
        a, b = keep & inc, keep & ~inc
        return np.log(c[a].sum(0) / n[a].sum(0)) - np.log(c[b].sum(0) / n[b].sum(0))

    ref = list(weeks).index(-1)
    g = gap(np.ones(len(inc), bool))
    est = r.coefs.set_index("week")["estimate"]
    for j, wk in enumerate(weeks):
        if wk != -1:
            assert est[wk] == pytest.approx(g[j] - g[ref], abs=1e-12)
    # CR3 of week 2: jackknife per group, V = sum_g (G_g - 1) / G_g * sum_(r in g) (theta_(-r) - mean_g)^2
    j = list(weeks).index(2)
    V = 0.0
    for grp in (inc, ~inc):
        loo = []
        for i in np.flatnonzero(grp):
            keep = np.ones(len(inc), bool)
            keep[i] = False
            gg = gap(keep)
            loo.append(gg[j] - gg[ref])
        loo = np.array(loo)
        V += (len(loo) - 1) / len(loo) * ((loo - loo.mean()) ** 2).sum()
    assert r.coefs.set_index("week").loc[2, "se"] == pytest.approx(math.sqrt(V), rel=1e-9)
    # the pre-trend slope is OLS of the gap on week over the pre-period weeks
    pre = weeks < 0
    assert r.pretrend_slope == pytest.approx(np.polyfit(weeks[pre], g[pre], 1)[0], rel=1e-9)


def test_pretrend_test_over_regions_finds_a_drift_and_ignores_region_shocks():
    assert RegionEventStudy(n_permutations=300, seed=1).fit(weekly_world("region_trend", 3, trend=0.02)).pretrend_p < 0.01
    # region x week shocks: the region-level slope test holds its level, the user-clustered joint F does not
    from analysis.lift.did import EventStudy

    rej_region, rej_user = [], []
    for s in range(10):
        w = weekly_world("region_shocks", 100 + s, n_users=4000, shock_sd=0.10)
        rej_region.append(RegionEventStudy(n_permutations=50, seed=s).fit(w).pretrend_p < 0.05)
        rej_user.append(EventStudy().fit(w).pretrend_p < 0.05)
    assert sum(rej_region) <= 2 and sum(rej_user) >= 4, (sum(rej_region), sum(rej_user))


def test_weekly_world_cells_are_the_region_week_sums_of_its_user_weeks():
    """The pre-trend benchmark's thousands of worlds use WeeklyWorld.cells (bincount), not the user-week frame."""
    from analysis.lift.regional import region_week_cells

    for kind in ("benign", "few_regions"):
        w = weekly_world(kind, 5, n_users=500)
        for a, b in zip(w.cells(), region_week_cells(w.user_week, w.users)):
            np.testing.assert_array_equal(a, b)


def test_region_event_study_rejects_bad_input():
    regions, inc, weeks, c, n = _week_cells()
    with pytest.raises(ValueError, match="at least two included and two excluded"):
        RegionEventStudy().fit(cells=(regions, np.arange(8) < 1, weeks, c, n))
    with pytest.raises(ValueError, match="reference week 5"):
        RegionEventStudy(ref_week=5).fit(cells=(regions, inc, weeks, c, n))
    with pytest.raises(ValueError, match="at least 3 pre-period weeks"):
        RegionEventStudy().fit(cells=(regions, inc, weeks[2:], c[:, 2:], n[:, 2:]))
