"""Black-box exposure tests: do ads in a category's nodes rise after a conversation about it? And violations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.leakage.data import SHIFT, ExposureData
from analysis.leakage.regional import region_permutation_test, violation_family
from analysis.util.privacy import suppress_small_cells
from analysis.util.stats import p_adjust


@dataclass
class ExposureResult:
    """One row per category x design x region group: effect (change in ad share, percentage-point
    scale as a fraction), its CI, permutation / Welch / GLM p-values (one-sided: exposure rises)."""
    table: pd.DataFrame
    alpha: float
    window_days: float
    min_cell: int = 10
    n_permutations: int | None = None  # most draws per test B: the smallest attainable permutation p-value is 1 / (B + 1)
    checks: pd.DataFrame | None = None  # placebo / negative-control checks of the design (analysis.leakage.checks)
    caveat: str = ""  # what the checks say about the detections

    def summary(self) -> pd.DataFrame:

        cols = ["category", "kind", "window", "design", "region_group", "n_treated", "n_control", "effect", "ci_low", "ci_high",
                "p_permutation", "p_glm", "glm_odds_ratio", "p_bh", "detected"]
        t = self.table[[c for c in cols if c in self.table]].copy()
        return suppress_small_cells(t, ["n_treated", "n_control"], k=self.min_cell, complementary=False)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, ax=None, design: str = "matched", group: str = "included"):
        """Effects with CIs, sensitive categories beside the positive controls."""
        import matplotlib.pyplot as plt

        t = self.table[(self.table["design"] == design) & (self.table["region_group"] == group)
                       & (self.table.get("window", "policy") == "policy")].dropna(subset=["effect"])
        t = t.sort_values(["kind", "category"], ascending=[False, True]).reset_index(drop=True)
        if ax is None:
            _, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(t), 3) + 1))
        y = np.arange(len(t))[::-1]
        for kind, col, name in (("sensitive", "tab:red", "Art. 9 category"), ("control", "tab:green", "positive control"),
                                ("negative_control", "tab:gray", "negative control (far ad node)")):
            m = (t["kind"] == kind).to_numpy()
            if m.any():
                e = t[m]
                ax.errorbar(e["effect"] * 100, y[m], xerr=[(e["effect"] - e["ci_low"]) * 100, (e["ci_high"] - e["effect"]) * 100],
                            fmt="o", color=col, elinewidth=2, capsize=3, label=name)
        if not len(t):
            ax.text(0.5, 0.5, f"too few users for a test (< {self.min_cell})", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(frameon=False, fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        tag = {"control": "control", "negative_control": "negative control"}
        ax.set_yticks(y, [f"{c} ({tag.get(k, 'Art. 9')})" for c, k in zip(t["category"], t["kind"])])
        ax.set_xlabel(f"change in share of the category's ads after vs before, treated minus {'matched' if design == 'matched' else 'excluded-region'} (pp)")
        ax.set_title(f"Black-box exposure ({design}, {group} regions), {self.window_days:g}-day windows, 95% CI")
        ax.figure.tight_layout()
        return ax


class ExposureTest:
    """After a conversation about c (after the policy date), does the user's share of ads in c's nodes rise?

    For each treated user (first conversation about c at or after the policy date, time t0) the
    outcome is D = share of c-node ads in [t0, t0 + w) minus the share in [t0 - w, t0). Controls are
    users with no conversation about c from (policy - w) on, in the same region group, each given a
    pseudo t0 drawn from the treated users' t0 in that group (same period). Designs:
    - `matched` (per region group): treated vs controls;
    - `did`: included-region treated vs excluded-region treated (the excluded regions are the
      policy's own control group). Region decides treatment here, so its `p_permutation` re-assigns
      the included label over regions (studentized, region-clustered; `p_permutation_users` keeps the
      user-level one for reference): a region-level shock is then part of the null.

    Tests are one-sided (exposure rises): a permutation test shuffling the user labels (Welch t
    statistic, valid with unequal group sizes and variances; sequential, at most `n_permutations`
    draws, see `_perm_welch`) and a binomial GLM on (user, window)
    counts with treated x after, cluster-robust by user. `effect` is the difference in mean D with
    a Welch CI. Ads in a node shared by several categories (Z7rJBM) count as exposure for each of
    them; with `exclusive_nodes` only the nodes a category does not share are used.

    A comparison with fewer than `min_users` users on either side is not tested: with ~10 treated
    users the Welch statistic's heavy tails push the false-positive rate to 0.08-0.12 (simulation).
    """

    def __init__(self, window_days: float = 30.0, n_permutations: int = 9999, alpha: float = 0.05, min_users: int = 20,
                 seed: int = 0, glm: bool = True, exclusive_nodes: bool = False):
        self.window_days, self.n_permutations, self.alpha = window_days, n_permutations, alpha
        self.min_users, self.seed, self.glm, self.exclusive_nodes = min_users, seed, glm, exclusive_nodes

    def fit(self, data: ExposureData, conversations: pd.DataFrame, member: pd.DataFrame, ad_nodes: dict[str, list[str]],
            kinds: dict[str, str] | None = None, *, groups: np.ndarray | None = None, did: bool = True,
            placebo: bool = False) -> ExposureResult:
        """`conversations`: conversation_id, user_id, started_at; `member`: conversation x category booleans
        (index conversation_id); `ad_nodes`: category -> IAB ids; `kinds`: category -> sensitive/control/
        negative_control. `groups` (a label per user code, None = left out) replaces the included/excluded
        split, e.g. to test each excluded region on its own (then without the `did` design).

        `placebo`: the same test before the policy date, where no chat -> ad flow exists by construction:
        treated users' first conversation about c falls in [first impression + w, policy - w), so both of
        their windows end before the policy date; controls have no conversation about c from w before
        that window to w after it. Rows carry `window` = "policy" or "placebo"."""
        w = int(self.window_days * 86400)
        if placebo:
            lo, hi = data.start_s + w, data.policy_s - w
            if hi - lo < 7 * 86400:
                raise ValueError(f"placebo window too short: the log starts {(data.policy_s - data.start_s) / 86400:.0f} days before "
                                 f"the policy date; a pre-policy placebo with {self.window_days:g}-day windows needs at least "
                                 f"{2 * self.window_days + 7:g}")
            excl_lo, excl_hi = lo - w, hi + w
        else:
            lo, hi = data.policy_s, np.iinfo(np.int64).max
            excl_lo, excl_hi = lo - w, hi
        rng = np.random.default_rng(self.seed + (1 if placebo else 0))
        # permutations draw from their own stream: a sequential test takes a data-dependent number of
        # draws, which must not move the controls' pseudo dates of the categories after it
        prng = np.random.default_rng([self.seed, 1 if placebo else 0, 1])
        if groups is None:
            labels, glist = np.where(data.included, "included", "excluded").astype(object), ["included", "excluded"]
        else:
            labels = np.asarray(groups, dtype=object)
            glist = sorted({g for g in labels if isinstance(g, str)})
        conv = conversations.set_index(conversations["conversation_id"].astype(str))
        conv = conv.loc[conv.index.intersection(member.index)]
        ucode = data.user_ids.get_indexer(conv["user_id"].astype(str))
        ok = ucode >= 0
        conv, ucode = conv[ok], ucode[ok]
        t_conv = data.seconds(conv["started_at"])
        M = member.reindex(conv.index).fillna(False).to_numpy(dtype=bool)
        shared = pd.Series([n for nodes in ad_nodes.values() for n in set(nodes)]).value_counts()
        has_imp = np.bincount((data.key >> SHIFT).astype(np.int64), minlength=len(data.user_ids)) > 0
        rows = []
        for j, c in enumerate(member.columns):
            if c not in ad_nodes:
                continue
            nodes = [n for n in ad_nodes[c] if not (self.exclusive_nodes and shared.get(n, 0) > 1)]
            cs = data.cumulative(np.asarray(data.nodes.isin(nodes)))
            m = M[:, j]
            post = m & (t_conv >= lo) & (t_conv < hi)
            # treated: first conversation about c at or after the (placebo) date
            tu, tt = ucode[post], t_conv[post]
            o = np.lexsort((tt, tu))
            tu, tt = tu[o], tt[o]
            first = np.r_[True, tu[1:] != tu[:-1]] if len(tu) else np.zeros(0, dtype=bool)
            tu, tt = tu[first], tt[first]
            recent = np.zeros(len(data.user_ids), dtype=bool)
            recent[ucode[m & (t_conv >= excl_lo) & (t_conv < excl_hi)]] = True
            never = np.flatnonzero(~recent & has_imp)
            per_group = {}
            for g in glist:
                tg = labels[tu] == g
                cu = never[labels[never] == g]
                if tg.sum() == 0 or len(cu) == 0:
                    per_group[g] = None
                    continue
                ct = rng.choice(tt[tg], size=len(cu), replace=True)
                dt_, kept = _deltas(data, tu[tg], tt[tg], cs, w, return_kept=True)
                per_group[g] = (dt_, _deltas(data, cu, ct, cs, w), tu[tg][kept])
            kind = (kinds or {}).get(c, "sensitive")
            for g in glist:
                rows.append(self._compare(c, kind, "matched", g, per_group[g][:2] if per_group[g] else None, prng))
            if groups is None and did:
                pair = None
                if per_group["included"] is not None and per_group["excluded"] is not None:
                    pair = (per_group["included"][0], per_group["excluded"][0])
                row = self._compare(c, kind, "did", "included_vs_excluded", pair, prng)
                row["p_permutation_users"] = row["p_permutation"]
                if pair is not None and np.isfinite(row["p_permutation"]):
                    row["p_permutation"] = self._region_p(data, pair, per_group["included"][2], per_group["excluded"][2])
                rows.append(row)
        t = pd.DataFrame(rows)
        t["window"] = "placebo" if placebo else "policy"
        t["p_bh"] = np.nan
        for (k, d, g), idx in t.groupby(["kind", "design", "region_group"]).groups.items():
            ok = t.loc[idx, "p_permutation"].notna()
            if ok.any():
                t.loc[ok[ok].index, "p_bh"] = p_adjust(t.loc[ok[ok].index, "p_permutation"], "fdr_bh")
        t["detected"] = t["p_permutation"] < self.alpha
        return ExposureResult(t, self.alpha, self.window_days, self.min_users, self.n_permutations)

    def _region_p(self, data: ExposureData, pair, users_inc: np.ndarray, users_exc: np.ndarray) -> float:
        """One-sided (exposure rises more in included regions) studentized region-level permutation p-value."""
        d = np.r_[pair[0][0], pair[1][0]]
        region = np.r_[data.region[users_inc], data.region[users_exc]]
        inc = np.r_[np.ones(len(users_inc), bool), np.zeros(len(users_exc), bool)]
        try:
            r = region_permutation_test(d, region, inc, n_permutations=self.n_permutations, seed=self.seed)
        except ValueError:  # fewer than two regions on a side
            return np.nan
        # the test is two-sided on |t|; halve for the one-sided alternative when the effect is positive
        return min(1.0, r["p_value"] / 2) if r["t"] > 0 else 1 - r["p_value"] / 2

    def _compare(self, c, kind, design, group, pair, rng) -> dict:
        row = {"category": c, "kind": kind, "design": design, "region_group": group, "n_treated": 0, "n_control": 0}
        nan = dict.fromkeys(["mean_delta_treated", "mean_delta_control", "effect", "ci_low", "ci_high", "p_welch",
                             "p_permutation", "glm_log_or", "glm_odds_ratio", "glm_or_low", "glm_or_high", "p_glm"], np.nan)
        row.update(nan)
        if pair is None:
            return row
        (dt, ct), (dc, cc) = pair
        row.update({"n_treated": len(dt), "n_control": len(dc)})
        if len(dt) < self.min_users or len(dc) < self.min_users:
            return row
        from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

        cm = CompareMeans(DescrStatsW(dt), DescrStatsW(dc))
        lo, hi = cm.tconfint_diff(alpha=self.alpha, usevar="unequal")
        row.update({"mean_delta_treated": float(dt.mean()), "mean_delta_control": float(dc.mean()),
                    "effect": float(dt.mean() - dc.mean()), "ci_low": float(lo), "ci_high": float(hi),
                    "p_welch": float(cm.ttest_ind(alternative="larger", usevar="unequal")[1]),
                    "p_permutation": _perm_welch(dt, dc, self.n_permutations, rng)})
        if self.glm:
            row.update(_glm(ct, cc, self.alpha))
        return row


def _deltas(data: ExposureData, users: np.ndarray, t0: np.ndarray, cs: np.ndarray, w: int, return_kept: bool = False):
    """Per user with impressions in both windows: the change in share, and the window counts (and
    which of `users` were kept)."""
    k = data.window_counts(users, t0, cs, w)
    ok = (k[:, 0] > 0) & (k[:, 2] > 0)
    k = k[ok]
    out = (k[:, 3] / k[:, 2] - k[:, 1] / k[:, 0], k)
    return (out, ok) if return_kept else out


def _perm_welch(a: np.ndarray, b: np.ndarray, n_perm: int, rng, h: int = 50) -> float:
    """One-sided permutation p-value of Welch's t (labels shuffled across users), sequential
    (Besag & Clifford 1991): draws stop at the h-th null statistic >= the observed one, p = h / draws;
    a test that never gets there takes all `n_perm` draws, p = (1 + exceedances) / (n_perm + 1). The
    p-value is valid (P(p <= u) <= u) and equal to the full run's below h / n_perm, where multiplicity
    families decide; a null test stops after ~h (1 + ln(n_perm / h)) draws, so a fine grid at the tail
    (n_perm 9,999) costs less than 999 fixed draws did."""
    x = np.concatenate([a, b]).astype(float)
    n, n1 = len(x), len(a)
    small = min(n1, n - n1)  # draw the smaller group's members (Floyd); the other group's sums follow
    sx, sxx = x.sum(), (x * x).sum()

    def welch(s, ss):  # s, ss: sums of x, x^2 over the drawn group of size `small`
        if small != n1:  # the drawn group is group 0
            s, ss = sx - s, sxx - ss
        n0 = n - n1
        m1, m0 = s / n1, (sx - s) / n0
        v1 = (ss - n1 * m1**2) / max(n1 - 1, 1)
        v0 = (sxx - ss - n0 * m0**2) / max(n0 - 1, 1)
        return (m1 - m0) / np.sqrt(np.maximum(v1 / n1 + v0 / n0, 1e-300))

    obs = welch(*((a.sum(), (a * a).sum()) if small == n1 else (b.sum(), (b * b).sum())))
    tol = 1e-9 * max(1.0, abs(obs))
    done = exceed = 0
    size = 128
    while done < n_perm:
        size = min(size, n_perm - done)
        s, ss = _subset_sums(x, small, size, rng)
        hits = np.cumsum(welch(s, ss) >= obs - tol)
        if exceed + hits[-1] >= h:
            return float(h / (done + 1 + int(np.searchsorted(hits, h - exceed))))
        exceed += int(hits[-1])
        done += size
        size *= 2
    return float((1 + exceed) / (n_perm + 1))


def _subset_sums(x: np.ndarray, k: int, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sums of x and x^2 over `size` uniform random k-subsets of x (Floyd's algorithm, vectorized over
    the subsets: O(size * k) work instead of a full shuffle of every row)."""
    n = len(x)
    base = np.arange(size) * n  # flat index of each subset's row in `chosen`
    chosen = np.zeros(size * n, dtype=bool)
    s, ss, x2 = np.zeros(size), np.zeros(size), x * x
    for j in range(n - k, n):
        t = rng.integers(0, j + 1, size=size)
        t = np.where(chosen[base + t], j, t)
        chosen[base + t] = True
        s += x[t]
        ss += x2[t]
    return s, ss


def _glm(ct: np.ndarray, cc: np.ndarray, alpha: float) -> dict:
    """Binomial GLM of (user, window) ad counts: logit share ~ treated * after, cluster-robust by user."""
    import statsmodels.api as sm

    k = np.vstack([ct, cc])
    n = len(k)
    treated = np.r_[np.ones(len(ct)), np.zeros(len(cc))]
    endog = np.vstack([np.c_[k[:, 1], k[:, 0] - k[:, 1]], np.c_[k[:, 3], k[:, 2] - k[:, 3]]])
    after = np.r_[np.zeros(n), np.ones(n)]
    tr = np.r_[treated, treated]
    X = np.c_[np.ones(2 * n), tr, after, tr * after]
    groups = np.r_[np.arange(n), np.arange(n)]
    out = dict.fromkeys(["glm_log_or", "glm_odds_ratio", "glm_or_low", "glm_or_high", "p_glm"], np.nan)
    if endog[:, 0].sum() == 0:
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sm.GLM(endog, X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": groups})
        b, se = float(r.params[3]), float(r.bse[3])
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        return out
    if not (np.isfinite(b) and np.isfinite(se) and se > 0):
        return out
    z = stats.norm.ppf(1 - alpha / 2)
    return {"glm_log_or": b, "glm_odds_ratio": float(np.exp(b)), "glm_or_low": float(np.exp(b - z * se)),
            "glm_or_high": float(np.exp(b + z * se)), "p_glm": float(stats.norm.sf(b / se))}


# ------------------------------------------------------------------------------ violations


def regional_exposure(data: ExposureData, conversations: pd.DataFrame, conversation_nodes: pd.Series, *, window_days: float = 30.0,
                      n_permutations: int = 9999, alpha: float = 0.05, min_users: int = 20, seed: int = 0) -> pd.DataFrame:
    """The matched exposure test within each excluded region on its own, over every chat topic at once,
    so that a violation confined to one country is not diluted by the others (design `region`,
    category `any_chat_topic`).

    Treated: a user's first conversation after the policy date whose topic maps to an IAB node
    (`conversation_nodes`: conversation_id -> node); outcome: the change in the share of their ads
    in that node. Controls: users of the same region given a pseudo (date, node) drawn from the
    treated ones, kept if they had no conversation about that node from (policy - w) on.
    BH across regions.
    """
    rng, prng = np.random.default_rng(seed), np.random.default_rng([seed, 2, 1])  # design draws; permutations
    w = int(window_days * 86400)
    conv = conversations.assign(conversation_id=conversations["conversation_id"].astype(str))
    node = conv["conversation_id"].map(conversation_nodes)
    ncode = data.nodes.get_indexer(pd.Index(node.astype(object).where(node.notna(), "")).astype(str))
    ucode = data.user_ids.get_indexer(conv["user_id"].astype(str))
    t = data.seconds(conv["started_at"])
    ok = (ncode >= 0) & (ucode >= 0)
    ucode, ncode, t = ucode[ok], ncode[ok], t[ok]
    K = np.int64(len(data.nodes) + 1)
    recent = np.unique(ucode[t >= data.policy_s - w].astype(np.int64) * K + ncode[t >= data.policy_s - w])
    post = t >= data.policy_s
    o = np.lexsort((t[post], ucode[post]))
    tu, tt, tn = ucode[post][o], t[post][o], ncode[post][o]
    first = np.r_[True, tu[1:] != tu[:-1]] if len(tu) else np.zeros(0, bool)
    tu, tt, tn = tu[first], tt[first], tn[first]
    has_imp = np.bincount((data.key >> SHIFT).astype(np.int64), minlength=len(data.user_ids)) > 0
    cache: dict[int, np.ndarray] = {}

    def deltas(users, t0, nodes):
        k = np.zeros((len(users), 4), dtype=np.int64)
        for n in np.unique(nodes):
            if n not in cache:
                cache[n] = data.cumulative(np.arange(len(data.nodes)) == n)
            m = nodes == n
            k[m] = data.window_counts(users[m], t0[m], cache[n], w)
        keep = (k[:, 0] > 0) & (k[:, 2] > 0)
        k = k[keep]
        return k[:, 3] / k[:, 2] - k[:, 1] / k[:, 0], k

    test = ExposureTest(window_days, n_permutations, alpha, min_users, seed)
    rows = []
    for r in sorted(set(data.region[~data.included])):
        tr = data.region[tu] == r
        cu = np.flatnonzero((data.region == r) & has_imp)
        cu = cu[~np.isin(cu, tu[tr])]
        pair = None
        if tr.any() and len(cu):
            pick = rng.integers(0, tr.sum(), size=len(cu))
            ct, cn = tt[tr][pick], tn[tr][pick]
            clean = ~np.isin(cu.astype(np.int64) * K + cn, recent)
            pair = (deltas(tu[tr], tt[tr], tn[tr]), deltas(cu[clean], ct[clean], cn[clean]))
        rows.append(test._compare("any_chat_topic", "control", "region", r, pair, prng))
    out = pd.DataFrame(rows)
    out["window"] = "policy"
    out["p_bh"] = np.nan
    ok = out["p_permutation"].notna() if len(out) else pd.Series(dtype=bool)
    if len(out) and ok.any():
        out.loc[ok, "p_bh"] = p_adjust(out.loc[ok, "p_permutation"], "fdr_bh")
    out["detected"] = out["p_bh"] < alpha
    return out

def violations(data: ExposureData, exposure: ExposureResult | None = None, *, min_cell: int = 10, alpha: float = 0.05) -> pd.DataFrame:
    """Chat-derived ad signals in excluded regions, per region: impressions whose targeting sources
    include "ai_chat" (and the users they reached, small cells suppressed). A region is flagged when
    it has any, or when its own black-box exposure test (design `region`, chat topics pooled) is
    significant; the excluded group as a whole (row `ALL excluded`) also when a category's exposure
    test among all excluded-region users is. Every such test is in ONE Holm family, so the chance of
    any false flag by the tests under the global null is at most alpha (`attrs["family"]` says so)."""
    users = (data.key >> SHIFT).astype(np.int64)
    excl_imp = ~data.included[users]
    chat = data.chat if data.chat is not None else np.zeros(len(users), dtype=bool)
    sel = excl_imp & chat
    reg = data.region[users[sel]]
    t = pd.DataFrame({"region": reg, "user": users[sel]})
    g = t.groupby("region").agg(chat_impressions=("user", "size"), users=("user", "nunique"))
    all_excl = pd.Index(sorted(set(data.region[~data.included])), name="region")
    g = g.reindex(all_excl, fill_value=0).reset_index()
    g["impressions"] = pd.Series(data.region[users[excl_imp]]).value_counts().reindex(g["region"]).fillna(0).astype(int).to_numpy()
    g["exposure_effect"], g["exposure_p"] = np.nan, np.nan
    tests = pd.DataFrame(columns=["test", "region", "p_value"])
    if exposure is not None:
        e = exposure.table
        e = e[(e.get("window", "policy") == "policy") & (e["kind"] != "negative_control")]
        reg = e[e["design"] == "region"].set_index("region_group")
        g["exposure_effect"] = g["region"].map(reg["effect"])
        grp = e[(e["design"] == "matched") & (e["region_group"] == "excluded")]
        tests = pd.concat([
            pd.DataFrame({"test": [f"exposure in {r}" for r in reg.index], "region": reg.index, "p_value": reg["p_permutation"].to_numpy()}),
            pd.DataFrame({"test": [f"exposure to {c} ads (all excluded)" for c in grp["category"]], "region": "ALL excluded",
                          "p_value": grp["p_permutation"].to_numpy()}),
        ], ignore_index=True)
    min_p = 1 / (exposure.n_permutations + 1) if exposure is not None and exposure.n_permutations else None
    fam, statement = violation_family(tests, alpha=alpha, min_p=min_p)
    fam = fam.set_index("region")
    g["exposure_p"] = g["region"].map(fam["min_p_holm"]) if len(fam) else np.nan
    by_exposure = g["exposure_p"] < alpha
    g["flagged"] = (g["chat_impressions"] > 0) | by_exposure
    g["signal"] = ["; ".join(x for x in ("ai_chat targeting source" if c > 0 else "", "exposure effect" if b else "") if x)
                   for c, b in zip(g["chat_impressions"], by_exposure)]
    all_p = fam["min_p_holm"].get("ALL excluded", np.nan) if len(fam) else np.nan
    exp_sig = bool(all_p < alpha)
    total = {"region": "ALL excluded", "chat_impressions": int(g["chat_impressions"].sum()), "users": int(len(np.unique(users[sel]))),
             "impressions": int(excl_imp.sum()), "exposure_p": all_p, "flagged": bool(g["flagged"].any() or exp_sig),
             "signal": "; ".join(x for x in ("ai_chat targeting source" if g["chat_impressions"].sum() else "",
                                              "exposure effect in " + ", ".join(g.loc[by_exposure, "region"]) if by_exposure.any() else "",
                                              f"exposure effect (all excluded): {fam.loc['ALL excluded', 'signal']}" if exp_sig else "") if x)}
    g = pd.concat([g, pd.DataFrame([total])], ignore_index=True)
    g = g.sort_values(["flagged", "chat_impressions"], ascending=False, kind="stable").reset_index(drop=True)
    out = suppress_small_cells(g, ["users"], k=min_cell, complementary=False)
    out.attrs["family"] = statement
    out.attrs["family_tests"] = m = int(tests["p_value"].notna().sum())
    out.attrs["underpowered"] = bool(min_p is not None and m and min_p * m >= alpha)  # no test can flag
    return out
