"""Detector-based leak rates corrected for the detector's error (Rogan–Gladen per filter stratum)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.leakage.data import GROUPS, validation_counts
from analysis.util.privacy import suppress_small_cells
from analysis.util.stats import binom_cis, p_adjust

# what a row publishes (`status`): a two-sided interval, a one-sided bound, or nothing, with `reason`
ESTIMATED, UPPER, LOWER, WITHHELD = "estimated", "upper bound only", "lower bound only", "withheld"

# ------------------------------------------------------------------ misclassification-corrected


@dataclass
class CorrectedResult:
    """Corrected leak rates per category and region group (`table`: raw and corrected rates, what is
    published (`status`, `reason`; `leak_rate`, `ci_low`, `ci_high` only when two-sided, else
    `upper_bound` / `lower_bound` one-sided at 1 - alpha/2), the detector's error rates used, cell counts,
    and the boundary diagnostics `floor_passed`, `floor_blocked`, `undefined` (shares of posterior draws))."""

    table: pd.DataFrame
    alpha: float
    min_cell: int = 10

    def summary(self) -> pd.DataFrame:
        """The publishable table: counts below `min_cell` suppressed, rates of such cells withheld;
        every row says what it publishes and why (`status`, `reason`)."""
        t = self.table.drop(columns=[c for c in self.table if c.startswith("rg_")])
        small = (t["n"] > 0) & (t["n"] < self.min_cell)
        for c in ("raw_rate", "raw_low", "raw_high", "leak_rate", "ci_low", "ci_high", "upper_bound", "lower_bound"):
            if c in t:
                t[c] = t[c].where(~small)
        return suppress_small_cells(t, ["n", "flagged"], k=self.min_cell, complementary=False)

    def to_frame(self) -> pd.DataFrame:
        """Every column, including the unqualified Rogan–Gladen point and quantiles (`rg_*`: diagnostics,
        not for publication)."""
        return self.table.copy()

    def interval(self) -> tuple[pd.Series, pd.Series]:
        """The published interval per row (`published_interval`; coverage studies count bounds by it)."""
        lo, hi = zip(*(published_interval(r) for r in self.table.to_dict("records"))) if len(self.table) else ((), ())
        return pd.Series(lo, index=self.table.index, dtype=float), pd.Series(hi, index=self.table.index, dtype=float)


def published_limits(row: dict) -> tuple[float | None, float | None] | None:
    """The CI ends a row of `CorrectedLeakage` publishes: both when estimated, the one bound (the other end
    None) on the boundary, None when withheld."""
    return {ESTIMATED: (row["ci_low"], row["ci_high"]), UPPER: (None, row["upper_bound"]),
            LOWER: (row["lower_bound"], None)}.get(row["status"])


def published_interval(row: dict) -> tuple[float, float]:
    """`published_limits` as an interval on [0, 1]: a one-sided bound as [0, U] or [L, 1], (NaN, NaN) when
    withheld (what coverage studies count)."""
    lim = published_limits(row)
    if lim is None:
        return np.nan, np.nan
    return 0.0 if lim[0] is None else lim[0], 1.0 if lim[1] is None else lim[1]


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
    its frequentist coverage is checked by simulation, tests/validation/test_leakage_simulation.py).

    Boundary rule. T_s is floored at 0 (a negative count means the false-positive rate explains every
    flag in s) and undefined when Se <= f. A two-sided interval (and point estimate) is published only
    when neither limit is set by a floor. When more than alpha/2 of the draws have the passed count
    floored (rate 0) or undefined, the lower limit would be the floor: only the upper limit is published,
    as a one-sided (1 - alpha/2) upper bound. The limit is the same quantile as the two-sided interval's
    (not the one-sided 1 - alpha quantile): choosing the form from the data and then moving the limit
    ("flip-flopping", Feldman & Cousins 1998) under-covered (0.933 against 0.946 in 200 small worlds).
    The blocked side likewise gives a lower bound only; both sides, a bound of 0 (1), or an undefined
    point estimate: withheld. Rows whose assumptions the labeled sample rejects (`assumption_checks`)
    are withheld with the check's reason.

    The validation counts must come from conversations *not* in the counted set (the stage drops
    labeled conversations from the counts): otherwise f and x_P share the same false positives.
    With a `stratum` column in the validation frame ("passed" / "blocked"), f and Se are taken per
    stratum (differential misclassification) and Se no longer cancels.
    """

    def __init__(self, alpha: float = 0.05, n_boot: int = 4000, seed: int = 0, min_cell: int = 10):
        self.alpha, self.n_boot, self.seed, self.min_cell = alpha, n_boot, seed, min_cell

    def fit(self, passed: pd.Series, flags: pd.DataFrame, validation: pd.DataFrame, group: pd.Series, *,
            exclude: pd.Index | None = None, checks: pd.DataFrame | None = None) -> CorrectedResult:
        """`checks`: `assumption_checks` output; a category it rejects is withheld in every region group
        (the non-differential check only when the validation is pooled: stratum rates do not assume it)."""
        rng = np.random.default_rng(self.seed)
        passed = passed.reindex(flags.index)
        keep = passed.notna().to_numpy().copy()
        if exclude is not None:
            pos = flags.index.get_indexer(pd.Index(exclude).astype(str))
            keep[pos[pos >= 0]] = False
        P = passed.to_numpy()[keep].astype(bool)
        F = flags.to_numpy()[keep]
        G = group.reindex(flags.index).to_numpy()[keep]
        stratified = "stratum" in validation
        val = validation.set_index(["category", "stratum"] if stratified else "category")
        rows = []
        for g in GROUPS:
            gm = np.ones(len(P), dtype=bool) if g == "all" else (G == g)
            for j, c in enumerate(flags.columns):
                cells = np.array([(gm & P & F[:, j]).sum(), (gm & P & ~F[:, j]).sum(), (gm & ~P & F[:, j]).sum(), (gm & ~P & ~F[:, j]).sum()])
                rows.append({"category": c, "region_group": g, **self._one(cells, val, c, rng)})
        t = pd.DataFrame(rows)
        if checks is not None and len(checks):
            ch = checks.set_index("category")
            cols = ["representative_reason"] + ([] if stratified else ["differential_reason"])
            why = t["category"].map(ch[cols].apply(lambda r: "; ".join(x for x in r if x), axis=1)).fillna("")
            bad = (why != "").to_numpy()
            t.loc[bad, ["leak_rate", "ci_low", "ci_high", "upper_bound", "lower_bound"]] = np.nan
            t.loc[bad, "status"] = WITHHELD
            t.loc[bad, "reason"] = "assumption rejected: " + why[bad]
        return CorrectedResult(t, self.alpha, self.min_cell)

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
        est, t_p, t_b = (float(v) for v in _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b))
        out.update({"sensitivity": se_p if vp is vb else np.nan, "specificity": 1 - f_p if vp is vb else np.nan,
                    "fpr_passed": f_p, "fpr_blocked": f_b, "true_passed": t_p, "true_blocked": t_b, "rg_point": est})
        nan = {"leak_rate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "upper_bound": np.nan, "lower_bound": np.nan,
               "se": np.nan, "rg_low": np.nan, "rg_high": np.nan, "floor_passed": np.nan, "floor_blocked": np.nan, "undefined": np.nan}
        out.update(nan)
        if n == 0:
            return out | {"status": WITHHELD, "reason": "no conversations"}
        B = self.n_boot
        # Jeffreys posterior of the four cell shares (not a plug-in multinomial: a small passed-and-
        # flagged count would otherwise understate its own uncertainty, as a Wald interval does)
        draw = n * rng.dirichlet(cells + 0.5, size=B)
        bp, bb = _post(vp, B, rng), _post(vb, B, rng) if vp is not vb else None
        if bb is None:
            bb = bp
        th, dp, db = _rg(draw[:, 0], draw[:, 0] + draw[:, 1], draw[:, 2], draw[:, 2] + draw[:, 3], bp[0], bp[1], bb[0], bb[1])
        und = ~np.isfinite(th)  # Se <= f in a stratum, or both counts floored
        q0, q1, qn = float(((dp == 0) & ~und).mean()), float(((db == 0) & ~und).mean()), float(und.mean())
        a = self.alpha
        fin = th[~und]
        out.update({"floor_passed": q0, "floor_blocked": q1, "undefined": qn, "se": float(fin.std()) if len(fin) else np.nan,
                    "rg_low": float(np.quantile(fin, a / 2)) if len(fin) else np.nan,
                    "rg_high": float(np.quantile(fin, 1 - a / 2)) if len(fin) else np.nan})
        status, reason = _qualify(est, se_p, f_p, se_b, f_b, q0, q1, qn, a)
        if status == UPPER:  # undefined draws count against the bound (conservative)
            out["upper_bound"] = float(np.quantile(np.where(und, 1.0, th), 1 - a / 2))
            if out["upper_bound"] <= 0:
                status, reason = WITHHELD, (f"not identified: the false-positive rate explains every flag among passed "
                                            f"conversations (f·N_passed >= flagged_passed) in {q0:.0%} of draws, so the "
                                            "correction cannot tell a leak rate of 0 from a positive one")
                out["upper_bound"] = np.nan
        elif status == LOWER:
            out["lower_bound"] = float(np.quantile(np.where(und, 0.0, th), a / 2))
            if out["lower_bound"] >= 1:
                status, reason = WITHHELD, (f"not identified: the false-positive rate explains every flag among blocked "
                                            f"conversations in {q1:.0%} of draws")
                out["lower_bound"] = np.nan
        elif status == ESTIMATED:
            out.update({"leak_rate": est, "ci_low": out["rg_low"], "ci_high": out["rg_high"]})
        return out | {"status": status, "reason": reason}


def _qualify(est, se_p, f_p, se_b, f_b, q0, q1, qn, a) -> tuple[str, str]:
    """The boundary rule (class docstring): what a row may publish, and why."""
    if not np.isfinite([se_p, f_p, se_b, f_b]).all():
        return WITHHELD, "not identified: the labels hold no conversation about the category (or none without it) to measure the detector's errors on"
    if not (se_p > f_p and se_b > f_b):
        return WITHHELD, (f"not identified: the detector's sensitivity ({min(se_p, se_b):.2f}) does not exceed its "
                          f"false-positive rate ({max(f_p, f_b):.3f})")
    if not np.isfinite(est):
        return WITHHELD, "not identified: the false-positive rate explains every flag in both strata"
    low, high = est <= 0 or q0 + qn > a / 2, est >= 1 or q1 + qn > a / 2
    if low and high:
        return WITHHELD, (f"uninformative: the corrected passed count is floored at 0 in {q0:.0%}, the blocked count in "
                          f"{q1:.0%} of draws, undefined in {qn:.0%}")
    if low:
        return UPPER, (f"one-sided {1 - a / 2:.1%} bound (the {1 - a:.0%} interval's upper limit): the corrected "
                       f"passed count is floored at 0 (the false-positive rate explains its flags) in {q0 + qn:.0%} of draws "
                       f"(> {a / 2:.1%}), so the interval's lower limit is the floor (point estimate {est:.3f}, not published)")
    if high:
        return LOWER, (f"one-sided {1 - a / 2:.1%} bound (the {1 - a:.0%} interval's lower limit): the corrected "
                       f"blocked count is floored at 0 in {q1 + qn:.0%} of draws (> {a / 2:.1%}), so the interval's upper "
                       f"limit is 1 (point estimate {est:.3f}, not published)")
    return ESTIMATED, ""


def assumption_checks(passed: pd.Series, flags: pd.DataFrame, labels: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """What the labeled sample can say against Rogan–Gladen's assumptions, per category (Fisher exact tests,
    Holm within each check's family across categories; `labels`: conversation_id, art9):

    * non-differential error: the detector's sensitivity and false-positive rate among labeled passed vs
      labeled blocked conversations;
    * representative labels: within each stratum the labeled conversations' flag rate vs the counted
      (unlabeled) ones'. Both are Se·share_c + f·(1 - share_c) if the labels are a random sample within
      the stratum and the detector errs alike on both; a difference means the error rates measured on
      the labels do not describe the counted conversations (e.g. the detector was tuned on these labels).

    A rejection fills `*_reason`; no rejection is no evidence for the assumption (few labeled
    conversations about a category in the passed stratum give these tests little power)."""
    passed = passed.reindex(flags.index)
    stratum = pd.Series(np.where(passed.fillna(False).astype(bool), "passed", "blocked"), index=flags.index).where(passed.notna())
    validation = validation_counts(flags, labels, stratum.dropna())
    counted = passed.notna() & ~flags.index.isin(labels["conversation_id"].astype(str))
    flagged_counted = pd.DataFrame([{"category": c, "stratum": s, "flagged": int((flags[c] & m).sum()), "n": int(m.sum())}
                                    for c in flags.columns for s, m in (("passed", counted & (stratum == "passed")),
                                                                         ("blocked", counted & (stratum == "blocked")))])
    rows = []
    cnt = flagged_counted.set_index(["category", "stratum"])
    for c, g in validation.groupby("category", sort=False):
        g = g.set_index("stratum")
        if not {"passed", "blocked"} <= set(g.index):
            continue
        p, b = g.loc["passed"], g.loc["blocked"]
        r = {"category": c,
             "sensitivity_passed": p.tp / (p.tp + p.fn) if p.tp + p.fn else np.nan,
             "sensitivity_blocked": b.tp / (b.tp + b.fn) if b.tp + b.fn else np.nan,
             "fpr_passed": p.fp / (p.fp + p.tn) if p.fp + p.tn else np.nan,
             "fpr_blocked": b.fp / (b.fp + b.tn) if b.fp + b.tn else np.nan,
             "p_sensitivity_differs": stats.fisher_exact([[p.tp, p.fn], [b.tp, b.fn]])[1],
             "p_fpr_differs": stats.fisher_exact([[p.fp, p.tn], [b.fp, b.tn]])[1]}
        for s, v in (("passed", p), ("blocked", b)):
            k_lab, n_lab = int(v.tp + v.fp), int(v.tp + v.fn + v.tn + v.fp)
            k_cnt, n_cnt = int(cnt.loc[(c, s), "flagged"]), int(cnt.loc[(c, s), "n"])
            r[f"flag_rate_labeled_{s}"] = k_lab / n_lab if n_lab else np.nan
            r[f"flag_rate_counted_{s}"] = k_cnt / n_cnt if n_cnt else np.nan
            r[f"p_flag_rate_differs_{s}"] = stats.fisher_exact([[k_lab, n_lab - k_lab], [k_cnt, n_cnt - k_cnt]])[1] if n_lab and n_cnt else np.nan
        rows.append(r)
    out = pd.DataFrame(rows)
    if not len(out):
        return out
    for family, cols in (("differential", ["p_sensitivity_differs", "p_fpr_differs"]),
                         ("representative", ["p_flag_rate_differs_passed", "p_flag_rate_differs_blocked"])):
        p = out[cols].to_numpy(float)
        ok = np.isfinite(p)
        adj = np.full(p.shape, np.nan)
        if ok.any():
            adj[ok] = p_adjust(p[ok], "holm", alpha)
        for j, col in enumerate(cols):
            out[col + "_holm"] = adj[:, j]
        out[f"{family}_reason"] = [_reject_text(family, r, cols, alpha) for r in out.to_dict("records")]
    return out


def _reject_text(family: str, r: dict, cols: list[str], alpha: float) -> str:
    hit = [col for col in cols if np.isfinite(r[col + "_holm"]) and r[col + "_holm"] < alpha]
    if not hit:
        return ""
    if family == "differential":
        what = {"p_sensitivity_differs": f"sensitivity passed {r['sensitivity_passed']:.2f} vs blocked {r['sensitivity_blocked']:.2f}",
                "p_fpr_differs": f"false-positive rate passed {r['fpr_passed']:.3f} vs blocked {r['fpr_blocked']:.3f}"}
        head = "the detector errs differently among passed and blocked conversations"
    else:
        what = {f"p_flag_rate_differs_{s}": f"{s}: labeled {r[f'flag_rate_labeled_{s}']:.3f} vs counted {r[f'flag_rate_counted_{s}']:.3f}"
                for s in ("passed", "blocked")}
        head = "labeled and counted conversations are flagged at different rates, so the error rates measured on the labels do not describe the counted ones"
    parts = [f"{what[col]}, Holm p {r[col + '_holm']:.2g}" for col in hit]
    return f"{head} ({'; '.join(parts)})"


def _rates(v) -> tuple[float, float]:
    tp, fn, tn, fp = (float(v[k]) for k in ("tp", "fn", "tn", "fp"))
    return (tp / (tp + fn) if tp + fn else np.nan, fp / (tn + fp) if tn + fp else np.nan)


def _post(v, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draws of (Se, f) from their Jeffreys posteriors."""
    return (rng.beta(v["tp"] + 0.5, v["fn"] + 0.5, size=size), rng.beta(v["fp"] + 0.5, v["tn"] + 0.5, size=size))


def _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b):
    """Rogan–Gladen true-c counts per stratum (floored at 0; NaN where Se <= f: not identified) and the
    leak rate they imply (NaN when both counts are 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_p = np.where(se_p > f_p, np.maximum((x_p - f_p * n_p) / (se_p - f_p), 0.0), np.nan)
        t_b = np.where(se_b > f_b, np.maximum((x_b - f_b * n_b) / (se_b - f_b), 0.0), np.nan)
        return t_p / (t_p + t_b), t_p, t_b
