"""White-box leak rates: the share of a category's conversations that passed the filter, with exact and Wilson CIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.leakage.data import GROUPS
from analysis.leakage.plots import forest_plot
from analysis.util.privacy import suppress_small_cells
from analysis.util.stats import binom_cis, p_adjust


@dataclass
class LeakRateResult:
    """Leak rate per category and region group with CIs, tolerance tests and (simulated worlds) truth."""
    table: pd.DataFrame
    alpha: float
    tolerance: float
    basis: str
    min_cell: int = 10

    def summary(self) -> pd.DataFrame:
        """The publishable table: counts below `min_cell` suppressed, rates of such cells withheld."""
        t = self.table.copy()
        small = (t["n"] > 0) & (t["n"] < self.min_cell)
        for c in ("leak_rate", "cp_low", "cp_high", "wilson_low", "wilson_high"):
            t[c] = t[c].where(~small)
        t = suppress_small_cells(t, ["n", "passed"], k=self.min_cell, complementary=False)
        cols = ["category", "region_group", "n", "passed", "leak_rate", "cp_low", "cp_high", "wilson_low", "wilson_high",
                "p_tolerance", "p_holm", "p_bh", "exceeds_tolerance_holm"]
        cols += [c for c in ("truth", "covers_truth_cp", "covers_truth_wilson") if c in t]
        return t[cols]

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, ax=None, group: str = "all", others: dict[str, pd.DataFrame] | None = None):
        """Forest plot: one row per category, Wilson interval (and other estimators' rows beside), truth as x."""
        t = self.table[self.table["region_group"] == group].copy()
        small = (t["n"] > 0) & (t["n"] < self.min_cell)  # withheld in the plot as in the table
        t.loc[small, ["leak_rate", "wilson_low", "wilson_high", "cp_low", "cp_high"]] = np.nan
        return forest_plot(t, ax=ax, tolerance=self.tolerance,
                           others={k: v[v["region_group"] == group] for k, v in (others or {}).items()},
                           label=f"{self.basis} (Wilson)")


class WhiteBoxLeakage:
    """Share of the conversations about each category that passed the platform's filter.

    `fit(passed, member, group)`: `passed` (bool per conversation), `member` (conversation x
    category booleans: which conversations are about which category), `group` (region group per
    conversation: "included" / "excluded"). A conversation about several categories counts in each.
    """

    def __init__(self, alpha: float = 0.05, tolerance: float = 0.01, min_cell: int = 10):
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
        self.alpha, self.tolerance, self.min_cell = alpha, tolerance, min_cell

    def fit(self, passed: pd.Series, member: pd.DataFrame, group: pd.Series, *, basis: str = "labels") -> LeakRateResult:
        passed = passed.reindex(member.index)
        keep = passed.notna().to_numpy()
        P = passed.to_numpy()[keep].astype(bool)
        M = member.to_numpy()[keep]
        G = group.reindex(member.index).to_numpy()[keep]
        rows = []
        for g in GROUPS:
            gm = np.ones(len(P), dtype=bool) if g == "all" else (G == g)
            for j, c in enumerate(member.columns):
                m = gm & M[:, j]
                rows.append({"category": c, "region_group": g, "n": int(m.sum()), "passed": int((m & P).sum())})
        t = pd.DataFrame(rows)
        k, n = t["passed"].to_numpy(), t["n"].to_numpy()
        t["leak_rate"] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        t["cp_low"], t["cp_high"] = binom_cis(k, n, self.alpha, "beta")
        t["wilson_low"], t["wilson_high"] = binom_cis(k, n, self.alpha, "wilson")
        t["jeffreys_low"], t["jeffreys_high"] = binom_cis(k, n, self.alpha, "jeffreys")
        # H0: leak rate <= tolerance vs H1: above it (exact, one-sided)
        t["p_tolerance"] = [stats.binomtest(int(a), int(b), self.tolerance, alternative="greater").pvalue if b else np.nan for a, b in zip(k, n)]
        t["p_holm"], t["p_bh"] = np.nan, np.nan
        for g in GROUPS:
            m = (t["region_group"] == g) & t["p_tolerance"].notna()
            if m.any():
                t.loc[m, "p_holm"] = p_adjust(t.loc[m, "p_tolerance"], "holm", self.alpha)
                t.loc[m, "p_bh"] = p_adjust(t.loc[m, "p_tolerance"], "fdr_bh", self.alpha)
        t["exceeds_tolerance_holm"] = t["p_holm"] < self.alpha
        t["exceeds_tolerance_bh"] = t["p_bh"] < self.alpha
        t["basis"] = basis
        return LeakRateResult(t, self.alpha, self.tolerance, basis, self.min_cell)

    def by_region(self, passed: pd.Series, member: pd.DataFrame, region: pd.Series) -> pd.DataFrame:
        """Leak rate per category and region (Wilson CI); counts below min_cell suppressed."""
        passed = passed.reindex(member.index)
        keep = passed.notna()
        df = member[keep.to_numpy()].copy()
        df["_passed"] = passed[keep].astype(bool).to_numpy()
        df["region"] = region.reindex(df.index).to_numpy()
        long = df.melt(id_vars=["region", "_passed"], var_name="category", value_name="member")
        long = long[long["member"]]
        t = long.groupby(["category", "region"]).agg(n=("member", "size"), passed=("_passed", "sum")).reset_index()
        k, n = t["passed"].to_numpy(), t["n"].to_numpy()
        t["leak_rate"] = k / n
        t["wilson_low"], t["wilson_high"] = binom_cis(k, n, self.alpha, "wilson")
        small = t["n"] < self.min_cell
        t.loc[small, ["leak_rate", "wilson_low", "wilson_high"]] = np.nan
        return suppress_small_cells(t, ["n", "passed"], k=self.min_cell, complementary=False)
