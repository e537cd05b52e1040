"""Leak-rate inference that holds when conversations are not independent and the detector is not
independent of the filter (issue 14).

- `ClusteredLeakRate`: the share of conversations about c that passed the filter, with a
  user-clustered interval beside Wilson. A user's conversations share subjects and phrasing, so a
  filter's misses cluster by user; the clustered interval is Wilson on the Korn-Graubard effective
  sample size n_eff = p(1-p) / V_cluster (design effect floored at 1, df-adjusted with t_{G-1}),
  V_cluster the cluster-robust (linearized ratio) variance with users as clusters.
- `PPILeakRate`: prediction-powered inference (PPI++, power-tuned; Angelopoulos, Duchi & Zrnic 2023,
  `ppi_py`) from the detector's scores on every conversation plus a random labeled sample, run
  separately in the passed and blocked strata of the filter. Within a stratum the labeled
  conversations are a random sample, so the estimate of P(c | stratum) is unbiased whatever the
  detector does there; a detector that fails where the filter fails costs width, not validity. The
  leak rate A / (A + B) (A, B: conversations about c in the passed / blocked stratum) gets a
  Fieller-type interval whose passed-stratum variance is evaluated under each hypothesized rate
  (a score interval, as Wilson's), because A rests on a handful of labeled leaks; variances are
  user-clustered.
- `compliance`: the one-sided upper bound against the tolerance -> "shown below", "not shown to
  exceed" (inconclusive) or "exceeds" (one-sided lower bound above it).
- `label_budget`: labeled conversations per category needed to show a rate below the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

VERDICTS = ("shown below", "not shown to exceed", "exceeds")


def _cluster_sums(values: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Column sums of `values` (n,) or (n, k) within clusters (integer codes)."""
    values = np.asarray(values, float)
    if values.ndim == 1:
        return np.bincount(cluster, weights=values)
    return np.stack([np.bincount(cluster, weights=values[:, j]) for j in range(values.shape[1])], axis=1)


def clustered_proportion(y: np.ndarray, cluster: np.ndarray, alpha: float = 0.05) -> dict:
    """Proportion of successes among units grouped in clusters, with Wilson (independent units) and a
    cluster-robust Wilson interval (Korn & Graubard 1998 effective sample size). Also the one-sided
    upper and lower bounds at level 1 - alpha of the clustered interval (for compliance)."""
    y = np.asarray(y, bool)
    n = len(y)
    if n == 0:
        return {"n": 0, "k": 0, "clusters": 0, "rate": np.nan, "wilson_low": np.nan, "wilson_high": np.nan,
                "ci_low": np.nan, "ci_high": np.nan, "upper_1s": np.nan, "lower_1s": np.nan, "deff": np.nan, "n_eff": np.nan}
    _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    G = int(codes.max()) + 1
    k = int(y.sum())
    p = k / n
    wl, wh = proportion_confint(k, n, alpha=alpha, method="wilson")
    resid = _cluster_sums(y - p, codes)
    v = G / (G - 1) * (resid @ resid) / n**2 if G > 1 else np.nan
    deff = v / (p * (1 - p) / n) if 0 < p < 1 and np.isfinite(v) else 1.0
    deff = max(deff, 1.0)
    z = stats.norm.ppf(1 - alpha / 2)
    t = stats.t.ppf(1 - alpha / 2, max(G - 1, 1))
    n_eff = n / deff * (z / t) ** 2
    lo, hi = proportion_confint(p * n_eff, n_eff, alpha=alpha, method="wilson")
    z1, t1 = stats.norm.ppf(1 - alpha), stats.t.ppf(1 - alpha, max(G - 1, 1))
    n1 = n / deff * (z1 / t1) ** 2
    lo1, hi1 = proportion_confint(p * n1, n1, alpha=2 * alpha, method="wilson")
    return {"n": n, "k": k, "clusters": G, "rate": p, "wilson_low": float(wl), "wilson_high": float(wh),
            "ci_low": float(lo), "ci_high": float(hi), "upper_1s": float(hi1), "lower_1s": float(lo1), "deff": float(deff), "n_eff": float(n_eff)}


def compliance(upper: float, lower: float, tolerance: float) -> str:
    """Verdict from one-sided bounds at level 1 - alpha: below / inconclusive / above the tolerance."""
    if not np.isfinite(upper):
        return "not shown to exceed"
    if upper < tolerance:
        return "shown below"
    if np.isfinite(lower) and lower > tolerance:
        return "exceeds"
    return "not shown to exceed"


def _check_inputs(passed, member, cluster, n_name="conversations"):
    passed = np.asarray(passed)
    if passed.dtype != bool:
        if pd.isna(passed).any():
            raise ValueError(f"passed: missing filter decisions in {int(pd.isna(passed).sum())} {n_name}")
        passed = passed.astype(bool)
    member = np.asarray(member)
    cluster = np.asarray(cluster)
    if member.ndim != 2 or len(member) != len(passed) or len(cluster) != len(passed):
        raise ValueError(f"passed ({len(passed)}), member ({member.shape}) and cluster ({len(cluster)}) must have one row per {n_name[:-1]}")
    return passed, member, cluster


@dataclass
class LeakInferenceResult:
    """Per-category leak rates with their intervals, cluster counts, verdicts and caveats."""

    table: pd.DataFrame
    method: str
    alpha: float
    tolerance: float
    caveat: str

    def summary(self) -> pd.DataFrame:
        cols = [c for c in ("category", "n", "passed", "n_labeled", "clusters", "rate", "ci_low", "ci_high", "upper_1s",
                            "verdict", "wilson_low", "wilson_high", "truth", "covers_truth") if c in self.table]
        return self.table[cols]

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def to_markdown(self) -> str:
        return f"{self.method} (caveat: {self.caveat})\n\n" + self.summary().to_markdown(index=False, floatfmt=".4g")


def _attach_truth(t: pd.DataFrame, truth: dict | None) -> None:
    if truth:
        t["truth"] = [truth.get(c, np.nan) for c in t["category"]]
        t["covers_truth"] = (t["ci_low"] <= t["truth"]) & (t["truth"] <= t["ci_high"])


class ClusteredLeakRate:
    """Leak rate per category on conversations whose categories are known (a labeled sample), with
    Wilson beside a user-clustered Wilson; the clustered interval is the one to use."""

    method = "labeled sample, user-clustered Wilson (Korn-Graubard)"

    def __init__(self, alpha: float = 0.05, tolerance: float = 0.01):
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
        self.alpha, self.tolerance = alpha, tolerance

    def fit(self, passed, member, cluster, *, categories=None, truth: dict | None = None) -> LeakInferenceResult:
        passed, member, cluster = _check_inputs(passed, member, cluster)
        categories = list(categories) if categories is not None else [f"c{j}" for j in range(member.shape[1])]
        rows = []
        for j, c in enumerate(categories):
            m = member[:, j].astype(bool)
            r = clustered_proportion(passed[m], cluster[m], self.alpha)
            r["passed"] = r.pop("k")
            r["verdict"] = compliance(r["upper_1s"], r["lower_1s"], self.tolerance)
            rows.append({"category": c, **r})
        t = pd.DataFrame(rows)
        _attach_truth(t, truth)
        return LeakInferenceResult(t, self.method, self.alpha, self.tolerance,
                                   "valid for a random labeled sample of conversations, users as independent clusters")


class PPILeakRate:
    """Prediction-powered leak rate per category, stratified by the filter's decision.

    `fit(passed, labels, labeled, score, cluster)`: per conversation the filter decision, the true
    category memberships (used only where `labeled`), whether it is in the labeled random sample,
    the detector's score per category, and the user (cluster). Every conversation is used: the
    labeled ones as gold standard, the others through the detector's score.
    """

    method = "PPI++ (power-tuned, ppi_py), stratified by filter decision, user-clustered score interval"

    def __init__(self, alpha: float = 0.05, tolerance: float = 0.01, grid: int = 6001):
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
        self.alpha, self.tolerance = alpha, tolerance
        # hypothesized leak rates: dense near 0, where the rates and the tolerance live
        self.L0 = np.unique(np.concatenate([np.linspace(0, 0.25, grid), np.linspace(0.25, 1, grid // 4)]))

    def fit(self, passed, labels, labeled, score, cluster, *, categories=None, truth: dict | None = None) -> LeakInferenceResult:
        passed, labels, cluster = _check_inputs(passed, labels, cluster)
        labeled = np.asarray(labeled, bool)
        score = np.asarray(score, float)
        if score.shape != labels.shape or len(labeled) != len(passed):
            raise ValueError(f"score {score.shape} must match labels {labels.shape}; labeled must have one entry per conversation")
        if np.isnan(score).any() or (score < 0).any() or (score > 1).any():
            raise ValueError("score: detector scores must lie in [0, 1] without missing values")
        categories = list(categories) if categories is not None else [f"c{j}" for j in range(labels.shape[1])]
        _, codes = np.unique(cluster, return_inverse=True)
        G = int(codes.max()) + 1
        rows = []
        for j, c in enumerate(categories):
            rows.append({"category": c, **self._one(passed, labels[:, j].astype(bool), labeled, score[:, j], codes, G)})
        t = pd.DataFrame(rows)
        t["verdict"] = [compliance(u, lo, self.tolerance) for u, lo in zip(t["upper_1s"], t["lower_1s"])]
        _attach_truth(t, truth)
        return LeakInferenceResult(t, self.method, self.alpha, self.tolerance,
                                   "valid for a random labeled sample within each filter stratum; the detector sets the width, not the validity")

    def _one(self, passed, y, labeled, f, codes, G) -> dict:
        import ppi_py  # heavy: imports numba

        infl = np.zeros((len(y), 2))
        est, lam_used, n_lab = {}, {}, {}
        for s, (name, m) in enumerate((("P", passed), ("B", ~passed))):
            lab, unl = m & labeled, m & ~labeled
            Y, Fh, Fu = y[lab].astype(float), f[lab], f[unl]
            n, N = len(Y), len(Fu)
            n_lab[name] = n
            if n < 2 or N < 1:
                raise ValueError(f"PPI needs labeled and unlabeled conversations in the {'passed' if s == 0 else 'blocked'} stratum; have {n} and {N}")
            # PPI++ power tuning for a mean: lambda = Cov(Y, f) / ((1 + n/N) Var(f)), clipped to [0, 1]
            vf = np.var(np.concatenate([Fh, Fu]), ddof=1)
            lam = float(np.clip(np.cov(Y, Fh)[0, 1] / ((1 + n / N) * vf), 0, 1)) if vf > 0 else 0.0
            mu = float(np.asarray(ppi_py.ppi_mean_pointestimate(Y, Fh, Fu, lam=lam)).ravel()[0])
            tot = int(m.sum())
            rect = Y - lam * Fh
            infl[lab, s] = tot * (rect - rect.mean()) / n
            infl[unl, s] = tot * lam * (Fu - Fu.mean()) / N
            est[name], lam_used[name] = tot * mu, lam
        S = _cluster_sums(infl, codes)
        V = G / (G - 1) * (S.T @ S)
        A, B = est["P"], est["B"]
        nP = int(passed.sum())
        # effective labeled size of the passed-stratum mean (design effect and PPI gain included)
        muP = A / nP
        vA = V[0, 0]
        neff = muP * (1 - muP) * nP**2 / vA if 0 < muP < 1 and vA > 0 else float(n_lab["P"])
        L0 = self.L0
        with np.errstate(divide="ignore", invalid="ignore"):
            muP0 = np.clip(L0 * max(B, 0) / ((1 - L0) * nP), 0, 1)
            vA0 = np.where(L0 < 1, np.maximum(nP**2 * muP0 * (1 - muP0) / neff, 0), 0.0)  # at L0 = 1 its weight (1 - L0)^2 is 0
        D = A * (1 - L0) - L0 * B
        VD = (1 - L0) ** 2 * vA0 + L0**2 * V[1, 1] - 2 * L0 * (1 - L0) * V[0, 1]
        df = max(G - 1, 1)

        def region(q):
            ok = D**2 <= q**2 * VD
            return (float(L0[ok].min()), float(L0[ok].max())) if ok.any() else (np.nan, np.nan)

        lo, hi = region(stats.t.ppf(1 - self.alpha / 2, df))
        lo1, hi1 = region(stats.t.ppf(1 - self.alpha, df))
        rate = A / (A + B) if A + B > 0 else np.nan
        rate = float(np.clip(rate, 0, 1)) if np.isfinite(rate) else np.nan
        # one-sided bounds: the upper end of the 1 - 2 alpha two-sided set (lower end for the lower bound)
        return {"n": int(y[labeled].sum()), "n_labeled": int(labeled.sum()), "clusters": G, "rate": rate, "ci_low": lo, "ci_high": hi,
                "upper_1s": hi1, "lower_1s": lo1 if lo1 > 0 else 0.0, "lambda_passed": lam_used["P"], "lambda_blocked": lam_used["B"],
                "labeled_leaks": int((y & labeled & passed).sum()), "n_eff_passed": neff,
                # variance relative to the labeled-only binomial one (PPI gain x user clustering): the label budget's factor
                "variance_factor": n_lab["P"] / neff if neff > 0 else np.nan}


def label_budget(rate: float, tolerance: float, prevalence: float, *, variance_factor: float = 1.0, alpha: float = 0.05,
                 power: float = 0.8) -> float:
    """Labeled conversations (all categories together, drawn at random) needed so that the one-sided
    upper bound of a category's leak rate falls below `tolerance` with probability `power`, if the
    true rate is `rate`. `prevalence` = share of conversations about the category; `variance_factor`
    = the estimator's variance relative to the labeled-only binomial one (1 - R^2 of the detector for
    PPI, times the design effect of user clustering). Infinite when rate >= tolerance."""
    if not 0 < prevalence <= 1:
        raise ValueError(f"prevalence must lie in (0, 1], got {prevalence}")
    if rate >= tolerance:
        return math.inf
    # the verdict is a score-type bound (variance at the hypothesized rate): the one-sample score test's size,
    # n = [z_a sqrt(tol (1 - tol)) + z_b sqrt(L (1 - L))]^2 / (tol - L)^2. The Wald form L (1 - L) (z_a + z_b)^2 /
    # (tol - L)^2 it replaced delivered a power of 0.47-0.51 instead of 0.80 (bench/validation_worlds.py --only budget)
    za, zb = stats.norm.ppf(1 - alpha), stats.norm.ppf(power)
    n_cat = variance_factor * (za * math.sqrt(tolerance * (1 - tolerance)) + zb * math.sqrt(rate * (1 - rate))) ** 2 / (tolerance - rate) ** 2
    # floor: with no leak at all, a one-sided Wilson bound z^2 / (n + z^2) still needs n > z^2 (1 - tol) / tol
    n_cat = max(n_cat, variance_factor * za**2 * (1 - tolerance) / tolerance)
    return math.ceil(n_cat / prevalence)
