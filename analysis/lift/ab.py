"""Two-group comparisons: CUPED and the treatment/holdout A/B test with its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import TTestIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    test_proportions_2indep,
)

from analysis.impressions import ARMS, LiftData
from analysis.lift.estimate import LiftEstimate
from analysis.util.stats import ratio_ci

# ---------------------------------------------------------------------------- CUPED


@dataclass
class TwoGroupResult(LiftEstimate):
    """Ratio-metric (CTR) comparison of two groups of users, optionally CUPED-adjusted."""

    label: str
    n_treated: int
    n_control: int
    ctr_treated: float
    ctr_control: float
    theta: float
    se_unadjusted: float
    variance_reduction: float  # 1 - Var(adjusted) / Var(unadjusted) of the abs lift

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({
            **self._summary_columns(self.label),
            "theta": [self.theta],
            "variance_reduction": [self.variance_reduction],
            "users (T / C)": [f"{self.n_treated} / {self.n_control}"],
        })

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
            abs_lift=diff, se=se, ci=(diff - q * se, diff + q * se), p_value=p, df=df,
            rel_lift=rel["ratio"], rel_se=rel["se"], rel_ci_delta=rel["delta_ci"], rel_ci_fieller=rel["fieller_ci"],
            label=label, n_treated=t.n, n_control=c.n, ctr_treated=t.ctr_post, ctr_control=c.ctr_post, theta=theta,
            se_unadjusted=math.sqrt(var0), variance_reduction=1 - var / var0,
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
        if placebo is not None and placebo.p_value < 0.10:
            # a chance imbalance between the arms carries into the plain post-period lift; CUPED adjusts for it
            warnings.append(f"the arms already differed before the policy date (pre-period placebo {placebo.rel_lift:+.1%}, "
                            f"p = {placebo.p_value:.2g}): the plain A/B lift carries that imbalance; use the CUPED lift (the headline)")
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
