"""Region-level inference for a policy assigned by region.

The policy is switched on by region (included vs excluded), so regions, not users, are the units
that were "assigned": a region x period CTR shock moves all of a region's users together, and an
interval clustered by user ignores it (issue 14: 11-27% false positives at 2-5% shocks). Everything
here works on region x period sufficient statistics (clicks, impressions), which is exact for the
saturated group x period models used (the coefficients and the region-clustered scores depend on
the data only through these sums).

`RegionDiD` estimates the relative lift of included-region impressions after the policy date as a
multiplicative difference in differences (ratio of CTR ratios): theta = log(R_inc,post / R_inc,pre)
- log(R_exc,post / R_exc,pre), rel lift = exp(theta) - 1. Multiplicative parallel trends survive
regional baseline CTR differences under a common multiplicative season, where additive ones do not.
Inference:

- CR3 (jackknife over regions; Bell-McCaffrey-type small-cluster variance) with a Welch-Satterthwaite
  t reference built from the two groups' jackknife components (few clusters per group -> few df);
- studentized randomization inference over regions: the included label is re-assigned over regions
  (same number included), the CR3 t statistic recomputed; exact enumeration up to `max_exact`
  assignments. Regions were not assigned at random, so it is a test "as if" they were; its value is
  that region-level shocks are in its null distribution and studentization keeps it valid when
  region sizes and variances differ (Young 2019; MacKinnon & Webb 2020).

The number of regions (clusters) per group stands beside every interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from analysis.lift.did import plot_event_study
from analysis.util.stats import region_assignments


@dataclass
class RegionCells:
    """Clicks and impressions per region and period (pre / post) and whether the region is included."""

    region: np.ndarray
    included: np.ndarray
    clicks: np.ndarray  # (R, 2): pre, post
    impressions: np.ndarray  # (R, 2)

    def __post_init__(self):
        self.region = np.asarray(self.region).astype(str)
        self.included = np.asarray(self.included, bool)
        self.clicks = np.asarray(self.clicks, float).reshape(-1, 2)
        self.impressions = np.asarray(self.impressions, float).reshape(-1, 2)
        if not (len(self.region) == len(self.included) == len(self.clicks) == len(self.impressions)):
            raise ValueError("RegionCells: region, included, clicks and impressions must have one row per region")
        if (self.impressions <= 0).any():
            bad = self.region[(self.impressions <= 0).any(axis=1)]
            raise ValueError(f"RegionCells: regions without impressions in a period: {list(bad)} (drop them or pool them)")
        if (self.clicks < 0).any() or (self.clicks > self.impressions).any():
            raise ValueError("RegionCells: clicks must lie in [0, impressions]")

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "RegionCells":
        """From rows of (region, included, post, clicks, impressions), e.g. user-period rows: summed per region x period."""
        missing = {"region", "included", "post", "clicks", "impressions"} - set(df.columns)
        if missing:
            raise ValueError(f"RegionCells.from_frame: missing column(s) {sorted(missing)}")
        inc = df.groupby("region")["included"].agg(["min", "max"])
        mixed = inc.index[inc["min"] != inc["max"]]
        if len(mixed):
            raise ValueError(f"RegionCells.from_frame: regions both included and excluded: {list(mixed)}")
        g = df.groupby(["region", "post"])[["clicks", "impressions"]].sum().unstack("post", fill_value=0)
        for col in (("clicks", False), ("clicks", True), ("impressions", False), ("impressions", True)):
            if col not in g:
                g[col] = 0
        return cls(
            g.index.to_numpy(), inc["min"].reindex(g.index).to_numpy(bool),
            np.column_stack([g[("clicks", False)], g[("clicks", True)]]),
            np.column_stack([g[("impressions", False)], g[("impressions", True)]]),
        )

    @property
    def n_regions(self) -> tuple[int, int]:
        return int(self.included.sum()), int((~self.included).sum())


def _log_rr(A: np.ndarray, c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """theta for each assignment row of A (R regions, True = included): log ratio of CTR ratios."""
    A = A.astype(float)
    B = 1.0 - A
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = lambda M, t: np.log(M @ c[:, t]) - np.log(M @ n[:, t])  # noqa: E731
        return (lr(A, 1) - lr(A, 0)) - (lr(B, 1) - lr(B, 0))


def _jackknife(A: np.ndarray, c: np.ndarray, n: np.ndarray):
    """theta, CR3 variance (jackknife over regions, per group) and its Welch-Satterthwaite df, for each
    assignment row of A. The two groups' components are independent, so V = V_inc + V_exc with
    V_g = (G_g - 1) / G_g * sum_{r in g} (theta_(-r) - mean_g)^2."""
    A = np.atleast_2d(A).astype(bool)
    K, R = A.shape
    theta = _log_rr(A, c, n)
    # leave-one-out group sums: for region r, subtract its cells from its own group's sums
    Af = A.astype(float)
    Bf = 1.0 - Af
    tot = {}
    for name, M in (("A", Af), ("B", Bf)):
        tot[name] = (M @ c, M @ n)  # (K, 2) each
    comp = np.zeros((K, 2))
    dfden = np.zeros(K)
    for gi, (M, other) in enumerate(((Af, "B"), (Bf, "A"))):
        own = "A" if gi == 0 else "B"
        cs, ns = tot[own]
        co, no = tot[other]
        lo_other = (np.log(co[:, 1]) - np.log(no[:, 1])) - (np.log(co[:, 0]) - np.log(no[:, 0]))
        # (K, R, 2) sums without region r (only meaningful where M[k, r] == 1)
        c_loo = cs[:, None, :] - c[None, :, :]
        n_loo = ns[:, None, :] - n[None, :, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            lo_own = (np.log(c_loo[..., 1]) - np.log(n_loo[..., 1])) - (np.log(c_loo[..., 0]) - np.log(n_loo[..., 0]))
        th_loo = (lo_own - lo_other[:, None]) if gi == 0 else (lo_other[:, None] - lo_own)
        G = M.sum(axis=1)
        mean = np.where(M > 0, th_loo, 0.0).sum(axis=1) / np.maximum(G, 1)
        ss = np.where(M > 0, (th_loo - mean[:, None]) ** 2, 0.0).sum(axis=1)
        comp[:, gi] = (G - 1) / np.maximum(G, 1) * ss
        dfden += np.where(G > 1, comp[:, gi] ** 2 / np.maximum(G - 1, 1), np.inf)
    var = comp.sum(axis=1)
    df = var**2 / dfden
    return theta, var, df, comp


@dataclass
class RegionDiDResult:
    """Relative lift of included-region impressions after the date, inferred over regions."""

    rel_lift: float
    ci: tuple[float, float]
    theta: float  # log ratio of CTR ratios
    se: float  # CR3 (jackknife) SE of theta
    df: float
    p_value: float  # CR3 t test of theta = 0
    p_randomization: float  # studentized randomization inference over regions
    n_assignments: int
    exact: bool
    regions_included: int
    regions_excluded: int
    counterfactual_ctr: float
    abs_lift: float
    alpha: float
    caveat: str = ""
    cells: pd.DataFrame = field(default=None, repr=False)

    @property
    def clusters(self) -> str:
        return f"{self.regions_included} included + {self.regions_excluded} excluded regions"

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({
            "estimator": ["region DiD (multiplicative, CR3 over regions)"],
            "rel_lift": [self.rel_lift], "ci_low": [self.ci[0]], "ci_high": [self.ci[1]],
            "p_value": [self.p_value], "p_randomization": [self.p_randomization],
            "clusters": [self.clusters], "df": [self.df],
        })

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "quantity": "rel_lift", "estimate": self.rel_lift, "ci_low": self.ci[0], "ci_high": self.ci[1],
            "se_log": self.se, "df": self.df, "p_value": self.p_value, "p_randomization": self.p_randomization,
            "n_assignments": self.n_assignments, "exact": self.exact, "regions_included": self.regions_included,
            "regions_excluded": self.regions_excluded, "abs_lift": self.abs_lift,
            "counterfactual_ctr": self.counterfactual_ctr, "caveat": self.caveat,
        }])

    def to_markdown(self) -> str:
        return self.summary().to_markdown(index=False, floatfmt=".4g")


class RegionDiD:
    """Multiplicative DiD over regions with CR3 intervals and studentized randomization inference.

    `fit(cells)` takes `RegionCells` (or a frame for `RegionCells.from_frame`). Needs at least two
    regions per group; with fewer than `min_regions` per group the caveat says the interval rests on
    very few df and the randomization test has coarse resolution (1 / number of assignments).
    """

    def __init__(self, alpha: float = 0.05, n_permutations: int = 5000, max_exact: int = 20_000, seed: int = 0,
                 min_regions: int = 4):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.alpha, self.n_permutations, self.max_exact, self.seed, self.min_regions = alpha, n_permutations, max_exact, seed, min_regions

    def fit(self, cells: RegionCells | pd.DataFrame) -> RegionDiDResult:
        dropped = []
        if isinstance(cells, pd.DataFrame):
            df = cells
            n = df.groupby(["region", "post"])["impressions"].sum().unstack("post", fill_value=0)
            empty = n.index[(n.reindex(columns=[False, True], fill_value=0) <= 0).any(axis=1)]
            dropped = sorted(map(str, empty))
            cells = RegionCells.from_frame(df[~df["region"].isin(empty)])
        k, m = cells.n_regions
        if k < 2 or m < 2:
            raise ValueError(f"RegionDiD needs at least two included and two excluded regions; have {k} and {m}")
        c, n = cells.clicks, cells.impressions
        obs = cells.included[None, :]
        theta, var, df, _ = _jackknife(obs, c, n)
        theta, var, df = float(theta[0]), float(var[0]), float(df[0])
        se = math.sqrt(var)
        q = stats.t.ppf(1 - self.alpha / 2, df)
        t_obs = theta / se
        p = float(2 * stats.t.sf(abs(t_obs), df))
        A, exact, total = region_assignments(len(cells.region), k, self.max_exact, self.n_permutations, self.seed)
        th_a, var_a, _, _ = _jackknife(A, c, n)
        t_a = th_a / np.sqrt(var_a)
        tol = 1e-9 * max(1.0, abs(t_obs))
        extreme = int(np.sum(np.abs(t_a) >= abs(t_obs) - tol))
        p_ri = extreme / len(A) if exact else (1 + extreme) / (1 + len(A))
        R = lambda M, t: (M @ c[:, t]) / (M @ n[:, t])  # noqa: E731
        inc = cells.included.astype(float)
        ctr_post = R(inc, 1)
        cf = ctr_post / math.exp(theta)
        caveats = []
        if min(k, m) < self.min_regions:
            caveats.append(f"only {min(k, m)} regions in one group: the interval rests on ~{df:.1f} df and the "
                           f"randomization p-value cannot go below {1 / total:.3g}")
        if dropped:
            caveats.append(f"regions without impressions before or after the date left out: {', '.join(dropped)}")
        caveats.append("regions were not randomized: the randomization p-value treats the assignment as if they were; "
                       "the estimate assumes multiplicative parallel trends")
        table = pd.DataFrame({"region": cells.region, "included": cells.included, "clicks_pre": c[:, 0], "clicks_post": c[:, 1],
                              "impressions_pre": n[:, 0], "impressions_post": n[:, 1]})
        return RegionDiDResult(
            rel_lift=math.expm1(theta), ci=(math.expm1(theta - q * se), math.expm1(theta + q * se)), theta=theta, se=se,
            df=df, p_value=p, p_randomization=float(p_ri), n_assignments=int(total), exact=exact,
            regions_included=k, regions_excluded=m, counterfactual_ctr=cf, abs_lift=ctr_post - cf, alpha=self.alpha,
            caveat="; ".join(caveats), cells=table,
        )


# ------------------------------------------------------------------------ event study


def region_week_cells(user_week: pd.DataFrame, users: pd.DataFrame):
    """(regions, included per region, weeks, clicks (R, W), impressions (R, W)) from LiftData.user_week
    and LiftData.users (index = user code; columns region, included)."""
    uw = user_week.join(users[["region", "included"]], on="user")
    inc = uw.groupby("region")["included"].agg(["min", "max"])
    if (inc["min"] != inc["max"]).any():
        raise ValueError(f"regions both included and excluded: {list(inc.index[inc['min'] != inc['max']])}")
    g = uw.groupby(["region", "week"])[["clicks", "impressions"]].sum()
    C = g["clicks"].unstack("week", fill_value=0).sort_index(axis=1)
    N = g["impressions"].unstack("week", fill_value=0).reindex_like(C).fillna(0)
    return (C.index.to_numpy().astype(str), inc["min"].reindex(C.index).to_numpy(bool), C.columns.to_numpy(int),
            C.to_numpy(float), N.to_numpy(float))


def _loo_gaps(A: np.ndarray, C: np.ndarray, N: np.ndarray):
    """For each assignment row of A (K, R): the included-minus-excluded gap in log pooled CTR per week (K, W),
    and the same with each region left out of its own group (K, R, W; NaN where the group would be empty)."""
    Af = A.astype(float)
    Bf = 1.0 - Af
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = lambda M: np.log(M @ C) - np.log(M @ N)  # noqa: E731
        la, lb = lg(Af), lg(Bf)
        gap = la - lb
        ca, na, cb, nb = Af @ C, Af @ N, Bf @ C, Bf @ N  # (K, W)
        # region r left out of its own group
        la_loo = np.log(ca[:, None, :] - C[None]) - np.log(na[:, None, :] - N[None])
        lb_loo = np.log(cb[:, None, :] - C[None]) - np.log(nb[:, None, :] - N[None])
        gap_loo = np.where(A[:, :, None], la_loo - lb[:, None, :], la[:, None, :] - lb_loo)
    return gap, gap_loo


def _cr3(stat: np.ndarray, stat_loo: np.ndarray, A: np.ndarray):
    """CR3 (jackknife over regions, per group) variance of a statistic and its Welch-Satterthwaite df.
    stat: (K, ...) per assignment; stat_loo: (K, R, ...) with region r left out."""
    var = np.zeros(stat.shape)
    dfden = np.zeros(stat.shape)
    for M in (A, ~A):
        G = M.sum(axis=1).astype(float)
        shape = (len(G),) + (1,) * (stat.ndim - 1)
        m = M.reshape(M.shape + (1,) * (stat.ndim - 1))
        mean = np.where(m, stat_loo, 0.0).sum(axis=1) / G.reshape(shape)
        ss = np.where(m, (stat_loo - mean[:, None]) ** 2, 0.0).sum(axis=1)
        comp = ((G - 1) / G).reshape(shape) * ss
        var += comp
        dfden += comp**2 / np.maximum(G - 1, 1).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        return var, var**2 / dfden


@dataclass
class RegionEventStudyResult:
    """Week-by-week multiplicative DiD against the reference week, inferred over regions, and the
    region-level pre-trend test (linear slope of the included-excluded gap over the pre-period weeks)."""

    coefs: pd.DataFrame  # week, estimate (log ratio of CTR ratios), se, ci_low, ci_high, p_value, df, period
    ref_week: int
    pretrend_slope: float  # per week, log scale
    pretrend_se: float
    pretrend_df: float
    pretrend_p: float  # CR3 t test of slope = 0
    pretrend_p_randomization: float  # studentized, over regions
    regions_included: int
    regions_excluded: int
    pretrend_f: float = np.nan  # no joint F: with ~20 regions the pre-period covariance cannot be estimated
    scale: str = "log CTR ratio gap vs. reference week"

    def summary(self) -> pd.DataFrame:
        pre = self.coefs[self.coefs["period"] == "pre"]
        post = self.coefs[self.coefs["period"] == "post"]
        return pd.DataFrame({
            "weeks_pre": [len(pre)], "weeks_post": [len(post)],
            "pretrend_slope_per_week": [self.pretrend_slope], "pretrend_p": [self.pretrend_p],
            "pretrend_p_randomization": [self.pretrend_p_randomization],
            "regions": [f"{self.regions_included} included + {self.regions_excluded} excluded"],
            "mean_post_coef": [post["estimate"].mean()],
            "pre_coefs_outside_CI_of_0": [int(((pre["ci_low"] > 0) | (pre["ci_high"] < 0)).sum())],
        })

    def to_frame(self) -> pd.DataFrame:
        return self.coefs.copy()

    def plot(self, ax=None, truth: float | None = None):
        """Coefficients with their region-level CIs; `truth` is a relative lift (drawn as log(1 + truth))."""
        return plot_event_study(self.coefs, self.ref_week, ax=ax, truth=math.log1p(truth) if truth is not None and truth > -1 else None,
                                ylabel=self.scale, title=f"Event study over {self.regions_included} + {self.regions_excluded} regions "
                                                         f"(pre-trend slope p = {self.pretrend_p:.3f}, CR3)")


class RegionEventStudy:
    """Event study at the level the policy was assigned: for each week w, theta_w = gap_w - gap_ref with
    gap = log pooled CTR of included minus excluded regions (a multiplicative DiD per week), CR3 over
    regions with Welch-Satterthwaite df. Pre-trend test: the OLS slope of gap_w on w over the pre-period
    weeks, CR3 t test and studentized randomization over regions. A joint F-test of every pre-period
    coefficient is not used: with ~20 regions its covariance (one dimension per pre week) is not estimable.
    """

    def __init__(self, ref_week: int = -1, alpha: float = 0.05, n_permutations: int = 2000, max_exact: int = 5000, seed: int = 0):
        self.ref_week, self.alpha, self.n_permutations, self.max_exact, self.seed = ref_week, alpha, n_permutations, max_exact, seed

    def fit(self, data=None, *, cells=None) -> RegionEventStudyResult:
        """`data`: LiftData (user_week, users), or `cells` = (regions, included, weeks, clicks (R, W), impressions (R, W))."""
        regions, inc, weeks, C, N = cells if cells is not None else region_week_cells(data.user_week, data.users)
        keep = (N > 0).all(axis=0)
        if not keep.all():  # a week in which some region has no impressions cannot be compared
            weeks, C, N = weeks[keep], C[:, keep], N[:, keep]
        k, m = int(inc.sum()), int((~inc).sum())
        if k < 2 or m < 2:
            raise ValueError(f"a region-level event study needs at least two included and two excluded regions; have {k} and {m}")
        if self.ref_week not in weeks:
            raise ValueError(f"reference week {self.ref_week} has no impressions in every region")
        pre = weeks < 0
        if pre.sum() < 3:
            raise ValueError(f"the pre-trend test needs at least 3 pre-period weeks; have {int(pre.sum())}")
        A0 = inc[None, :]
        gap, gap_loo = _loo_gaps(A0, C, N)
        ref = int(np.flatnonzero(weeks == self.ref_week)[0])
        th, th_loo = gap - gap[:, [ref]], gap_loo - gap_loo[:, :, [ref]]
        var, df = _cr3(th, th_loo, A0)
        others = weeks != self.ref_week
        est, se, dfw = th[0, others], np.sqrt(var[0, others]), df[0, others]
        q = stats.t.ppf(1 - self.alpha / 2, np.maximum(dfw, 1))
        wk = weeks[others]
        with np.errstate(divide="ignore", invalid="ignore"):
            coefs = pd.DataFrame({"week": wk, "estimate": est, "se": se, "ci_low": est - q * se, "ci_high": est + q * se,
                                  "p_value": 2 * stats.t.sf(np.abs(est / se), np.maximum(dfw, 1)), "df": dfw,
                                  "period": np.where(wk < 0, "pre", "post")})
        # pre-trend slope: OLS of the gap on week over pre-period weeks, for each assignment
        x = weeks[pre].astype(float)
        h = (x - x.mean()) / ((x - x.mean()) ** 2).sum()

        def slope_t(A):
            g, gl = _loo_gaps(A, C, N)
            b, bl = g[:, pre] @ h, gl[:, :, pre] @ h
            v, d = _cr3(b, bl, A)
            return b, v, d

        b, v, d = slope_t(A0)
        b, v, d = float(b[0]), float(v[0]), float(d[0])
        t_obs = b / math.sqrt(v)
        p = float(2 * stats.t.sf(abs(t_obs), max(d, 1)))
        A, exact, _ = region_assignments(len(regions), k, self.max_exact, self.n_permutations, self.seed)
        bb, vv, _ = slope_t(A)
        tt = bb / np.sqrt(vv)
        extreme = int(np.sum(np.abs(tt) >= abs(t_obs) - 1e-9 * max(1.0, abs(t_obs))))
        p_ri = extreme / len(A) if exact else (1 + extreme) / (1 + len(A))
        return RegionEventStudyResult(coefs, self.ref_week, b, math.sqrt(v), d, p, float(p_ri), k, m)
