"""Statistics helpers shared by the estimators: binomial CIs, ratio CIs, multiplicity adjustment.

Thin wrappers over statsmodels / scipy so every stage computes these the same way.
"""

from __future__ import annotations

import gc
import math
from itertools import combinations

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint


def binom_cis(k: np.ndarray, n: np.ndarray, alpha: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Binomial CIs (statsmodels' `proportion_confint` `method`: wilson, beta = Clopper–Pearson,
    jeffreys ...) for arrays of successes and trials; NaN where n is 0."""
    lo, hi = np.full(len(k), np.nan), np.full(len(k), np.nan)
    m = n > 0
    if m.any():
        lo[m], hi[m] = proportion_confint(k[m], n[m], alpha=alpha, method=method)
    return lo, hi


def proportion(k: int, n: int, alpha: float, method: str = "wilson") -> tuple[float, float, float]:
    """(k/n, CI low, CI high); NaNs when n is 0."""
    if n == 0:
        return np.nan, np.nan, np.nan
    lo, hi = proportion_confint(k, n, alpha=alpha, method=method)
    return k / n, float(lo), float(hi)


def p_adjust(p, method: str, alpha: float = 0.05) -> np.ndarray:
    """Multiplicity-adjusted p-values (statsmodels `multipletests`: holm, fdr_bh, ...)."""
    # statsmodels' Holm step calls gc.collect(): a full collection takes ~1 s in a process holding
    # torch and a run's tables. Frozen objects are skipped by it; unfreezing hands them back unchanged.
    gc.freeze()
    try:
        return multipletests(np.asarray(p, dtype=float), alpha=alpha, method=method)[1]
    finally:
        gc.unfreeze()


def ratio_ci(num: float, den: float, var_num: float, var_den: float, cov: float = 0.0, *, df: float | None = None, alpha: float = 0.05) -> dict:
    """CI for num/den from estimates with a joint (co)variance: delta method and Fieller.

    Fieller inverts the t-test of num - r*den = 0, so it stays valid when the denominator is
    uncertain (the delta method assumes the ratio is near-normal). When the denominator is not
    significantly different from zero the Fieller set is unbounded: reported as (-inf, inf).
    """
    q = stats.t.ppf(1 - alpha / 2, df) if df is not None and np.isfinite(df) else stats.norm.ppf(1 - alpha / 2)
    r = num / den if den != 0 else np.nan
    v = var_num / den**2 - 2 * num * cov / den**3 + num**2 * var_den / den**4 if den != 0 else np.nan
    se = math.sqrt(v) if v is not None and v >= 0 else np.nan
    a = den**2 - q**2 * var_den
    b = -2 * (num * den - q**2 * cov)
    c = num**2 - q**2 * var_num
    disc = b * b - 4 * a * c
    if a > 0 and disc >= 0:
        f_lo, f_hi = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    else:
        f_lo, f_hi = -np.inf, np.inf
    return {"ratio": r, "se": se, "delta_ci": (r - q * se, r + q * se), "fieller_ci": (f_lo, f_hi)}


def fmt_ci(ci, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def region_assignments(R: int, k: int, max_exact: int, n_permutations: int, seed: int):
    """Assignments of k of R regions to treatment for randomization inference: all C(R, k) when there
    are at most `max_exact` (exact test), else `n_permutations` seeded draws. Returns (A, exact, C(R, k))."""
    total = math.comb(R, k)
    if total <= max_exact:
        A = np.zeros((total, R), dtype=bool)
        for i, comb in enumerate(combinations(range(R), k)):
            A[i, list(comb)] = True
        return A, True, total
    rng = np.random.default_rng(seed)
    A = np.zeros((n_permutations, R), dtype=bool)
    np.put_along_axis(A, np.argsort(rng.random((n_permutations, R)), axis=1)[:, :k], True, axis=1)
    return A, False, total
