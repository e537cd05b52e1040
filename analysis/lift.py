"""Stage 04: does chat-based personalization lift engagement (CTR)?

Every estimator here works on per-user sufficient statistics (impressions and clicks per user and
period, week or ad category), never on raw impression rows, and treats the user as the unit of
independence (clustered / linearized variances): clicks of one user are correlated.

Estimands (all *impression-weighted*: CTR = clicks / impressions over the impressions concerned,
which is what the simulator's `ground_truth["lift"]` reports):

- DiD and region CUPED: effect of the policy on included-region impressions after the policy date
  (intent-to-treat over holdout arms) = truth `included_post`.
- A/B: treatment arm vs holdout arm in included regions after the date = truth `treatment_arm`.
- Per ad category (observational): CTR of chat-targeted vs other impressions of the same category,
  included regions after the date; compares to truth `by_category_matched_lift`.

Relative lifts are effect / counterfactual CTR, with delta-method and Fieller CIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

from analysis.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE, is_excluded

NS_PER_DAY = 86_400 * 10**9
CHAT_SOURCE = "ai_chat"
ARMS = ("treatment", "holdout")

# ----------------------------------------------------------------------------- loading


def read_impressions(path: str | Path) -> pd.DataFrame:
    """Impressions in the compact form `aggregate` needs, read column-wise with Arrow.

    `targeting_sources` (a list per row) becomes a boolean `chat` ("ai_chat" among the sources)
    without materializing Python lists; ids become categoricals. Missing optional columns stay absent.
    """
    schema = pq.ParquetDataset(path).schema  # a file or a folder of part files
    cols = [c for c in ("user_id", "shown_at", "ad_category", "clicked", "targeting_sources", "arm") if c in schema.names]
    t = pq.read_table(path, columns=cols)
    out = {
        "user_id": t["user_id"].combine_chunks().dictionary_encode(),
        "shown_at": t["shown_at"],
        "ad_category": t["ad_category"].combine_chunks().dictionary_encode(),
        "clicked": t["clicked"],
    }
    if "arm" in cols:
        out["arm"] = t["arm"].combine_chunks().dictionary_encode()
    if "targeting_sources" in cols:
        out["chat"] = pa.array(_chat_flag(t["targeting_sources"].combine_chunks()))
    return pa.table(out).to_pandas()


def _chat_flag(lists) -> np.ndarray:
    """True where the row's list of targeting sources contains "ai_chat" (null lists: False)."""
    if not isinstance(lists, (pa.Array, pa.ChunkedArray)):
        lists = pa.array([None if v is None else list(v) for v in lists], type=pa.list_(pa.string()))
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flag = np.zeros(len(lists), dtype=bool)
    hit = pc.equal(pc.list_flatten(lists), CHAT_SOURCE).fill_null(False).to_numpy(zero_copy_only=False)
    flag[pc.list_parent_indices(lists).to_numpy()[hit]] = True
    return flag


# ------------------------------------------------------------------------- aggregation


@dataclass
class LiftData:
    """Sufficient statistics of an impression log.

    users: one row per user (index = user code): user_id, region, included, arm.
    user_week: user, week (weeks since the policy date; edge weeks with < 4 days merged inward),
        impressions, clicks. `week >= 0` is the post period.
    category_cells: included regions, post period: user, ad_category, chat, impressions, clicks
        (None when the log has no targeting_sources).
    """

    users: pd.DataFrame
    user_week: pd.DataFrame
    category_cells: pd.DataFrame | None
    policy_date: str
    n_impressions: int
    n_dropped: int = 0  # impressions of users without a known region
    _per_user: pd.DataFrame | None = field(default=None, repr=False)

    @cached_property
    def user_period(self) -> pd.DataFrame:
        """user, post, impressions, clicks (+ included, region, arm); rows with impressions only."""
        pu = self.per_user()
        parts = []
        for post, sfx in ((False, "pre"), (True, "post")):
            m = pu[f"imp_{sfx}"].to_numpy() > 0
            parts.append(pd.DataFrame({"user": pu.index[m], "post": post, "impressions": pu[f"imp_{sfx}"].to_numpy()[m],
                                       "clicks": pu[f"clk_{sfx}"].to_numpy()[m]}))
        up = pd.concat(parts, ignore_index=True).sort_values(["user", "post"], kind="stable", ignore_index=True)
        return up.join(self.users[["included", "region", "arm"]], on="user")

    def per_user(self) -> pd.DataFrame:
        """One row per user: imp_pre, clk_pre, imp_post, clk_post plus the user's attributes."""
        if self._per_user is None:
            uw = self.user_week
            size = int(self.users.index.max()) + 1 if len(self.users) else 0
            u = uw["user"].to_numpy()
            post = uw["week"].to_numpy() >= 0
            out = pd.DataFrame(index=self.users.index)
            for name, col in (("imp", "impressions"), ("clk", "clicks")):
                v = uw[col].to_numpy(float)
                for sfx, m in (("pre", ~post), ("post", post)):
                    out[f"{name}_{sfx}"] = np.bincount(u[m], weights=v[m], minlength=size)[out.index].astype(np.int64)
            self._per_user = out.join(self.users[["included", "region", "arm"]])
        return self._per_user

    def cells(self) -> pd.DataFrame:
        """CTR by region group and period (impression-weighted) with user and impression counts."""
        up = self.user_period
        g = up.groupby(["included", "post"]).agg(users=("user", "nunique"), impressions=("impressions", "sum"), clicks=("clicks", "sum"))
        g["ctr"] = g["clicks"] / g["impressions"]
        g = g.reset_index()
        g["group"] = np.where(g["included"], "included", "excluded")
        g["period"] = np.where(g["post"], "post", "pre")
        return g[["group", "period", "users", "impressions", "clicks", "ctr"]]

    def summary(self) -> pd.DataFrame:
        u = self.users
        return pd.DataFrame(
            {
                "impressions": [self.n_impressions],
                "impressions_dropped_no_region": [self.n_dropped],
                "users": [len(u)],
                "users_included": [int(u["included"].sum())],
                "users_with_arm": [int(u["arm"].notna().sum())],
                "user_weeks": [len(self.user_week)],
                "weeks": [f"{self.user_week['week'].min()}..{self.user_week['week'].max()}"],
            }
        )


def aggregate(
    impressions: pd.DataFrame,
    users: pd.DataFrame,
    *,
    policy_date: str = DEFAULT_POLICY_DATE,
    excluded_regions=None,
) -> LiftData:
    """Reduce an impression log to per-user-week (and per-user-category) counts.

    `impressions` needs user_id, shown_at, clicked; optional ad_category, arm and either
    `chat` (bool) or `targeting_sources` (lists). `users` needs user_id and region.
    """
    excluded = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    uid = impressions["user_id"]
    ucat = uid.array if isinstance(uid.dtype, pd.CategoricalDtype) else pd.Categorical(uid)
    codes = np.asarray(ucat.codes, dtype=np.int64)
    regions = users.drop_duplicates("user_id").set_index("user_id")["region"]
    region = regions.reindex(pd.Index(ucat.categories)).to_numpy(dtype=object)
    known = pd.notna(region)
    keep = known[codes] if len(codes) else np.zeros(0, dtype=bool)
    n_dropped = int((~keep).sum())

    t = impressions["shown_at"]
    t = t.dt.tz_convert("UTC") if getattr(t.dt, "tz", None) is not None else t.dt.tz_localize("UTC")
    ns = t.to_numpy(dtype="datetime64[ns]").view("int64") - pd.Timestamp(policy_date, tz="UTC").value
    day = np.floor_divide(ns, NS_PER_DAY)
    week = np.floor_divide(day, 7)
    # an edge week covered by fewer than 4 days of data is merged into its neighbour
    dk = day[keep]
    d0 = dk.min()
    dw = (np.flatnonzero(np.bincount(dk - d0)) + d0) // 7  # weeks of the days that have data
    wk, ndays = np.unique(dw, return_counts=True)
    lo = wk[0] + (1 if len(wk) > 1 and ndays[0] < 4 else 0)
    hi = wk[-1] - (1 if len(wk) > 1 and ndays[-1] < 4 else 0)
    week = np.clip(week, lo, hi)
    # never let a merge move an impression across the policy date
    week = np.where(day >= 0, np.maximum(week, 0), np.minimum(week, -1))

    clicked = impressions["clicked"].to_numpy(dtype=bool)
    nw = int(hi - lo + 1)
    k, size, sums = _count_by(codes[keep] * nw + (week[keep] - lo), clicked[keep])
    user_week = pd.DataFrame({"user": k // nw, "week": k % nw + lo, "impressions": size, "clicks": sums})

    included = ~is_excluded(pd.Series(region, dtype="object").fillna(""), excluded).to_numpy()
    arm = pd.Series([None] * len(ucat.categories), dtype=object)
    if "arm" in impressions:
        a = impressions["arm"]
        a = a.array if isinstance(a.dtype, pd.CategoricalDtype) else pd.Categorical(a)
        nu = len(ucat.categories)
        n_arm = [np.bincount(codes, weights=np.asarray(a == arm_name), minlength=nu) for arm_name in ARMS]
        ac = np.where(n_arm[0] > 0, 0, np.where(n_arm[1] > 0, 1, -1))
        # a user seen in both arms is not a clean experimental unit: leave them out of the A/B
        ac = np.where((n_arm[0] > 0) & (n_arm[1] > 0), -1, ac)
        arm = pd.Series(np.array([None, *ARMS], dtype=object)[ac + 1])
    user_tab = pd.DataFrame({"user_id": np.asarray(ucat.categories, dtype=object), "region": region, "included": included, "arm": arm.to_numpy()})
    user_tab = user_tab[known].rename_axis("user")

    cells = None
    chat = None
    if "chat" in impressions:
        chat = impressions["chat"].to_numpy(dtype=bool)
    elif "targeting_sources" in impressions:
        chat = _chat_flag(impressions["targeting_sources"])
    if chat is not None and "ad_category" in impressions:
        m = keep & (day >= 0) & included[codes]
        cat = impressions["ad_category"]
        ccat = cat.array if isinstance(cat.dtype, pd.CategoricalDtype) else pd.Categorical(cat)
        ccodes = np.asarray(ccat.codes, dtype=np.int64)[m]
        nu = len(ucat.categories)
        k, size, sums = _count_by((ccodes * nu + codes[m]) * 2 + chat[m], clicked[m])
        cells = pd.DataFrame(
            {
                "ad_category": np.asarray(ccat.categories, dtype=object)[k // (2 * nu)],
                "user": (k // 2) % nu,
                "chat": (k % 2).astype(bool),
                "impressions": size,
                "clicks": sums,
            }
        )
    return LiftData(user_tab, user_week, cells, policy_date, int(len(impressions)), n_dropped)


def _count_by(key: np.ndarray, flag: np.ndarray, dense_limit: int = 50_000_000):
    """Distinct keys (sorted), rows per key and flagged rows per key: bincount when the key range
    is small enough for a dense array, a hash group-by otherwise."""
    key = np.asarray(key, dtype=np.int64)
    if len(key) and key.max() < dense_limit:
        size = np.bincount(key)
        sums = np.bincount(key, weights=flag).astype(np.int64)
        k = np.flatnonzero(size)
        return k, size[k].astype(np.int64), sums[k]
    g = pd.DataFrame({"k": key, "c": flag}).groupby("k", sort=True)["c"].agg(["size", "sum"])
    return g.index.to_numpy(np.int64), g["size"].to_numpy(np.int64), g["sum"].to_numpy(np.int64)


# -------------------------------------------------------------------- ratio intervals


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


# --------------------------------------------------------------------------------- DiD


@dataclass
class DiDResult:
    """2x2 difference-in-differences of impression-weighted CTR (estimand: truth `included_post`)."""

    abs_lift: float
    se: float
    ci: tuple[float, float]
    p_value: float
    df: int
    counterfactual_ctr: float
    rel_lift: float
    rel_se: float
    rel_ci_delta: tuple[float, float]
    rel_ci_fieller: tuple[float, float]
    n_users: int
    cells: pd.DataFrame
    model: object = field(repr=False, default=None)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "estimator": ["DiD (included vs excluded, pre vs post)"],
                "abs_lift": [self.abs_lift],
                "abs_ci": [_fmt_ci(self.ci, 5)],
                "rel_lift": [self.rel_lift],
                "rel_ci_delta": [_fmt_ci(self.rel_ci_delta)],
                "rel_ci_fieller": [_fmt_ci(self.rel_ci_fieller)],
                "p_value": [self.p_value],
                "users (clusters)": [self.n_users],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"quantity": "abs_lift", "estimate": self.abs_lift, "se": self.se, "ci_low": self.ci[0], "ci_high": self.ci[1], "p_value": self.p_value, "df": self.df},
                {"quantity": "rel_lift (delta)", "estimate": self.rel_lift, "se": self.rel_se, "ci_low": self.rel_ci_delta[0], "ci_high": self.rel_ci_delta[1], "p_value": self.p_value, "df": self.df},
                {"quantity": "rel_lift (Fieller)", "estimate": self.rel_lift, "se": np.nan, "ci_low": self.rel_ci_fieller[0], "ci_high": self.rel_ci_fieller[1], "p_value": self.p_value, "df": self.df},
                {"quantity": "counterfactual_ctr", "estimate": self.counterfactual_ctr, "se": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "df": self.df},
            ]
        )


class DiffInDiff:
    """Impression-weighted 2x2 DiD: WLS of user-period CTR on group x period, weights = impressions,
    SEs clustered by user with a t reference (G - 1 df). The WLS coefficient equals the DiD of
    pooled CTRs (clicks / impressions per cell), so it targets the impression-weighted effect."""

    def __init__(self, alpha: float = 0.05):
        self.alpha = alpha

    def fit(self, data: LiftData) -> DiDResult:
        up = data.user_period
        up = up[up["impressions"] > 0]
        have = up.groupby(["included", "post"]).size()
        if len(have) < 4:
            raise ValueError(f"DiD needs impressions in all four group x period cells; have {have.to_dict()}")
        inc, post = up["included"].to_numpy(float), up["post"].to_numpy(float)
        X = np.column_stack([np.ones(len(up)), inc, post, inc * post])
        y = (up["clicks"] / up["impressions"]).to_numpy()
        res = sm.WLS(y, X, weights=up["impressions"].to_numpy(float)).fit(
            cov_type="cluster", cov_kwds={"groups": up["user"].to_numpy()}, use_t=True
        )
        b, V = res.params, res.cov_params()
        df = int(res.df_resid_inference) if getattr(res, "df_resid_inference", None) is not None else up["user"].nunique() - 1
        ci = tuple(res.conf_int(self.alpha)[3])
        cvec = np.array([1.0, 1.0, 1.0, 0.0])  # counterfactual: included post without the effect
        avec = np.array([0.0, 0.0, 0.0, 1.0])
        rel = ratio_ci(b[3], cvec @ b, V[3, 3], cvec @ V @ cvec, avec @ V @ cvec, df=df, alpha=self.alpha)
        return DiDResult(
            abs_lift=float(b[3]), se=float(res.bse[3]), ci=(float(ci[0]), float(ci[1])), p_value=float(res.pvalues[3]), df=df,
            counterfactual_ctr=float(cvec @ b), rel_lift=float(rel["ratio"]), rel_se=float(rel["se"]),
            rel_ci_delta=rel["delta_ci"], rel_ci_fieller=rel["fieller_ci"], n_users=int(up["user"].nunique()),
            cells=data.cells(), model=res,
        )


# ------------------------------------------------------------------------ event study


@dataclass
class EventStudyResult:
    """Included-minus-excluded CTR gap by week relative to the reference week."""

    coefs: pd.DataFrame  # week, estimate, se, ci_low, ci_high, p_value, period
    ref_week: int
    pretrend_f: float
    pretrend_p: float
    pretrend_df: tuple[int, int]

    def summary(self) -> pd.DataFrame:
        pre = self.coefs[self.coefs["period"] == "pre"]
        post = self.coefs[self.coefs["period"] == "post"]
        return pd.DataFrame(
            {
                "weeks_pre": [len(pre)],
                "weeks_post": [len(post)],
                "pretrend_F": [self.pretrend_f],
                "pretrend_p": [self.pretrend_p],
                "mean_post_coef": [post["estimate"].mean()],
                "pre_coefs_outside_CI_of_0": [int(((pre["ci_low"] > 0) | (pre["ci_high"] < 0)).sum())],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return self.coefs.copy()

    def plot(self, ax=None, truth: float | None = None):
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(9, 3.4))
        c = self.coefs
        colors = np.where(c["period"] == "pre", "tab:gray", "tab:blue")
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(-0.5, color="k", ls="--", lw=1)
        for col in ("tab:gray", "tab:blue"):
            s = c[colors == col]
            ax.errorbar(s["week"], s["estimate"], yerr=[s["estimate"] - s["ci_low"], s["ci_high"] - s["estimate"]], fmt="o", color=col, ms=4, capsize=2,
                        label="pre-period (placebo)" if col == "tab:gray" else "post-period")
        ax.plot([self.ref_week], [0], "o", mfc="white", color="k", ms=5, label=f"reference week {self.ref_week}")
        if truth is not None:
            ax.axhline(truth, color="tab:green", ls=":", lw=1.5, label="true effect (simulation)")
        ax.set_xlabel("weeks since the policy date")
        ax.set_ylabel("CTR gap vs. reference week")
        ax.set_title(f"Event study (pre-trend F-test p = {self.pretrend_p:.3f})", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
        ax.figure.tight_layout()
        return ax.figure


class EventStudy:
    """Week-by-week DiD: WLS of user-week CTR on an included-region effect, week fixed effects and
    included x week dummies (reference week omitted), weights = impressions, user-clustered SEs
    (CR1, statsmodels' small-sample factor), t reference with users - 1 df. Pre-period coefficients
    are placebo tests of parallel trends; their joint cluster-robust F-test is the pre-trend test.

    The model is the one statsmodels' `WLS(...).fit(cov_type="cluster", use_t=True)` fits (a test
    checks equality on `design()`), but it is solved with a sparse design: statsmodels' dense fit
    took 4.1 s at 75k user-weeks (six SVDs of the design) and grows with the rows."""

    def __init__(self, ref_week: int = -1, alpha: float = 0.05):
        self.ref_week = ref_week
        self.alpha = alpha

    def design(self, data: LiftData):
        """(X as scipy CSR, y, weights, user groups, weeks): columns are [included, week dummies,
        included x week for every week but the reference]."""
        from scipy import sparse

        uw = data.user_week.join(data.users["included"], on="user")
        uw = uw[uw["impressions"] > 0]
        weeks = np.sort(uw["week"].unique())
        if self.ref_week not in weeks:
            raise ValueError(f"reference week {self.ref_week} has no impressions")
        n, k = len(uw), len(weeks)
        widx = np.searchsorted(weeks, uw["week"].to_numpy())
        inc = uw["included"].to_numpy(bool)
        col = np.full(k, -1)
        col[weeks != self.ref_week] = 1 + k + np.arange(k - 1)
        inter = inc & (col[widx] >= 0)
        r = np.concatenate([np.flatnonzero(inc), np.arange(n), np.flatnonzero(inter)])
        c = np.concatenate([np.zeros(inc.sum(), int), 1 + widx, col[widx][inter]])
        X = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, 2 * k))
        y = (uw["clicks"] / uw["impressions"]).to_numpy()
        return X, y, uw["impressions"].to_numpy(float), uw["user"].to_numpy(), weeks

    def fit(self, data: LiftData) -> EventStudyResult:
        from scipy import sparse

        X, y, w, groups, weeks = self.design(data)
        n, K = X.shape
        k = len(weeks)
        XtW = X.T.multiply(w).tocsr()
        bread = np.linalg.inv((XtW @ X).toarray())
        b = bread @ (XtW @ y)
        we = w * (y - X @ b)  # weight x residual = clicks - impressions x fitted CTR
        gi, g = np.unique(groups, return_inverse=True)
        G = len(gi)
        scores = sparse.csr_matrix(X.multiply(we[:, None]))
        S = sparse.csr_matrix((np.ones(n), (g, np.arange(n))), shape=(G, n)) @ scores  # per-user score sums
        meat = (S.T @ S).toarray()
        V = (G / (G - 1)) * ((n - 1) / (n - K)) * bread @ meat @ bread
        df = G - 1
        sel = [1 + k + i for i in range(k - 1)]
        inter = weeks[weeks != self.ref_week]
        est, se = b[sel], np.sqrt(np.diag(V)[sel])
        q = stats.t.ppf(1 - self.alpha / 2, df)
        coefs = pd.DataFrame(
            {
                "week": inter,
                "estimate": est,
                "se": se,
                "ci_low": est - q * se,
                "ci_high": est + q * se,
                "p_value": 2 * stats.t.sf(np.abs(est / se), df),
                "period": np.where(inter < 0, "pre", "post"),
            }
        )
        pre = [c for c, wk in zip(sel, inter) if wk < 0]
        if pre:
            bp, Vp = b[pre], V[np.ix_(pre, pre)]
            f = float(bp @ np.linalg.solve(Vp, bp) / len(pre))
            p = float(stats.f.sf(f, len(pre), df))
            dfs = (len(pre), df)
        else:
            f, p, dfs = np.nan, np.nan, (0, 0)
        return EventStudyResult(coefs, self.ref_week, f, p, dfs)


# -------------------------------------------------------------- randomization inference


@dataclass
class RandomizationResult:
    """Region-level randomization (permutation) inference for the DiD."""

    statistic: float
    p_value: float
    n_regions: int
    n_included_regions: int
    n_assignments: int
    exact: bool
    min_attainable_p: float
    null_distribution: np.ndarray = field(repr=False)

    CAVEAT = (
        "Regions were not assigned to the policy at random (the law decided), so this p-value treats "
        "the assignment as if it were random across regions. It tests the sharp null of no effect in "
        "any region, its resolution is limited by the number of possible assignments, and it answers "
        "a different worry than the user-clustered SE: region-level shocks (which user clustering "
        "ignores) are part of its null distribution. With only a handful of regions it has little power."
    )

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "DiD statistic": [self.statistic],
                "randomization p": [self.p_value],
                "regions": [self.n_regions],
                "included regions": [self.n_included_regions],
                "assignments": [self.n_assignments],
                "exact": [self.exact],
                "smallest attainable p": [self.min_attainable_p],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return self.summary()


class RegionRandomization:
    """Re-assign the included label over regions (same number of included regions), recompute the
    impression-weighted DiD, and compare. Enumerates all assignments when there are at most
    `max_exact`, otherwise samples `n_permutations` (p-value counts the observed assignment)."""

    def __init__(self, n_permutations: int = 5000, max_exact: int = 50_000, seed: int = 0):
        self.n_permutations = n_permutations
        self.max_exact = max_exact
        self.seed = seed

    def fit(self, data: LiftData) -> RandomizationResult:
        up = data.user_period
        g = up.groupby(["region", "post"])[["clicks", "impressions"]].sum().unstack("post", fill_value=0)
        reg_inc = data.users.groupby("region")["included"].first().reindex(g.index).to_numpy(bool)
        c_pre, c_post = g[("clicks", False)].to_numpy(float), g[("clicks", True)].to_numpy(float)
        n_pre, n_post = g[("impressions", False)].to_numpy(float), g[("impressions", True)].to_numpy(float)
        R, k = len(g), int(reg_inc.sum())
        if k == 0 or k == R:
            raise ValueError("randomization inference needs included and excluded regions")
        total = math.comb(R, k)
        exact = total <= self.max_exact
        if exact:
            A = np.zeros((total, R), dtype=bool)
            for i, comb in enumerate(combinations(range(R), k)):
                A[i, list(comb)] = True
        else:
            rng = np.random.default_rng(self.seed)
            A = np.zeros((self.n_permutations, R), dtype=bool)
            idx = np.argsort(rng.random((self.n_permutations, R)), axis=1)[:, :k]
            np.put_along_axis(A, idx, True, axis=1)
        stat_obs = _region_did(reg_inc[None, :], c_pre, c_post, n_pre, n_post)[0]
        null = _region_did(A, c_pre, c_post, n_pre, n_post)
        tol = 1e-12 * max(1.0, abs(stat_obs))
        extreme = np.sum(np.abs(null) >= abs(stat_obs) - tol)
        p = extreme / len(null) if exact else (1 + extreme) / (1 + len(null))
        return RandomizationResult(float(stat_obs), float(p), R, k, int(total), exact, 1 / total, null)


def _region_did(A: np.ndarray, c_pre, c_post, n_pre, n_post) -> np.ndarray:
    A = A.astype(float)
    B = 1.0 - A

    def ctr(M, c, n):
        with np.errstate(invalid="ignore", divide="ignore"):
            return (M @ c) / (M @ n)

    return (ctr(A, c_post, n_post) - ctr(A, c_pre, n_pre)) - (ctr(B, c_post, n_post) - ctr(B, c_pre, n_pre))


# ---------------------------------------------------------------------------- CUPED


@dataclass
class TwoGroupResult:
    """Ratio-metric (CTR) comparison of two groups of users, optionally CUPED-adjusted."""

    label: str
    n_treated: int
    n_control: int
    ctr_treated: float
    ctr_control: float
    theta: float
    abs_lift: float
    se: float
    ci: tuple[float, float]
    p_value: float
    df: float
    rel_lift: float
    rel_se: float
    rel_ci_delta: tuple[float, float]
    rel_ci_fieller: tuple[float, float]
    se_unadjusted: float
    variance_reduction: float  # 1 - Var(adjusted) / Var(unadjusted) of the abs lift

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "estimator": [self.label],
                "abs_lift": [self.abs_lift],
                "abs_ci": [_fmt_ci(self.ci, 5)],
                "rel_lift": [self.rel_lift],
                "rel_ci_delta": [_fmt_ci(self.rel_ci_delta)],
                "rel_ci_fieller": [_fmt_ci(self.rel_ci_fieller)],
                "p_value": [self.p_value],
                "theta": [self.theta],
                "variance_reduction": [self.variance_reduction],
                "users (T / C)": [f"{self.n_treated} / {self.n_control}"],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        row = {}
        for k, v in self.__dict__.items():
            if isinstance(v, tuple):
                row[f"{k}_low"], row[f"{k}_high"] = v
            else:
                row[k] = v
        return pd.DataFrame([row])


@dataclass
class GroupMoments:
    """Per-group sums over users of the linearized post (P) and pre (Q) CTR pseudo-values.

    P_i = R_post + (c_i - R_post * n_i) / mean(n): its mean is the group's pooled CTR and its
    sample variance / n is the delta-method variance of that ratio (Deng et al. 2013). These are
    exactly the moments gbstats' SampleMeanStatistic / RegressionAdjustedStatistic take.
    """

    n: int
    ctr_post: float
    ctr_pre: float
    sum_p: float
    sum_p2: float
    sum_q: float
    sum_q2: float
    sum_pq: float
    # raw ratio moments (what gbstats' RatioStatistic takes)
    clk: float
    clk2: float
    imp: float
    imp2: float
    clk_imp: float

    @classmethod
    def from_users(cls, clk_post, imp_post, clk_pre, imp_pre) -> "GroupMoments":
        clk_post, imp_post = np.asarray(clk_post, float), np.asarray(imp_post, float)
        clk_pre, imp_pre = np.asarray(clk_pre, float), np.asarray(imp_pre, float)
        r_post = clk_post.sum() / imp_post.sum()
        r_pre = clk_pre.sum() / imp_pre.sum() if imp_pre.sum() > 0 else 0.0
        p = r_post + (clk_post - r_post * imp_post) / imp_post.mean()
        q = r_pre + (clk_pre - r_pre * imp_pre) / imp_pre.mean() if imp_pre.sum() > 0 else np.zeros_like(p)
        return cls(len(p), r_post, r_pre, p.sum(), p @ p, q.sum(), q @ q, p @ q,
                   clk_post.sum(), clk_post @ clk_post, imp_post.sum(), imp_post @ imp_post, clk_post @ imp_post)

    def var(self, s, s2):
        return (s2 - s * s / self.n) / (self.n - 1)

    @property
    def var_p(self):
        return self.var(self.sum_p, self.sum_p2)

    @property
    def var_q(self):
        return self.var(self.sum_q, self.sum_q2)

    @property
    def cov_pq(self):
        return (self.sum_pq - self.sum_p * self.sum_q / self.n) / (self.n - 1)


class Cuped:
    """CUPED for a ratio metric: post-period CTR adjusted by the pre-period CTR of the same users.

    Both CTRs are linearized per user (delta method, user = unit); theta = Cov(P, Q) / Var(Q) over
    the pooled users of both groups (as GrowthBook computes it); the adjusted lift is
    (R_T - R_C) - theta * (Q_T - Q_C). theta = 0 (`adjust=False`) gives the plain ratio comparison.
    The unbiasedness of the adjustment needs the groups to have the same expected pre-period CTR:
    guaranteed by randomization in an A/B test, an assumption (like DiD's parallel trends) for regions.
    CIs use Welch-Satterthwaite df; the relative lift is divided by the control's unadjusted CTR.
    """

    def __init__(self, alpha: float = 0.05, adjust: bool = True):
        self.alpha = alpha
        self.adjust = adjust

    def fit_users(self, users: pd.DataFrame, treated: np.ndarray, label: str = "CUPED") -> TwoGroupResult:
        """`users`: one row per user with clk_post, imp_post, clk_pre, imp_pre; users without
        post-period impressions are left out (they carry no outcome)."""
        treated = np.asarray(treated, bool)
        has = users["imp_post"].to_numpy() > 0
        if min((has & treated).sum(), (has & ~treated).sum()) < 2:
            raise ValueError("each group needs at least two users with post-period impressions")
        cols = [users[c].to_numpy() for c in ("clk_post", "imp_post", "clk_pre", "imp_pre")]
        t = GroupMoments.from_users(*[c[has & treated] for c in cols])
        c = GroupMoments.from_users(*[c[has & ~treated] for c in cols])
        return self.fit_moments(t, c, label)

    def fit_moments(self, t: GroupMoments, c: GroupMoments, label: str = "CUPED") -> TwoGroupResult:
        theta = self.theta(t, c) if self.adjust else 0.0
        diff = (t.ctr_post - c.ctr_post) - theta * (t.ctr_pre - c.ctr_pre)
        vt = t.var_p + theta**2 * t.var_q - 2 * theta * t.cov_pq
        vc = c.var_p + theta**2 * c.var_q - 2 * theta * c.cov_pq
        var = vt / t.n + vc / c.n
        var0 = t.var_p / t.n + c.var_p / c.n
        df = var**2 / ((vt / t.n) ** 2 / (t.n - 1) + (vc / c.n) ** 2 / (c.n - 1))
        se = math.sqrt(var)
        q = stats.t.ppf(1 - self.alpha / 2, df)
        p = 2 * stats.t.sf(abs(diff) / se, df)
        # relative lift = diff / R_C; Cov(diff, R_C) = -Cov_C(P - theta Q, P) / n_C
        cov = -(c.var_p - theta * c.cov_pq) / c.n
        rel = ratio_ci(diff, c.ctr_post, var, c.var_p / c.n, cov, df=df, alpha=self.alpha)
        return TwoGroupResult(
            label, t.n, c.n, t.ctr_post, c.ctr_post, theta, diff, se, (diff - q * se, diff + q * se), p, df,
            rel["ratio"], rel["se"], rel["delta_ci"], rel["fieller_ci"], math.sqrt(var0), 1 - var / var0,
        )

    @staticmethod
    def theta(t: GroupMoments, c: GroupMoments) -> float:
        n = t.n + c.n
        sp, sq = t.sum_p + c.sum_p, t.sum_q + c.sum_q
        var_q = (t.sum_q2 + c.sum_q2 - sq * sq / n) / (n - 1)
        cov = (t.sum_pq + c.sum_pq - sp * sq / n) / (n - 1)
        return cov / var_q if var_q > 0 else 0.0


# ------------------------------------------------------------------------------- A/B


@dataclass
class ABResult:
    """Treatment vs holdout arm, included regions, post period (estimand: truth `treatment_arm`)."""

    n_users: dict
    srm_chi2: float
    srm_p: float
    srm_flag: bool
    expected_holdout_share: float | None
    plain: TwoGroupResult
    cuped: TwoGroupResult
    pre_period_placebo: TwoGroupResult | None
    two_proportion: dict
    power: dict
    permutation_p: float = np.nan  # user-level re-randomization of arms, plain lift: exact under the sharp null
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        s = pd.concat([self.plain.summary(), self.cuped.summary()], ignore_index=True)
        if self.pre_period_placebo is not None:
            s = pd.concat([s, self.pre_period_placebo.summary()], ignore_index=True)
        return s

    def checks(self) -> pd.DataFrame:
        rows = [
            ("users in treatment arm", self.n_users.get("treatment")),
            ("users in holdout arm", self.n_users.get("holdout")),
            ("expected holdout share", self.expected_holdout_share),
            ("SRM chi-square", self.srm_chi2),
            ("SRM p-value", self.srm_p),
            ("SRM flagged (p < 0.001)", self.srm_flag),
            ("user-level permutation p (plain lift)", self.permutation_p),
            ("impression-level two-proportion p (ignores clustering)", self.two_proportion["p_value"]),
            ("design effect of user clustering", self.two_proportion["design_effect"]),
            ("MDE, relative, plain (power %.0f%%)" % (100 * self.power["power"]), self.power["mde_rel_plain"]),
            ("MDE, relative, CUPED", self.power["mde_rel_cuped"]),
            ("power for a %.1f%% lift, plain" % (100 * self.power["target_rel_lift"]), self.power["power_plain"]),
            ("power for a %.1f%% lift, CUPED" % (100 * self.power["target_rel_lift"]), self.power["power_cuped"]),
        ]
        return pd.DataFrame(rows, columns=["check", "value"])

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([self.plain.to_frame(), self.cuped.to_frame()], ignore_index=True)


class ABTest:
    """A/B analysis of the platform's holdout arm: SRM check, plain and CUPED ratio lifts,
    a pre-period placebo (arms must not differ before the policy), impression-level
    two-proportion tests for reference, and power / MDE for the observed sample."""

    # below these sizes the delta-method / Welch CIs were measured to be too narrow (docs/lift.md)
    MIN_ARM_USERS = 100
    MIN_ARM_CLICKS = 100

    def __init__(self, alpha: float = 0.05, expected_holdout_share: float | None = 0.10, srm_alpha: float = 0.001,
                 power: float = 0.8, target_rel_lift: float = 0.05, n_permutations: int = 2000, seed: int = 0):
        self.alpha = alpha
        self.n_permutations = n_permutations
        self.seed = seed
        self.expected_holdout_share = expected_holdout_share
        self.srm_alpha = srm_alpha
        self.power = power
        self.target_rel_lift = target_rel_lift

    def fit(self, data: LiftData) -> ABResult:
        pu = data.per_user()
        pu = pu[pu["included"] & pu["arm"].isin(ARMS)]
        counts = pu["arm"].value_counts().reindex(list(ARMS), fill_value=0)
        if (counts == 0).any():
            raise ValueError(f"A/B needs users in both arms; have {counts.to_dict()}")
        chi2 = p_srm = np.nan
        if self.expected_holdout_share is not None:
            h = self.expected_holdout_share
            chi2, p_srm = stats.chisquare(counts.to_numpy(), f_exp=counts.sum() * np.array([1 - h, h]))
        treated = (pu["arm"] == "treatment").to_numpy()
        plain = Cuped(self.alpha, adjust=False).fit_users(pu, treated, "A/B plain (treatment vs holdout)")
        cuped = Cuped(self.alpha, adjust=True).fit_users(pu, treated, "A/B CUPED (pre-period CTR)")
        pre = pu[pu["imp_pre"] > 0]
        placebo = None
        if pre["arm"].nunique() == 2:
            pre_as_post = pre.assign(imp_post=pre["imp_pre"], clk_post=pre["clk_pre"], imp_pre=0, clk_pre=0)
            placebo = Cuped(self.alpha, adjust=False).fit_users(pre_as_post, (pre["arm"] == "treatment").to_numpy(), "A/B pre-period placebo (must be ~0)")

        ct, nt = pu.loc[treated, ["clk_post", "imp_post"]].sum()
        cc, nc = pu.loc[~treated, ["clk_post", "imp_post"]].sum()
        tp = test_proportions_2indep(ct, nt, cc, nc, compare="diff", return_results=True)
        ci_ratio = confint_proportions_2indep(ct, nt, cc, nc, compare="ratio", alpha=self.alpha)
        binom_var = (ct / nt) * (1 - ct / nt) / nt + (cc / nc) * (1 - cc / nc) / nc
        two_prop = {
            "p_value": float(tp.pvalue),
            "rel_ci": (float(ci_ratio[0]) - 1, float(ci_ratio[1]) - 1),
            "design_effect": float(plain.se**2 / binom_var),
            "note": "impressions treated as independent: too narrow when clicks cluster within users",
        }
        warnings = []
        if min(plain.n_treated, plain.n_control) < self.MIN_ARM_USERS or min(ct, cc) < self.MIN_ARM_CLICKS:
            warnings.append(
                f"small arm (fewer than {self.MIN_ARM_USERS} users or {self.MIN_ARM_CLICKS} post-period clicks): the "
                "delta-method CIs are too narrow at this size; rely on the permutation p-value for the test"
            )
        srm_flag = bool(p_srm < self.srm_alpha) if np.isfinite(p_srm) else False
        if srm_flag:
            warnings.append(f"sample ratio mismatch (p = {p_srm:.2g}): the arms are not the split the design promised; the A/B lift is not trustworthy")
        perm_p = self._permutation_p(pu[pu["imp_post"] > 0], plain.abs_lift) if self.n_permutations else np.nan
        return ABResult(counts.to_dict(), float(chi2), float(p_srm), srm_flag, self.expected_holdout_share, plain, cuped, placebo,
                        two_prop, self._power(plain, cuped), perm_p, warnings)

    def _permutation_p(self, pu: pd.DataFrame, observed: float, chunk: int = 250) -> float:
        """Re-randomize the arm labels over users (the unit of assignment) and recompute the plain lift."""
        rng = np.random.default_rng(self.seed)
        c, n = pu["clk_post"].to_numpy(float), pu["imp_post"].to_numpy(float)
        treated = (pu["arm"] == "treatment").to_numpy()
        k, ctot, ntot = int(treated.sum()), c.sum(), n.sum()
        extreme, done = 0, 0
        while done < self.n_permutations:
            b = min(chunk, self.n_permutations - done)
            M = np.argsort(rng.random((b, len(c))), axis=1) < k  # each row: a random set of k treated users
            ct_, nt_ = M @ c, M @ n
            stat = ct_ / nt_ - (ctot - ct_) / (ntot - nt_)
            extreme += int(np.sum(np.abs(stat) >= abs(observed) * (1 - 1e-12)))
            done += b
        return (1 + extreme) / (1 + self.n_permutations)

    def _power(self, plain: TwoGroupResult, cuped: TwoGroupResult) -> dict:
        """MDE and power from the observed per-user spread, via statsmodels' two-sample t power."""
        pw = TTestIndPower()
        ratio = plain.n_control / plain.n_treated
        d = pw.solve_power(effect_size=None, nobs1=plain.n_treated, ratio=ratio, alpha=self.alpha, power=self.power)
        scale = math.sqrt(1 / plain.n_treated + 1 / plain.n_control)
        out = {"power": self.power, "target_rel_lift": self.target_rel_lift}
        for name, se in (("plain", plain.se), ("cuped", cuped.se)):
            sd = se / scale  # per-user SD implied by the observed SE of the difference
            out[f"mde_abs_{name}"] = d * sd
            out[f"mde_rel_{name}"] = d * sd / plain.ctr_control
            es = self.target_rel_lift * plain.ctr_control / sd
            out[f"power_{name}"] = float(pw.power(effect_size=es, nobs1=plain.n_treated, ratio=ratio, alpha=self.alpha))
        return out


# ------------------------------------------------------------------------ by category


@dataclass
class CategoryLiftResult:
    """Observational per-category CTR contrast: chat-targeted vs other impressions."""

    table: pd.DataFrame
    alpha: float
    NOTE = (
        "Observational: chat-targeted impressions go to users who chatted recently about the topic; "
        "such users may differ from others in their propensity to click, so these contrasts are "
        "associations, not causal lifts. p-values are BH-adjusted across the categories tested."
    )

    def summary(self) -> pd.DataFrame:
        t = self.table
        return pd.DataFrame(
            {
                "categories tested": [int(t["tested"].sum())],
                "significant after BH": [int(t["significant_bh"].sum())],
                "median rel lift": [t.loc[t["tested"], "rel_lift"].median()],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def display(self, min_cell_users: int = 10, top: int = 30) -> pd.DataFrame:
        """The table for publication: main columns, user counts below k suppressed."""
        from analysis.privacy import suppress_small_cells

        cols = ["ad_category", "label", "users_chat", "users_other", "ctr_chat", "ctr_other", "rel_lift", "rel_ci_low", "rel_ci_high",
                "p_value", "p_bh", "significant_bh", "truth", "design"]
        t = self.table[self.table["tested"]].head(top)[cols]
        if t["truth"].isna().all():
            t = t.drop(columns="truth")
        return suppress_small_cells(t, ["users_chat", "users_other"], k=min_cell_users)

    def plot(self, ax=None, top: int = 25):
        import matplotlib.pyplot as plt

        t = self.table[self.table["tested"]].sort_values("n_chat_impressions", ascending=False).head(top).iloc[::-1]
        if ax is None:
            fig, ax = plt.subplots(figsize=(8, 0.28 * max(len(t), 4) + 1))
        y = np.arange(len(t))
        # clip to a readable range (a category with few clicks can have a huge relative CI)
        x = np.clip(t["rel_lift"].to_numpy(float), -1, 5)
        lo = np.minimum(np.clip(t["rel_ci_low"].to_numpy(float), -1, 5), x)
        hi = np.maximum(np.clip(t["rel_ci_high"].to_numpy(float), -1, 5), x)
        ax.errorbar(x, y, xerr=[x - lo, hi - x], fmt="o", ms=4, capsize=2, color="tab:blue", label="estimate, 95% CI (clipped to [-1, 5])")
        if "truth" in t and t["truth"].notna().any():
            ax.plot(t["truth"], y, "x", color="tab:green", label="true lift (simulation)")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, t["label"].fillna(t["ad_category"]).str.slice(0, 40))
        ax.set_xlabel("relative CTR difference, chat-targeted vs other (observational)")
        ax.legend(frameon=False, fontsize=8)
        ax.figure.tight_layout()
        return ax.figure


class CategoryLift:
    """Per ad category, included regions after the date: WLS of user x (chat-targeted or not) CTR on
    a chat indicator (weights = impressions, user-clustered SEs, t reference), relative lift =
    b_chat / b_0 with delta and Fieller CIs, impression-level two-proportion p for reference, BH."""

    def __init__(self, alpha: float = 0.05, min_users: int = 10, labels: pd.Series | None = None):
        self.alpha = alpha
        self.min_users = min_users
        self.labels = labels

    def fit(self, data: LiftData, truth: dict | None = None) -> CategoryLiftResult:
        cells = data.category_cells
        if cells is None or cells.empty:
            raise ValueError("no per-category cells: the impressions lack targeting_sources or ad_category")
        rows = []
        for cat, g in cells.groupby("ad_category", sort=True):
            uc = g.loc[g["chat"], "user"].nunique()
            uo = g.loc[~g["chat"], "user"].nunique()
            r = {"ad_category": cat, "users_chat": uc, "users_other": uo,
                 "n_chat_impressions": int(g.loc[g["chat"], "impressions"].sum()),
                 "n_other_impressions": int(g.loc[~g["chat"], "impressions"].sum())}
            ck, ok = g.loc[g["chat"], "clicks"].sum(), g.loc[~g["chat"], "clicks"].sum()
            r["ctr_chat"] = ck / r["n_chat_impressions"] if r["n_chat_impressions"] else np.nan
            r["ctr_other"] = ok / r["n_other_impressions"] if r["n_other_impressions"] else np.nan
            r["tested"] = bool(uc >= self.min_users and uo >= self.min_users and ok > 0)
            if r["tested"]:
                X = np.column_stack([np.ones(len(g)), g["chat"].to_numpy(float)])
                y = (g["clicks"] / g["impressions"]).to_numpy()
                res = sm.WLS(y, X, weights=g["impressions"].to_numpy(float)).fit(
                    cov_type="cluster", cov_kwds={"groups": g["user"].to_numpy()}, use_t=True)
                b, V = res.params, res.cov_params()
                df = g["user"].nunique() - 1
                rc = ratio_ci(b[1], b[0], V[1, 1], V[0, 0], V[0, 1], df=df, alpha=self.alpha)
                r.update(rel_lift=rc["ratio"], rel_ci_low=rc["delta_ci"][0], rel_ci_high=rc["delta_ci"][1],
                         rel_ci_fieller_low=rc["fieller_ci"][0], rel_ci_fieller_high=rc["fieller_ci"][1],
                         p_value=float(res.pvalues[1]))
                if ck > 0:
                    r["p_two_proportion_naive"] = float(test_proportions_2indep(ck, r["n_chat_impressions"], ok, r["n_other_impressions"]).pvalue)
            rows.append(r)
        t = pd.DataFrame(rows)
        for col in ("rel_lift", "rel_ci_low", "rel_ci_high", "rel_ci_fieller_low", "rel_ci_fieller_high", "p_value", "p_two_proportion_naive"):
            if col not in t:
                t[col] = np.nan
        t["p_bh"] = np.nan
        tested = t["tested"].to_numpy()
        if tested.any():
            t.loc[tested, "p_bh"] = multipletests(t.loc[tested, "p_value"].to_numpy(), alpha=self.alpha, method="fdr_bh")[1]
        t["significant_bh"] = t["p_bh"] < self.alpha
        t["label"] = t["ad_category"].map(self.labels) if self.labels is not None else None
        t["truth"] = t["ad_category"].map(truth) if truth else np.nan
        t["design"] = "observational"
        return CategoryLiftResult(t.sort_values("n_chat_impressions", ascending=False).reset_index(drop=True), self.alpha)


# ----------------------------------------------------------------------- the stage


@dataclass
class LiftReport:
    """All engagement-lift estimates of one audit run."""

    data: LiftData
    did: DiDResult | None  # None when the log lacks a group x period cell (e.g. no excluded regions)
    event_study: EventStudyResult | None
    randomization: RandomizationResult | None
    cuped: TwoGroupResult | None  # included vs excluded, post period, pre-period CTR covariate
    ab: ABResult | None
    categories: CategoryLiftResult | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        parts = [r.summary() for r in (self.did, self.cuped, self.ab) if r is not None]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def to_frame(self, ground_truth: dict | None = None) -> pd.DataFrame:
        """Headline estimates with CIs, the estimand each targets and (for simulated worlds) its truth."""
        lt = (ground_truth or {}).get("lift", {})
        inc, arm = lt.get("included_post", {}), lt.get("treatment_arm", {})
        d, c = self.did, self.cuped
        rows = []
        if d is not None:
            rows += [
                ("did_abs_lift", d.abs_lift, d.ci, "included_post", inc.get("abs"), d.p_value),
                ("did_rel_lift", d.rel_lift, d.rel_ci_delta, "included_post", inc.get("rel"), d.p_value),
                ("did_rel_lift_fieller", d.rel_lift, d.rel_ci_fieller, "included_post", inc.get("rel"), d.p_value),
            ]
        if c is not None:
            rows += [
                ("cuped_abs_lift", c.abs_lift, c.ci, "included_post", inc.get("abs"), c.p_value),
                ("cuped_rel_lift", c.rel_lift, c.rel_ci_delta, "included_post", inc.get("rel"), c.p_value),
                ("cuped_rel_lift_fieller", c.rel_lift, c.rel_ci_fieller, "included_post", inc.get("rel"), c.p_value),
            ]
        if self.ab is not None:
            a, ac = self.ab.plain, self.ab.cuped
            rows += [
                ("ab_abs_lift", a.abs_lift, a.ci, "treatment_arm", arm.get("abs"), a.p_value),
                ("ab_rel_lift", a.rel_lift, a.rel_ci_delta, "treatment_arm", arm.get("rel"), a.p_value),
                ("ab_rel_lift_fieller", a.rel_lift, a.rel_ci_fieller, "treatment_arm", arm.get("rel"), a.p_value),
                ("ab_cuped_abs_lift", ac.abs_lift, ac.ci, "treatment_arm", arm.get("abs"), ac.p_value),
                ("ab_cuped_rel_lift", ac.rel_lift, ac.rel_ci_delta, "treatment_arm", arm.get("rel"), ac.p_value),
            ]
        out = pd.DataFrame(rows, columns=["metric", "estimate", "ci", "estimand", "truth", "p_value"])
        out["ci_low"] = [x[0] for x in out["ci"]]
        out["ci_high"] = [x[1] for x in out["ci"]]
        out["covers_truth"] = [(lo <= t <= hi) if t is not None else None for lo, hi, t in zip(out["ci_low"], out["ci_high"], out["truth"])]
        return out.drop(columns="ci")[["metric", "estimand", "estimate", "ci_low", "ci_high", "truth", "covers_truth", "p_value"]]

    def record_metrics(self, run_dir: str | Path, ground_truth: dict | None = None):
        from analysis.metrics import MetricsRecorder

        m = MetricsRecorder(run_dir, "04_engagement_lift")
        nd = self.did.n_users if self.did is not None else None
        for r in self.to_frame(ground_truth).itertuples():
            n = self.ab.plain.n_treated + self.ab.plain.n_control if r.metric.startswith("ab_") and self.ab else nd
            m.add(r.metric, r.estimate, ci=(r.ci_low, r.ci_high), truth=r.truth, n=n, group={"estimand": r.estimand})
        m.add("impressions", self.data.n_impressions)
        if self.did is not None:
            m.add("did_p_value", self.did.p_value, n=nd)
        if self.cuped is not None:
            m.add("cuped_variance_reduction", self.cuped.variance_reduction, n=self.cuped.n_treated + self.cuped.n_control)
        if self.event_study is not None:
            m.add("pretrend_p_value", self.event_study.pretrend_p)
        if self.randomization is not None:
            m.add("randomization_p_value", self.randomization.p_value, n=self.randomization.n_regions)
        if self.ab is not None:
            m.add("ab_srm_p_value", self.ab.srm_p, n=sum(self.ab.n_users.values()))
            m.add("ab_srm_flag", self.ab.srm_flag)
            m.add("ab_permutation_p_value", self.ab.permutation_p, n=sum(self.ab.n_users.values()))
            m.add("ab_cuped_variance_reduction", self.ab.cuped.variance_reduction)
            m.add("ab_mde_rel", self.ab.power["mde_rel_plain"])
            m.add("ab_cuped_mde_rel", self.ab.power["mde_rel_cuped"])
        if self.categories is not None:
            for r in self.categories.table[self.categories.table["tested"]].itertuples():
                m.add("category_rel_lift", r.rel_lift, group={"ad_category": r.ad_category, "design": "observational"},
                      ci=(r.rel_ci_low, r.rel_ci_high), truth=None if pd.isna(r.truth) else r.truth,
                      n=r.users_chat + r.users_other)
            m.add("categories_significant_bh", int(self.categories.table["significant_bh"].sum()))
        m.write()
        return m


def analyse(
    data: LiftData,
    *,
    alpha: float = 0.05,
    expected_holdout_share: float | None = 0.10,
    target_rel_lift: float = 0.05,
    n_permutations: int = 5000,
    min_cell_users: int = 10,
    event_study: bool = True,
    seed: int = 0,
    ground_truth: dict | None = None,
) -> LiftReport:
    """Every estimator of the stage on one LiftData; parts that the data cannot support are skipped with a note."""
    notes = []

    def attempt(name, f):
        try:
            return f()
        except ValueError as e:
            notes.append(f"{name} skipped: {e}")
            return None

    did = attempt("difference-in-differences", lambda: DiffInDiff(alpha).fit(data))
    pu = data.per_user()
    cuped = attempt("region CUPED", lambda: Cuped(alpha).fit_users(pu, pu["included"].to_numpy(), "CUPED (included vs excluded, post; pre-period CTR)"))
    es = attempt("event study", lambda: EventStudy(alpha=alpha).fit(data)) if event_study and did is not None else None
    ri = attempt("randomization inference", lambda: RegionRandomization(n_permutations=n_permutations, seed=seed).fit(data)) if did is not None else None
    ab = None
    if data.users["arm"].notna().any():
        try:
            ab = ABTest(alpha, expected_holdout_share, target_rel_lift=target_rel_lift, n_permutations=n_permutations, seed=seed).fit(data)
        except ValueError as e:
            notes.append(f"A/B skipped: {e}")
    else:
        notes.append("A/B skipped: the impressions carry no arm")
    cats = None
    if data.category_cells is not None:
        from analysis.taxonomy import load_taxonomy

        labels = load_taxonomy().set_index("id")["path"]
        truth = ((ground_truth or {}).get("lift") or {}).get("by_category_matched_lift")
        try:
            cats = CategoryLift(alpha, min_cell_users, labels).fit(data, truth)
        except ValueError as e:
            notes.append(f"per-category lift skipped: {e}")
    if ab is not None:
        notes += [f"A/B: {w}" for w in ab.warnings]
    if es is not None and es.pretrend_p < alpha:
        notes.append(f"pre-trend test rejects parallel trends (p = {es.pretrend_p:.3g}): the DiD and region CUPED estimates are suspect")
    return LiftReport(data, did, es, ri, cuped, ab, cats, notes)


def run_stage(run_dir: str | Path, input_dir: str | Path | None = None, **settings) -> tuple[LiftReport | None, dict | None]:
    """Read stage 00's impressions and users, analyse, record metrics (with truth when simulated).
    Returns (None, truth) when the run has no impression log."""
    from analysis.io import read_ground_truth

    from analysis.metrics import MetricsRecorder

    data_dir = Path(run_dir) / "data"
    gt = read_ground_truth(input_dir) if input_dir and Path(input_dir).is_dir() else None
    if not (data_dir / "impressions.parquet").exists():
        # a chat-only corpus (e.g. a ChatGPT export): nothing to estimate, and the run goes on
        m = MetricsRecorder(run_dir, "04_engagement_lift")
        m.add("impressions", 0)
        m.write()
        return None, gt
    from analysis import engine as eng

    users = pd.read_parquet(data_dir / "users.parquet", columns=["user_id", "region"])
    policy_date = settings.pop("policy_date", DEFAULT_POLICY_DATE)
    excluded_regions = settings.pop("excluded_regions", None)
    dask_scheduler = settings.pop("dask_scheduler", None)
    if eng.check_engine(settings.pop("engine", "pandas")) == "dask":  # Dask groupby: the log never reaches the driver
        data = eng.aggregate(data_dir / "impressions.parquet", users, policy_date=policy_date, excluded_regions=excluded_regions,
                             c=eng.client(dask_scheduler))
    else:
        imp = read_impressions(data_dir / "impressions.parquet")
        data = aggregate(imp, users, policy_date=policy_date, excluded_regions=excluded_regions)
        del imp
    report = analyse(data, ground_truth=gt, **settings)
    report.record_metrics(run_dir, gt)
    return report, gt


def _fmt_ci(ci, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


# ------------------------------------------------------------- validation by simulation


def validate_world(world_config: dict, *, expected_holdout_share: float | None = None, alpha: float = 0.05, n_permutations: int = 200) -> dict:
    """Simulate one world, run the headline estimators, and compare with its truth.

    Returns p-values, whether each CI covers its truth, and the CUPED variance reductions: one row
    of a coverage / false-positive study (tests/test_lift_simulation.py, docs/lift.md).
    """
    from analysis.simulate import simulate

    w = simulate(world_config)
    h = expected_holdout_share if expected_holdout_share is not None else w.config.holdout_share
    d = aggregate(w.impressions.drop(columns=["targeting_sources"]), w.users, policy_date=w.config.policy_date,
                  excluded_regions=w.config.excluded_regions)
    did = DiffInDiff(alpha).fit(d)
    pu = d.per_user()
    cu = Cuped(alpha).fit_users(pu, pu["included"].to_numpy())
    ab = ABTest(alpha, h, n_permutations=n_permutations, seed=w.config.seed).fit(d)
    ri = RegionRandomization(n_permutations=n_permutations, seed=w.config.seed).fit(d)
    lt = w.ground_truth["lift"]
    inc, arm = lt["included_post"], lt["treatment_arm"]

    def covers(ci, x):
        return bool(ci[0] <= x <= ci[1])

    return {
        "seed": w.config.seed, "mode": w.config.mode, "truth_rel": inc["rel"], "truth_ab_rel": arm["rel"],
        "did_p": did.p_value, "cuped_p": cu.p_value, "ab_p": ab.plain.p_value, "ab_cuped_p": ab.cuped.p_value,
        "ab_perm_p": ab.permutation_p, "ri_p": ri.p_value,
        "did_abs_cov": covers(did.ci, inc["abs"]), "did_rel_cov": covers(did.rel_ci_delta, inc["rel"]),
        "did_rel_fieller_cov": covers(did.rel_ci_fieller, inc["rel"]),
        "cuped_abs_cov": covers(cu.ci, inc["abs"]), "cuped_rel_cov": covers(cu.rel_ci_delta, inc["rel"]),
        "cuped_rel_fieller_cov": covers(cu.rel_ci_fieller, inc["rel"]),
        "ab_abs_cov": covers(ab.plain.ci, arm["abs"]), "ab_rel_cov": covers(ab.plain.rel_ci_delta, arm["rel"]),
        "ab_rel_fieller_cov": covers(ab.plain.rel_ci_fieller, arm["rel"]),
        "ab_cuped_abs_cov": covers(ab.cuped.ci, arm["abs"]), "ab_cuped_rel_cov": covers(ab.cuped.rel_ci_delta, arm["rel"]),
        "cuped_vr": cu.variance_reduction, "ab_cuped_vr": ab.cuped.variance_reduction, "srm_flag": ab.srm_flag,
    }
