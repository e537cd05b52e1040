"""Per ad category (observational): CTR of chat-targeted vs other impressions of the same category."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.stats.proportion import test_proportions_2indep

from analysis.impressions import LiftData
from analysis.util.privacy import suppress_small_cells
from analysis.util.stats import p_adjust, ratio_ci

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

    def fit(self, data: LiftData) -> CategoryLiftResult:
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
            t.loc[tested, "p_bh"] = p_adjust(t.loc[tested, "p_value"].to_numpy(), "fdr_bh", self.alpha)
        t["significant_bh"] = t["p_bh"] < self.alpha
        t["label"] = t["ad_category"].map(self.labels) if self.labels is not None else None
        t["truth"] = np.nan  # set by analysis.validation.truth.evaluate_lift for simulated worlds
        t["design"] = "observational"
        return CategoryLiftResult(t.sort_values("n_chat_impressions", ascending=False).reset_index(drop=True), self.alpha)
