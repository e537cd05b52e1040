"""Coverage and false-positive studies of today's (Cuped on regions, CorrectedLeakage, Wilson, the
user-clustered DiD) and the region-/cluster-aware estimators over the
adversarial worlds of `analysis.validation.adversarial` (bench/validation_worlds.py runs >= 1,000 worlds per
kind; tests/validation runs a faster version).

`lift_rows(kind, seeds)` / `leak_rows(kind, seeds)` return one row per world (and category) with
whether each estimator's 95% CI covers the truth and each test's p-value or verdict; `summarize`
turns rows into coverage / false-positive rates with their Monte Carlo SEs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from scipy import stats

from analysis.leakage.corrected import CorrectedLeakage, published_interval
from analysis.leakage.inference import ClusteredLeakRate, PPILeakRate, label_budget
from analysis.lift.ab import Cuped
from analysis.lift.categories import CategoryLift
from analysis.lift.did import EventStudy
from analysis.lift.regional import RegionDiD, RegionEventStudy
from analysis.validation.adversarial import category_world, did_user_clustered, leak_world, lift_world, weekly_world

ALPHA = 0.05


def lift_rows(kind: str, seeds, *, lift: float = 0.05, n_permutations: int = 1000) -> pd.DataFrame:
    """Per world: null (lift 0) and effect (lift > 0) versions with distinct seeds. Estimators: today's
    user-clustered DiD (abs lift), today's region CUPED (rel lift, delta CI), the region DiD (CR3,
    studentized RI)."""
    rows = []
    for s in seeds:
        for effect in (False, True):
            w = lift_world(kind, int(s) * 2 + int(effect), lift=lift if effect else 0.0)
            up = w.user_period()
            d = did_user_clustered(up, ALPHA)
            r = RegionDiD(ALPHA, n_permutations=n_permutations, seed=int(s)).fit(up)
            cu = Cuped(ALPHA).fit_users(w.users, w.users["included"].to_numpy())
            inc = w.users[w.users["included"]]
            ab = Cuped(ALPHA).fit_users(inc, (inc["arm"] == "treatment").to_numpy())
            rows.append({
                "kind": kind, "seed": int(s), "effect": effect, "truth_rel": w.truth_rel,
                "did_user_p": d["p_value"], "did_user_covers": d["ci"][0] <= w.truth_abs <= d["ci"][1],
                "region_cuped_p": cu.p_value, "region_cuped_covers": cu.rel_ci_delta[0] <= w.truth_rel <= cu.rel_ci_delta[1],
                "region_did_p": r.p_value, "region_did_covers": r.ci[0] <= w.truth_rel <= r.ci[1],
                "region_ri_p": r.p_randomization,
                "ab_cuped_p": ab.p_value, "ab_cuped_covers": ab.rel_ci_delta[0] <= w.truth_arm_rel <= ab.rel_ci_delta[1], "region_did_df": r.df,
                "regions": r.regions_included + r.regions_excluded,
            })
    return pd.DataFrame(rows)


def pretrend_rows(kind: str, seeds, *, n_permutations: int = 500, user_f: bool = True) -> pd.DataFrame:
    """Per weekly world without a policy effect: the pre-trend tests' p-values (region-level slope, CR3 t
    and studentized randomization; the user-clustered joint F when `user_f`, ~10x the cost of the rest)
    and the per-week placebo coefficients' rejection rate. In `region_trend` worlds a rejection is a
    detection; elsewhere it is a false positive."""
    rows = []
    for s in seeds:
        w = weekly_world(kind, int(s))
        r = RegionEventStudy(alpha=ALPHA, n_permutations=n_permutations, max_exact=n_permutations, seed=int(s)).fit(cells=w.cells())
        pre_r = r.coefs[r.coefs["period"] == "pre"]
        row = {"kind": kind, "seed": int(s), "regions_included": r.regions_included, "regions_excluded": r.regions_excluded,
               "region_slope_p": r.pretrend_p, "region_slope_ri_p": r.pretrend_p_randomization, "region_slope_df": r.pretrend_df,
               # per-week placebo coefficients: share whose 95% CI excludes 0 (each week a null in these worlds)
               "region_week_reject": float(((pre_r["ci_low"] > 0) | (pre_r["ci_high"] < 0)).mean()),
               "user_f_p": np.nan, "user_week_reject": np.nan}
        if user_f:
            u = EventStudy(alpha=ALPHA).fit(w)
            pre_u = u.coefs[u.coefs["period"] == "pre"]
            row |= {"user_f_p": u.pretrend_p, "user_week_reject": float(((pre_u["ci_low"] > 0) | (pre_u["ci_high"] < 0)).mean())}
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_pretrend(rows: pd.DataFrame) -> pd.DataFrame:
    """Per kind: rejection rate at alpha of each pre-trend test, and of the per-week placebo coefficients."""
    out = []
    for kind, g in rows.groupby("kind", sort=False):
        for name, col in (("region slope, CR3 t (the gate)", "region_slope_p"),
                          ("region slope, studentized RI", "region_slope_ri_p"), ("joint F, user-clustered (before)", "user_f_p")):
            f = rate(np.where(g[col].notna(), g[col] < ALPHA, np.nan))
            out.append({"kind": kind, "test": name, "worlds": f[2], "rejection": f[0], "mc_se": f[1]})
        for name, col in (("per-week placebo coefficient, CR3 over regions (new)", "region_week_reject"),
                          ("per-week placebo coefficient, user-clustered (before)", "user_week_reject")):
            x = g[col].dropna().to_numpy(float)
            if not len(x):
                continue
            out.append({"kind": kind, "test": name, "worlds": len(x), "rejection": float(x.mean()),
                        "mc_se": float(x.std(ddof=1) / np.sqrt(len(x)))})
    return pd.DataFrame(out)


def leak_rows(kind: str, seeds, *, target_rate: float | None = None, tolerance: float = 0.01, n_boot: int = 500) -> pd.DataFrame:
    """Per world and category: coverage of Wilson and the user-clustered interval (labeled sample),
    PPI (stratified by filter decision) and Rogan-Gladen (today's corrected estimate), and each
    compliance verdict. With `target_rate` = tolerance every true rate sits on the tolerance, so
    'shown below' is a false assurance: its rate is the compliance test's false-positive rate."""
    rows = []
    for s in seeds:
        w = leak_world(kind, int(s), target_rate=target_rate)
        lab = w.labeled
        cl = ClusteredLeakRate(ALPHA, tolerance).fit(w.passed[lab], w.member[lab], w.user[lab], categories=w.categories).table
        pp = PPILeakRate(ALPHA, tolerance).fit(w.passed, w.member, lab, w.score, w.user, categories=w.categories).table
        F = w.score >= 0.5
        rng = np.random.default_rng(int(s))
        rg = CorrectedLeakage(ALPHA, n_boot=n_boot)
        u = ~lab
        for j, c in enumerate(w.categories):
            y, f = w.member[lab, j], F[lab, j]
            val = pd.DataFrame([{"tp": int((y & f).sum()), "fn": int((y & ~f).sum()), "tn": int((~y & ~f).sum()), "fp": int((~y & f).sum())}], index=[c])
            P, Fu = w.passed[u], F[u, j]
            cells = np.array([(P & Fu).sum(), (P & ~Fu).sum(), (~P & Fu).sum(), (~P & ~Fu).sum()])
            g_lo, g_hi = published_interval(rg._one(cells, val, c, rng)) if n_boot else (np.nan, np.nan)  # withheld: not covered
            tr = w.truth[c]
            a, b = cl.iloc[j], pp.iloc[j]
            rows.append({
                "kind": kind, "seed": int(s), "category": c, "truth": tr,
                "wilson_covers": a["wilson_low"] <= tr <= a["wilson_high"], "clustered_covers": a["ci_low"] <= tr <= a["ci_high"],
                "ppi_covers": b["ci_low"] <= tr <= b["ci_high"], "rg_covers": (g_lo <= tr <= g_hi) if n_boot else np.nan,
                "clustered_width": a["ci_high"] - a["ci_low"], "ppi_width": b["ci_high"] - b["ci_low"],
                "clustered_verdict": a["verdict"], "ppi_verdict": b["verdict"],
            })
    return pd.DataFrame(rows)


def budget_rows(kind: str, seeds, *, rate: float = 0.02, tolerance: float = 0.05, power: float = 0.8,
                n_conversations: int = 24000) -> pd.DataFrame:
    """Does the label budget deliver its power? Per world and category (every true rate = `rate` <
    `tolerance`): on a pilot world (25% labeled) the variance factor PPI++ measures (and the design
    effect alone); the budget at the true rate with each; then a fresh world labeled at each budget,
    where the verdict should be 'shown below' with probability ~`power` if the factor is right."""
    rows = []
    for s in seeds:
        w = leak_world(kind, int(s), target_rate=rate, n_conversations=n_conversations)
        pp = PPILeakRate(ALPHA, tolerance).fit(w.passed, w.member, w.labeled, w.score, w.user, categories=w.categories).table
        cl = ClusteredLeakRate(ALPHA, tolerance).fit(w.passed[w.labeled], w.member[w.labeled], w.user[w.labeled], categories=w.categories).table
        prev = w.member.mean(axis=0)
        need = {}
        for basis, vf in (("ppi", pp["variance_factor"].to_numpy()), ("deff", cl["deff"].to_numpy())):
            need[basis] = [label_budget(rate, tolerance, p, variance_factor=v, alpha=ALPHA, power=power) for p, v in zip(prev, vf)]
        for basis in ("ppi", "deff"):
            for j, c in enumerate(w.categories):
                n = need[basis][j]
                share = min(0.95, n / n_conversations) if np.isfinite(n) else 0.95  # PPI needs some unlabeled ones
                w2 = leak_world(kind, int(s) + 500_000 + 1000 * j + (0 if basis == "ppi" else 1), target_rate=rate,
                                n_conversations=n_conversations, label_share=share)
                t = PPILeakRate(ALPHA, tolerance).fit(w2.passed, w2.member[:, [j]], w2.labeled, w2.score[:, [j]], w2.user,
                                                      categories=[c]).table.iloc[0]
                rows.append({"kind": kind, "seed": int(s), "category": c, "basis": basis, "labels_needed": n, "label_share": share,
                             "capped": bool(np.isfinite(n) and n > 0.95 * n_conversations), "variance_factor_ppi": pp["variance_factor"].iloc[j],
                             "deff": cl["deff"].iloc[j], "shown_below": t["verdict"] == "shown below"})
    return pd.DataFrame(rows)


def category_rows(seeds, *, min_users: int = 10) -> pd.DataFrame:
    """Per world and tested category of `category_world`: stage 04's per-category lift, its CI, the truth,
    the standardized error z = (estimate - truth) / SE and whether the CI covers."""
    rows = []
    for s in seeds:
        w = category_world(int(s))
        t = CategoryLift(ALPHA, min_users).fit(SimpleNamespace(category_cells=w.category_cells)).table
        t = t[t["tested"]].copy()
        t["truth"] = t["ad_category"].map(w.truth)
        # standardized error on the interval's own (log) scale
        with np.errstate(divide="ignore"):  # an unbounded interval (a side without clicks once a user is left out): z = 0
            se = (np.log1p(t["rel_ci_high"]) - np.log1p(t["rel_ci_low"])) / (2 * stats.t.ppf(1 - ALPHA / 2, t["df"]))
            t["z"] = (np.log1p(t["rel_lift"]) - np.log1p(t["truth"])) / se
        t["covers"] = (t["rel_ci_low"] <= t["truth"]) & (t["truth"] <= t["rel_ci_high"])
        t["seed"] = int(s)
        rows.append(t[["seed", "ad_category", "users_chat", "users_other", "rel_lift", "rel_ci_low", "rel_ci_high", "truth", "z", "covers"]])
    return pd.concat(rows, ignore_index=True)


def rate(x) -> tuple[float, float, int]:
    """(rate, Monte Carlo SE, n) of a boolean series."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    p = x.mean() if len(x) else np.nan
    return float(p), float(np.sqrt(p * (1 - p) / len(x))) if len(x) else np.nan, len(x)


def summarize_lift(rows: pd.DataFrame) -> pd.DataFrame:
    """Per kind and estimator: false-positive rate in null worlds and coverage in effect worlds."""
    out = []
    est = {"DiD, user-clustered (today)": ("did_user_p", "did_user_covers"),
           "region CUPED (today)": ("region_cuped_p", "region_cuped_covers"),
           "region DiD, CR3 t (new)": ("region_did_p", "region_did_covers"),
           "region RI, studentized (new)": ("region_ri_p", None),
           "A/B CUPED, randomized arms (today)": ("ab_cuped_p", "ab_cuped_covers")}
    for kind, g in rows.groupby("kind", sort=False):
        null, eff = g[~g["effect"]], g[g["effect"]]
        for name, (p, cov) in est.items():
            f = rate(null[p] < ALPHA)
            c = rate(eff[cov]) if cov else (np.nan, np.nan, 0)
            out.append({"kind": kind, "estimator": name, "worlds": f[2], "fpr": f[0], "fpr_mc_se": f[1], "coverage": c[0], "coverage_mc_se": c[1]})
    return pd.DataFrame(out)


def summarize_leak(rows: pd.DataFrame, by_category: bool = True) -> pd.DataFrame:
    """Per kind (and category) and interval: coverage of the truth with its MC SE."""
    keys = ["kind", "category"] if by_category else ["kind"]
    out = []
    for key, g in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for name, col in (("Wilson (today)", "wilson_covers"), ("user-clustered Wilson (new)", "clustered_covers"),
                          ("PPI++ stratified (new)", "ppi_covers"), ("Rogan-Gladen (today)", "rg_covers")):
            c = rate(g[col])
            out.append({**dict(zip(keys, key)), "estimator": name, "n": c[2], "coverage": c[0], "coverage_mc_se": c[1]})
    return pd.DataFrame(out)


def summarize_compliance(rows: pd.DataFrame, by_category: bool = False) -> pd.DataFrame:
    """At the tolerance (rows from target_rate = tolerance): rate of 'shown below' (false assurance)
    and of 'exceeds' (false alarm), per kind and verdict source."""
    keys = ["kind", "category"] if by_category else ["kind"]
    out = []
    for key, g in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for name, col in (("user-clustered Wilson", "clustered_verdict"), ("PPI++ stratified", "ppi_verdict")):
            below, exceeds = rate(g[col] == "shown below"), rate(g[col] == "exceeds")
            out.append({**dict(zip(keys, key)), "estimator": name, "n": below[2], "shown_below": below[0], "shown_below_mc_se": below[1],
                        "exceeds": exceeds[0], "exceeds_mc_se": exceeds[1]})
    return pd.DataFrame(out)
