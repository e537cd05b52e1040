"""Adversarial validation worlds at the level of sufficient statistics.

The full simulator (`analysis.simulate`, `analysis.validation.worlds`) writes text and per-impression logs and takes seconds per
world; coverage and false-positive rates need >= 1,000 worlds per kind. These generators draw the
same quantities the estimators consume (per-user clicks and impressions by period; per-conversation
category, filter decision, label and detector score) with the default world's sizes and rates, and
switch on departures from the estimators' assumptions one at a time (issue 14):

lift worlds (`lift_world`):
  benign             regions as in the default world, no shocks, equal baselines
  region_shocks      region x period multiplicative CTR shocks (lognormal, SD 3%)
  regional_baseline  included regions' baseline CTR 25% higher (0.025 vs 0.020) + region scatter, under
                     a common multiplicative season (additive parallel trends fail, multiplicative hold)
  few_regions        4 included + 4 excluded regions, with the shocks

leak worlds (`leak_world`):
  benign             conversations independent, detector errors independent of the filter
  clustered_misses   a user-level effect on the filter's miss probability (logit SD 2) among heavy users who
                     return to one subject (activity lognormal SD 1.6, 90% favourite): a user's
                     conversations pass or fail together
  correlated_detector the detector misses the conversations the filter misses (latent correlation 0.8),
                     and its false positives concentrate among blocked conversations

Truths: the lift truth is the impression-weighted expected relative lift of included-region
post-period impressions (as `ground_truth["lift"]["included_post"]`); the leak truth is the
superpopulation pass probability of a conversation about c (conversation-weighted, integrated over
the user effect), i.e. the rate for this population of users, of which the world's users are a sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import brentq
from scipy.special import expit, logit, ndtr

from analysis.simulate import EXCLUDED_REGIONS, INCLUDED_REGIONS

LIFT_KINDS = ("benign", "region_shocks", "regional_baseline", "few_regions")
LEAK_KINDS = ("benign", "clustered_misses", "correlated_detector")
# default-world filter catch rates (analysis.simulate.WorldConfig.filter_catch)
CATCH = {"health": 0.97, "religion": 0.985, "politics": 0.95, "sexual_orientation": 0.93, "ethnicity": 0.96,
         "philosophical_beliefs": 0.90, "trade_union": 0.88}


# ------------------------------------------------------------------------------------ lift


@dataclass
class LiftWorld:
    """Per-user sufficient statistics of one world and its truth."""

    users: pd.DataFrame  # region, included, arm, imp_pre, clk_pre, imp_post, clk_post
    truth_rel: float
    truth_abs: float
    truth_arm_rel: float  # treatment arm's impressions (the A/B estimand)
    kind: str
    seed: int

    def user_period(self) -> pd.DataFrame:
        """Rows (user, post, impressions, clicks, region, included): the form of LiftData.user_period."""
        u = self.users
        parts = []
        for post, sfx in ((False, "pre"), (True, "post")):
            m = u[f"imp_{sfx}"].to_numpy() > 0
            parts.append(pd.DataFrame({"user": u.index[m], "post": post, "impressions": u[f"imp_{sfx}"].to_numpy()[m],
                                       "clicks": u[f"clk_{sfx}"].to_numpy()[m], "region": u["region"].to_numpy()[m],
                                       "included": u["included"].to_numpy()[m]}))
        return pd.concat(parts, ignore_index=True)


def lift_world(kind: str = "benign", seed: int = 0, *, n_users: int = 6000, impressions_per_user: float = 400.0,
               lift: float = 0.05, base_ctr: float = 0.02, season: float = 1.03, shock_sd: float = 0.03,
               holdout_share: float = 0.10) -> LiftWorld:
    """One lift world. `lift` = relative CTR lift of treatment-arm impressions in included regions after
    the date (0 gives a null world); `season` = common multiplicative post/pre CTR change."""
    if kind not in LIFT_KINDS:
        raise ValueError(f"unknown lift world kind {kind!r}; choose one of {LIFT_KINDS}")
    rng = np.random.default_rng(seed)
    if kind == "few_regions":
        inc_w = dict(list(INCLUDED_REGIONS.items())[:4])
        exc_w = dict(list(EXCLUDED_REGIONS.items())[:4])
    else:
        inc_w, exc_w = INCLUDED_REGIONS, EXCLUDED_REGIONS
    regions = list(inc_w) + list(exc_w)
    region_inc = np.array([True] * len(inc_w) + [False] * len(exc_w))
    excluded = rng.random(n_users) < 0.35
    r_inc = rng.choice(len(inc_w), size=n_users, p=np.array(list(inc_w.values())) / sum(inc_w.values()))
    r_exc = len(inc_w) + rng.choice(len(exc_w), size=n_users, p=np.array(list(exc_w.values())) / sum(exc_w.values()))
    r = np.where(excluded, r_exc, r_inc)
    inc = region_inc[r]
    R = len(regions)
    baseline = np.ones(R)
    if kind == "regional_baseline":
        baseline = np.where(region_inc, 1.25, 1.0) * rng.lognormal(0, 0.10, size=R)
    shock = np.ones((R, 2))
    if kind in ("region_shocks", "few_regions"):
        shock = rng.lognormal(-shock_sd**2 / 2, shock_sd, size=(R, 2))
    activity = rng.lognormal(-0.7**2 / 2, 0.7, size=n_users)
    imp = rng.poisson(impressions_per_user / 2 * activity[:, None], size=(n_users, 2))
    user_ctr = base_ctr * rng.lognormal(-0.5**2 / 2, 0.5, size=n_users)
    arm = np.where(inc, np.where(rng.random(n_users) < holdout_share, "holdout", "treatment"), None)
    p0 = user_ctr[:, None] * baseline[r][:, None] * shock[r] * np.array([1.0, season])[None, :]
    user_lift = lift * rng.lognormal(-0.3**2 / 2, 0.3, size=n_users) * (arm == "treatment")
    p1 = p0.copy()
    p1[:, 1] *= 1 + user_lift
    p1 = np.clip(p1, 0, 1)
    clk = rng.binomial(imp, p1)
    m = inc
    exp1, exp0 = (imp[m, 1] * p1[m, 1]).sum(), (imp[m, 1] * p0[m, 1]).sum()
    n_post = imp[m, 1].sum()
    ta = arm == "treatment"
    arm_rel = (imp[ta, 1] * p1[ta, 1]).sum() / (imp[ta, 1] * p0[ta, 1]).sum() - 1
    users = pd.DataFrame({"region": np.array(regions)[r], "included": inc, "arm": arm, "imp_pre": imp[:, 0], "clk_pre": clk[:, 0],
                          "imp_post": imp[:, 1], "clk_post": clk[:, 1]})
    return LiftWorld(users, float(exp1 / exp0 - 1), float((exp1 - exp0) / n_post), float(arm_rel), kind, seed)


def did_user_clustered(up: pd.DataFrame, alpha: float = 0.05) -> dict:
    """Today's DiD (`DiffInDiff`): WLS of user-period CTR on group x period, impression weights, SEs
    clustered by user (statsmodels CR1: G/(G-1) (N-1)/(N-K), t with G-1 df), computed in closed form
    from the user-period rows (equal to statsmodels' fit; tests/unit/test_lift_regional.py)."""
    g = up["included"].to_numpy(bool)
    t = up["post"].to_numpy(bool)
    c = up["clicks"].to_numpy(float)
    n = up["impressions"].to_numpy(float)
    cell = g.astype(int) * 2 + t.astype(int)
    C = np.bincount(cell, weights=c, minlength=4)
    N = np.bincount(cell, weights=n, minlength=4)
    p = C / N
    did = (p[3] - p[2]) - (p[1] - p[0])
    sign = np.array([1.0, -1.0, -1.0, 1.0])[cell]  # cells: exc pre (+), exc post (-), inc pre (-), inc post (+)
    infl = sign * (c - p[cell] * n) / N[cell]
    users, uidx = np.unique(up["user"].to_numpy(), return_inverse=True)
    s = np.bincount(uidx, weights=infl)
    G, NN = len(users), len(up)
    var = G / (G - 1) * (NN - 1) / (NN - 4) * (s @ s)
    se = np.sqrt(var)
    q = stats.t.ppf(1 - alpha / 2, G - 1)
    return {"abs_lift": did, "se": se, "ci": (did - q * se, did + q * se), "p_value": float(2 * stats.t.sf(abs(did / se), G - 1)),
            "counterfactual_ctr": p[3] - did}


# ------------------------------------------------------------------------------ weekly (event study)

WEEKLY_KINDS = LIFT_KINDS + ("region_trend",)


@dataclass
class WeeklyWorld:
    """Per-user weekly counts of one world (for the event study and its pre-trend test)."""

    impressions: np.ndarray  # (users, weeks)
    clicks: np.ndarray  # (users, weeks)
    weeks: np.ndarray  # week numbers (negative = before the policy date)
    region: np.ndarray  # region code per user
    regions: np.ndarray  # region names
    region_included: np.ndarray  # per region
    kind: str
    seed: int

    @property
    def users(self) -> pd.DataFrame:
        """index = user code: region, included (the form of LiftData.users)."""
        return pd.DataFrame({"region": self.regions[self.region], "included": self.region_included[self.region]})

    @property
    def user_week(self) -> pd.DataFrame:
        """Rows (user, week, impressions, clicks) with impressions > 0 (the form of LiftData.user_week)."""
        u, wk = np.nonzero(self.impressions)
        return pd.DataFrame({"user": u, "week": self.weeks[wk], "impressions": self.impressions[u, wk], "clicks": self.clicks[u, wk]})

    def cells(self):
        """(regions, included, weeks, clicks (R, W), impressions (R, W)): the region x week sums, as
        `region_week_cells(self.user_week, self.users)` gives them (the pre-trend benchmark's thousands of
        worlds skip the user-week frame)."""
        R = len(self.regions)
        C = np.stack([np.bincount(self.region, weights=self.clicks[:, j], minlength=R) for j in range(len(self.weeks))], axis=1)
        N = np.stack([np.bincount(self.region, weights=self.impressions[:, j], minlength=R) for j in range(len(self.weeks))], axis=1)
        o = np.argsort(self.regions)  # region_week_cells sorts by region name
        return self.regions[o].astype(str), self.region_included[o], self.weeks.astype(int), C[o], N[o]


def weekly_world(kind: str = "benign", seed: int = 0, *, n_users: int = 6000, impressions_per_user: float = 400.0,
                 weeks_pre: int = 15, weeks_post: int = 15, lift: float = 0.0, base_ctr: float = 0.02, shock_sd: float = 0.03,
                 trend: float = 0.005) -> WeeklyWorld:
    """One world by week (weeks -weeks_pre .. weeks_post - 1), with a common multiplicative season. Kinds as
    `lift_world` (shocks are region x week, lognormal SD `shock_sd`), plus `region_trend`: included
    regions' CTR drifts by `trend` per week relative to excluded ones (parallel trends fail)."""
    if kind not in WEEKLY_KINDS:
        raise ValueError(f"unknown weekly world kind {kind!r}; choose one of {WEEKLY_KINDS}")
    rng = np.random.default_rng(seed)
    inc_w, exc_w = (dict(list(INCLUDED_REGIONS.items())[:4]), dict(list(EXCLUDED_REGIONS.items())[:4])) if kind == "few_regions" \
        else (INCLUDED_REGIONS, EXCLUDED_REGIONS)
    regions = list(inc_w) + list(exc_w)
    region_inc = np.array([True] * len(inc_w) + [False] * len(exc_w))
    excluded = rng.random(n_users) < 0.35
    r = np.where(excluded, len(inc_w) + rng.choice(len(exc_w), size=n_users, p=np.array(list(exc_w.values())) / sum(exc_w.values())),
                 rng.choice(len(inc_w), size=n_users, p=np.array(list(inc_w.values())) / sum(inc_w.values())))
    R, weeks = len(regions), np.arange(-weeks_pre, weeks_post)
    W = len(weeks)
    baseline = np.where(region_inc, 1.25, 1.0) * rng.lognormal(0, 0.10, size=R) if kind == "regional_baseline" else np.ones(R)
    shock = rng.lognormal(-shock_sd**2 / 2, shock_sd, size=(R, W)) if kind in ("region_shocks", "few_regions") else np.ones((R, W))
    drift = np.exp(np.outer(region_inc * trend, weeks)) if kind == "region_trend" else np.ones((R, W))
    season = 1 + 0.06 * np.sin(2 * np.pi * (weeks + 15) / 52)
    activity = rng.lognormal(-0.7**2 / 2, 0.7, size=n_users)
    imp = rng.poisson(impressions_per_user / W * activity[:, None], size=(n_users, W))
    user_ctr = base_ctr * rng.lognormal(-0.5**2 / 2, 0.5, size=n_users)
    p = user_ctr[:, None] * (baseline[:, None] * shock * drift)[r] * season[None, :]
    p = np.clip(p * np.where(region_inc[r][:, None] & (weeks >= 0)[None, :], 1 + lift, 1.0), 0, 1)
    clk = rng.binomial(imp, p)
    return WeeklyWorld(imp, clk, weeks, r, np.array(regions), region_inc, kind, seed)


# ------------------------------------------------------------------------ per-category lift


@dataclass
class CategoryWorld:
    """Included-region, post-period user x category x (chat-targeted or not) cells, the form of
    `LiftData.category_cells`, and each category's true relative lift of chat-targeted impressions."""

    category_cells: pd.DataFrame  # user, ad_category, chat, impressions, clicks
    truth: dict
    seed: int


def category_world(seed: int = 0, *, n_users: int = 3900, n_categories: int = 32, other_impressions: float = 1.5,
                   chat_impressions: float = 23.0, lift: float = 0.40, lift_sd: float = 0.3, base_ctr: float = 0.02,
                   params_seed: int = 0) -> CategoryWorld:
    """Per-category cells with the default world's sizes (~3,900 included users; per category ~2,500
    users with other impressions of it, 12-190 with chat-targeted ones) and its mechanics: lognormal ad
    activity (SD 0.7) and user CTR (SD 0.5), a per-category CTR multiplier (SD 0.3), chat-targeted
    impressions' CTR x (1 + the category's lift) (lognormal SD 0.3 around 0.40). The categories (lift,
    multiplier, share of users who chat about it: 0.3%-5%) are fixed by `params_seed`, so coverage can
    be read per category over worlds; `seed` draws the users and their clicks."""
    prm = np.random.default_rng(params_seed)
    cat_mult = prm.lognormal(-0.3**2 / 2, 0.3, size=n_categories)
    lifts = lift * prm.lognormal(-lift_sd**2 / 2, lift_sd, size=n_categories)
    chat_users = np.geomspace(0.003, 0.05, n_categories)
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(-0.7**2 / 2, 0.7, size=n_users)
    user_ctr = base_ctr * rng.lognormal(-0.5**2 / 2, 0.5, size=n_users)
    parts = []
    for k in range(n_categories):
        n_o = rng.poisson(other_impressions * activity)
        n_c = np.where(rng.random(n_users) < chat_users[k], rng.poisson(chat_impressions * activity), 0)
        p = np.clip(user_ctr * cat_mult[k], 0, 1)
        for chat, n, pp in ((False, n_o, p), (True, n_c, np.clip(p * (1 + lifts[k]), 0, 1))):
            m = n > 0
            parts.append(pd.DataFrame({"user": np.flatnonzero(m), "ad_category": f"k{k:02d}", "chat": chat,
                                       "impressions": n[m], "clicks": rng.binomial(n[m], pp[m])}))
    return CategoryWorld(pd.concat(parts, ignore_index=True), {f"k{k:02d}": float(lifts[k]) for k in range(n_categories)}, seed)


# ------------------------------------------------------------------------------------ leak


@dataclass
class LeakWorld:
    """Per-conversation arrays of one world (every conversation, so detector-based estimators see the
    passed and blocked strata as they are) and the per-category truths."""

    user: np.ndarray  # (N,) user index
    member: np.ndarray  # (N, C) bool: conversation is about category c
    passed: np.ndarray  # (N,) bool
    labeled: np.ndarray  # (N,) bool
    score: np.ndarray  # (N, C) detector score in [0, 1]; flag = score >= 0.5
    truth: dict  # category -> superpopulation leak rate
    categories: tuple
    kind: str
    seed: int


def leak_world(kind: str = "benign", seed: int = 0, *, n_users: int = 6000, n_conversations: int = 24000,
               p_category: float = 0.032, label_share: float = 0.25, catch: dict | None = None, user_sd: float = 2.0,
               rho: float = 0.8, sensitivity: float = 0.9, specificity: float = 0.995, p_pass_other: float = 0.78,
               target_rate: float | None = None) -> LeakWorld:
    """One leak world with every default-world category. A user's conversations concentrate on a few
    subjects (each user has one favourite category, 60% of their category conversations), as in the
    simulator; `kind` switches on user-clustered filter misses or a detector correlated with the filter."""
    if kind not in LEAK_KINDS:
        raise ValueError(f"unknown leak world kind {kind!r}; choose one of {LEAK_KINDS}")
    catch = dict(catch or CATCH)
    cats = tuple(catch)
    clustered = kind == "clustered_misses"
    if target_rate is not None:  # every category's true leak rate set to target_rate (e.g. the tolerance)
        base = _base_logit(target_rate, user_sd if clustered else 0.0)
        catch = {c: 1 - float(expit(base)) for c in cats}
    C = len(cats)
    rng = np.random.default_rng(seed)
    # clustered: heavy users who return to their favourite subject again and again
    activity = rng.lognormal(0, 1.6 if clustered else 0.8, size=n_users)
    user = rng.choice(n_users, size=n_conversations, p=activity / activity.sum())
    fav = rng.integers(0, C, size=n_users)
    # category of each conversation: with prob C * p_category it is about a category (60% the user's favourite)
    about = rng.random(n_conversations) < C * p_category
    cat = np.where(rng.random(n_conversations) < (0.9 if clustered else 0.6), fav[user], rng.integers(0, C, size=n_conversations))
    member = np.zeros((n_conversations, C), dtype=bool)
    member[np.flatnonzero(about), cat[about]] = True
    miss = np.array([1 - catch[c] for c in cats])
    u_eff = rng.normal(size=n_users) * (user_sd if clustered else 0.0)
    # filter latent for category conversations: pass iff z_f < logit(miss) + user effect (logistic noise)
    eta = logit(miss)[cat] + u_eff[user]
    z_f = rng.logistic(size=n_conversations)
    passed_cat = z_f < eta
    passed_other = rng.random(n_conversations) < p_pass_other
    passed = np.where(about, passed_cat, passed_other)
    # truth: superpopulation pass probability of a conversation about c (activity-weighted users, both
    # favourite and other draws have the same user-effect distribution, independent of category)
    truth = {c: _mean_rate(logit(miss[j]), user_sd if clustered else 0.0) for j, c in enumerate(cats)}
    # detector scores: probit latent, flag iff latent > 0 (P(flag | c) = Se, P(flag | not c) = 1 - Sp)
    noise = rng.normal(size=(n_conversations, C))
    if kind == "correlated_detector":
        # the detector shares the filter's difficulty: for conversations about c, its latent moves with the
        # filter's (standardized) latent; for others, false positives concentrate among blocked conversations
        zf_std = (z_f - eta) / (np.pi / np.sqrt(3))  # > 0 means 'easy to catch' relative to the category's mean
        shared = np.where(about, zf_std, np.where(passed_other, -1.0, 1.0) * np.abs(rng.normal(size=n_conversations)))
        noise = rho * shared[:, None] + np.sqrt(1 - rho**2) * noise
    mu = np.where(member, stats.norm.ppf(sensitivity), stats.norm.ppf(1 - specificity))
    score = ndtr(mu + noise)  # standard normal CDF (scipy.special: no distribution-object overhead)
    labeled = rng.random(n_conversations) < label_share
    return LeakWorld(user, member, passed, labeled, score, truth, cats, kind, seed)


_GAUSS_HERMITE = np.polynomial.hermite_e.hermegauss(80)


def _mean_rate(base_logit: float, sd: float) -> float:
    """E[expit(base + sd Z)], Z standard normal (Gauss-Hermite)."""
    if sd == 0:
        return float(expit(base_logit))
    x, w = _GAUSS_HERMITE
    return float((expit(base_logit + sd * x) * w).sum() / w.sum())


def _base_logit(rate: float, sd: float) -> float:
    return float(brentq(lambda b: _mean_rate(b, sd) - rate, -30, 10))
