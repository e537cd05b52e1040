"""Detector-based leak rates corrected for the detector's error (Rogan–Gladen per filter stratum)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.leakage.data import GROUPS
from analysis.util.privacy import suppress_small_cells
from analysis.util.stats import binom_cis

# ------------------------------------------------------------------ misclassification-corrected


@dataclass
class CorrectedResult:
    """Corrected leak rates per category and region group (`table`: raw and corrected rates, CIs,
    the detector's error rates used, cell counts)."""

    table: pd.DataFrame
    alpha: float
    min_cell: int = 10

    def summary(self) -> pd.DataFrame:
        """The publishable table: counts below `min_cell` suppressed, rates of such cells withheld."""
        t = self.table.copy()
        small = (t["n"] > 0) & (t["n"] < self.min_cell)
        for c in ("raw_rate", "raw_low", "raw_high", "leak_rate", "ci_low", "ci_high"):
            if c in t:
                t[c] = t[c].where(~small)
        return suppress_small_cells(t, ["n", "flagged"], k=self.min_cell, complementary=False)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()


class CorrectedLeakage:
    """Detector-based leak rate corrected for the detector's error (Rogan–Gladen per filter stratum).

    Within the passed (P) and blocked (B) strata, x_s conversations of N_s are flagged for c. With
    sensitivity Se and false-positive rate f = 1 - Sp (non-differential: the same in both strata),
    E[x_s] = Se T_s + f (N_s - T_s), so the Rogan–Gladen count of true-c conversations is
    T_s = (x_s - f N_s) / (Se - f), and the leak rate T_P / (T_P + T_B) = A / (A + B) with
    A = x_P - f N_P, B = x_B - f N_B: Se cancels, only the false-positive rate matters (missed
    conversations are missed equally often in both strata). The CI is the equal-tailed interval of
    draws of the four (stratum x flag) cell shares from their Jeffreys posterior Dirichlet(cells +
    1/2) and of f from Beta(fp + 1/2, tn + 1/2) (Se from Beta(tp + 1/2, fn + 1/2)): it carries the
    leak-rate sampling and the detector's error-rate uncertainty together (a Bayesian bootstrap;
    its frequentist coverage is checked by simulation, tests/test_leakage_simulation.py).

    The validation counts must come from conversations *not* in the counted set (the stage drops
    labeled conversations from the counts): otherwise f and x_P share the same false positives.
    With a `stratum` column in the validation frame ("passed" / "blocked"), f and Se are taken per
    stratum (differential misclassification) and Se no longer cancels.
    """

    def __init__(self, alpha: float = 0.05, n_boot: int = 4000, seed: int = 0, min_cell: int = 10):
        self.alpha, self.n_boot, self.seed, self.min_cell = alpha, n_boot, seed, min_cell

    def fit(self, passed: pd.Series, flags: pd.DataFrame, validation: pd.DataFrame, group: pd.Series, *,
            exclude: pd.Index | None = None) -> CorrectedResult:
        rng = np.random.default_rng(self.seed)
        passed = passed.reindex(flags.index)
        keep = passed.notna().to_numpy().copy()
        if exclude is not None:
            pos = flags.index.get_indexer(pd.Index(exclude).astype(str))
            keep[pos[pos >= 0]] = False
        P = passed.to_numpy()[keep].astype(bool)
        F = flags.to_numpy()[keep]
        G = group.reindex(flags.index).to_numpy()[keep]
        val = validation.set_index(["category", "stratum"] if "stratum" in validation else "category")
        rows = []
        for g in GROUPS:
            gm = np.ones(len(P), dtype=bool) if g == "all" else (G == g)
            for j, c in enumerate(flags.columns):
                cells = np.array([(gm & P & F[:, j]).sum(), (gm & P & ~F[:, j]).sum(), (gm & ~P & F[:, j]).sum(), (gm & ~P & ~F[:, j]).sum()])
                rows.append({"category": c, "region_group": g, **self._one(cells, val, c, rng)})
        return CorrectedResult(pd.DataFrame(rows), self.alpha, self.min_cell)

    def _one(self, cells: np.ndarray, val: pd.DataFrame, c: str, rng) -> dict:
        n = int(cells.sum())
        x_p, n_p, x_b, n_b = cells[0], cells[0] + cells[1], cells[2], cells[2] + cells[3]
        out = {"n": n, "n_passed": int(n_p), "flagged": int(x_p + x_b), "flagged_passed": int(x_p),
               "raw_rate": x_p / (x_p + x_b) if x_p + x_b else np.nan}
        lo, hi = binom_cis(np.array([x_p]), np.array([x_p + x_b]), self.alpha, "wilson")
        out["raw_low"], out["raw_high"] = float(lo[0]), float(hi[0])
        if "stratum" in val.index.names:
            vp, vb = val.loc[(c, "passed")], val.loc[(c, "blocked")]
        else:
            vp = vb = val.loc[c]
        se_p, f_p, se_b, f_b = (v for v in _rates(vp) + _rates(vb))
        est = _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b)
        out.update({"sensitivity": se_p if vp is vb else np.nan, "specificity": 1 - f_p if vp is vb else np.nan,
                    "fpr_passed": f_p, "fpr_blocked": f_b, "leak_rate": est[0], "true_passed": est[1], "true_blocked": est[2]})
        if n == 0 or not np.isfinite(est[0]):
            out.update({"ci_low": np.nan, "ci_high": np.nan, "se": np.nan})
            return out
        B = self.n_boot
        # Jeffreys posterior of the four cell shares (not a plug-in multinomial: a small passed-and-
        # flagged count would otherwise understate its own uncertainty, as a Wald interval does)
        draw = n * rng.dirichlet(cells + 0.5, size=B)
        bp, bb = _post(vp, B, rng), _post(vb, B, rng) if vp is not vb else None
        if bb is None:
            bb = bp
        th = _rg(draw[:, 0], draw[:, 0] + draw[:, 1], draw[:, 2], draw[:, 2] + draw[:, 3], bp[0], bp[1], bb[0], bb[1])[0]
        th = np.clip(th[np.isfinite(th)], 0, 1)
        a = self.alpha
        out.update({"ci_low": float(np.quantile(th, a / 2)), "ci_high": float(np.quantile(th, 1 - a / 2)), "se": float(th.std())})
        return out


def _rates(v) -> tuple[float, float]:
    tp, fn, tn, fp = (float(v[k]) for k in ("tp", "fn", "tn", "fp"))
    return (tp / (tp + fn) if tp + fn else np.nan, fp / (tn + fp) if tn + fp else np.nan)


def _post(v, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draws of (Se, f) from their Jeffreys posteriors."""
    return (rng.beta(v["tp"] + 0.5, v["fn"] + 0.5, size=size), rng.beta(v["fp"] + 0.5, v["tn"] + 0.5, size=size))


def _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b):
    """Rogan–Gladen true-c counts per stratum (floored at 0) and the leak rate they imply."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_p = np.maximum((x_p - f_p * n_p) / (se_p - f_p), 0.0)
        t_b = np.maximum((x_b - f_b * n_b) / (se_b - f_b), 0.0)
        return t_p / (t_p + t_b), t_p, t_b
