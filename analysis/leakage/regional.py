"""Black-box tests at the level of their assignment (issue 14, item 6).

- `region_permutation_test`: the contrast of included-region vs excluded-region users (the `did`
  exposure design, and any user-level outcome whose "treatment" is the region's policy) tested by
  re-assigning the included label over regions, on a statistic studentized with a region-clustered
  SE. Users of one region share the region's ad market, so a user-level permutation treats a
  region-level shock as signal; the region-level one puts it in the null distribution.
- `violation_family`: every test that can flag an excluded region (the per-region exposure tests
  and the excluded-group tests per category) in ONE Holm family, so the probability of flagging
  any region when none is violated is at most alpha (family-wise), stated beside the flags. Chat
  targeting sources in the log are a direct observation, not a test, and flag on their own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.util.stats import p_adjust, region_assignments


def _studentized(A: np.ndarray, s: np.ndarray, s2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Difference of user means (included - excluded) over region-cluster SE, per assignment row.
    s, s2, n: per-region sums of y, sums of y^2 (unused: cluster variance needs only s and n), counts."""
    out = []
    for M in (A.astype(float), 1.0 - A.astype(float)):
        N = M @ n
        mean = (M @ s) / N
        # sum_r (S_r - n_r * mean)^2 over the group's regions
        ss = M @ (s**2) - 2 * mean * (M @ (s * n)) + mean**2 * (M @ (n**2))
        G = M.sum(axis=1)
        out.append((mean, G / np.maximum(G - 1, 1) * ss / N**2))
    (m1, v1), (m0, v0) = out
    return (m1 - m0) / np.sqrt(v1 + v0)


def region_permutation_test(y, region, included, *, n_permutations: int = 4999, max_exact: int = 20_000, seed: int = 0) -> dict:
    """Two-sided studentized region-level permutation test of mean(y | included) = mean(y | excluded).

    `y`: one outcome per user; `region`: the user's region; `included`: the user's group (constant
    within a region). Returns the difference, its region-clustered SE, the p-value, the number of
    regions per group and of assignments (its resolution is 1 / assignments when enumerated)."""
    y = np.asarray(y, float)
    region = np.asarray(region).astype(str)
    included = np.asarray(included, bool)
    if not (len(y) == len(region) == len(included)):
        raise ValueError("y, region and included need one entry per user")
    if np.isnan(y).any():
        raise ValueError(f"y: {int(np.isnan(y).sum())} missing outcome(s)")
    regs, code = np.unique(region, return_inverse=True)
    inc_r = np.zeros(len(regs), bool)
    inc_r[code] = included
    mixed = np.bincount(code, weights=included.astype(float)) % np.bincount(code)
    if (mixed != 0).any():
        raise ValueError(f"regions both included and excluded: {list(regs[mixed != 0])}")
    k = int(inc_r.sum())
    if k < 2 or len(regs) - k < 2:
        raise ValueError(f"a region-level test needs at least two regions per group; have {k} included, {len(regs) - k} excluded")
    s = np.bincount(code, weights=y)
    s2 = np.bincount(code, weights=y * y)
    n = np.bincount(code).astype(float)
    t_obs = float(_studentized(inc_r[None, :], s, s2, n)[0])
    A, exact, total = region_assignments(len(regs), k, max_exact, n_permutations, seed)
    t = _studentized(A, s, s2, n)
    extreme = int(np.sum(np.abs(t) >= abs(t_obs) - 1e-9 * max(1, abs(t_obs))))
    p = extreme / len(A) if exact else (1 + extreme) / (1 + len(A))
    diff = s[inc_r].sum() / n[inc_r].sum() - s[~inc_r].sum() / n[~inc_r].sum()
    return {"effect": float(diff), "t": t_obs, "p_value": float(p), "regions_included": k, "regions_excluded": len(regs) - k,
            "assignments": int(total), "exact": exact, "min_p": 1 / total if exact else 1 / (1 + len(A))}


def violation_family(tests: pd.DataFrame, *, alpha: float = 0.05, chat_impressions: pd.Series | None = None,
                     min_p: float | None = None) -> tuple[pd.DataFrame, str]:
    """One Holm family over every exposure test that can flag an excluded region.

    `tests`: rows with `test` (a name), `region` (the excluded region it concerns, or "ALL excluded")
    and `p_value` (NaN = not tested: left out of the family). `chat_impressions`: per region the
    count of impressions with an ai_chat targeting source (a direct observation: any > 0 flags).
    `min_p`: the smallest p-value a test can give (1 / (B + 1) for B permutations); when Holm over
    the family cannot bring even that below alpha, the statement says no test can flag.
    Returns per-region flags and the statement of the family's false-alarm rate."""
    need = {"test", "region", "p_value"} - set(tests.columns)
    if need:
        raise ValueError(f"violation_family: tests lack column(s) {sorted(need)}")
    t = tests.copy()
    ok = t["p_value"].notna()
    t["p_holm"] = np.nan
    if ok.any():
        t.loc[ok, "p_holm"] = p_adjust(t.loc[ok, "p_value"].astype(float), "holm", alpha)
    t["significant"] = t["p_holm"] < alpha
    chat = chat_impressions if chat_impressions is not None else pd.Series(dtype=float)
    regions = sorted(set(t["region"]) | set(chat.index))
    sig = t[t["significant"]].groupby("region")["test"].agg("; ".join)
    ci = chat.reindex(regions).fillna(0).astype(int).to_numpy()
    out = pd.DataFrame({"region": regions, "chat_impressions": ci,
                        "min_p_holm": t.groupby("region")["p_holm"].min().reindex(regions).to_numpy()})
    tested = sig.reindex(regions).fillna("").to_numpy()
    out["flagged"] = (ci > 0) | (tested != "")
    out["signal"] = ["; ".join(x for x in ("ai_chat targeting source" if c > 0 else "", s_) if x) for c, s_ in zip(ci, tested)]
    m = int(ok.sum())
    statement = (f"{m} exposure tests in one Holm family: the chance of flagging any excluded region by the tests when "
                 f"none is violated is at most {alpha:.0%} (family-wise); ai_chat targeting sources are observed, not tested")
    if min_p is not None and m and min_p * m >= alpha:
        statement += (f". NO TEST CAN FLAG: the smallest attainable p-value {min_p:.4f} times {m} tests is "
                      f"{min_p * m:.3f} >= {alpha}; use at least {int(np.ceil(m / alpha))} permutations")
    return out, statement
