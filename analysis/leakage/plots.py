"""Leakage figures and table formatting."""

from __future__ import annotations

import numpy as np
import pandas as pd


def fmt(df: pd.DataFrame | None, digits: int = 4) -> pd.DataFrame | None:
    """A table for the report: floats as strings with `digits` significant digits (NaN blank), so no
    long digit run (10.117560) is mistaken for a phone number by the report's privacy scan."""
    if df is None:
        return None
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = [("" if not np.isfinite(v) else f"{v:.{digits}g}") for v in out[c].to_numpy(dtype=float)]
    return out


# ----------------------------------------------------------------------------------- figures


def forest_plot(table: pd.DataFrame, ax=None, *, tolerance: float | None = None, others: dict | None = None, label: str = "estimate"):
    """Leak rate per category with its CI; other estimators (raw detector, corrected) offset beside; truth as x."""
    import matplotlib.pyplot as plt

    t = table.reset_index(drop=True)
    cats = list(t["category"])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.55 * len(cats) + 1.2))
    y = np.arange(len(cats))[::-1].astype(float)
    series = [(label, t, "wilson_low", "wilson_high", "tab:blue")]
    palette = iter(["tab:orange", "tab:purple", "tab:gray", "tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for name, o in (others or {}).items():
        o = o.set_index("category").reindex(cats).reset_index()
        lo, hi = ("ci_low", "ci_high") if "ci_low" in o else ("wilson_low", "wilson_high")
        series.append((name, o, lo, hi, next(palette)))
    step = 0.22
    for i, (name, s, lo, hi, col) in enumerate(series):
        yy = y + step * ((len(series) - 1) / 2 - i)
        est = s["leak_rate"].to_numpy(dtype=float)
        # a clipped point estimate can sit just outside its posterior interval: clip the bars, not the data
        err = [np.clip(est - s[lo].to_numpy(dtype=float), 0, None) * 100, np.clip(s[hi].to_numpy(dtype=float) - est, 0, None) * 100]
        ax.errorbar(est * 100, yy, xerr=np.nan_to_num(err),
                    fmt="o", color=col, ms=4, capsize=2, label=name)
        if "status" in s:  # an estimator that may publish a one-sided bound or nothing (Rogan-Gladen): say so
            _bounds_and_withheld(ax, s, yy, col)
    if "truth" in t and t["truth"].notna().any():
        ax.scatter(t["truth"] * 100, y, marker="x", color="k", s=40, zorder=4, label="truth (simulated)")
    if tolerance is not None:
        ax.axvline(tolerance * 100, color="tab:red", ls="--", lw=1, label=f"tolerance {tolerance:.0%}")
    ax.set_yticks(y, cats)
    ax.set_xlabel("leak rate: share of the category's conversations that passed the filter (%)")
    ax.set_xlim(left=0)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.figure.tight_layout()
    return ax


def _bounds_and_withheld(ax, s: pd.DataFrame, yy: np.ndarray, col: str) -> None:
    """One-sided bounds as a bar from the open end (an arrow-head at the bound), withheld rows as text
    (the reason's head; the full reason is in the stage's table), never as a [0, 0] interval."""
    for y, st, ub, lb, why in zip(yy, s["status"], s.get("upper_bound", np.nan), s.get("lower_bound", np.nan), s["reason"].fillna("")):
        if st == "upper bound only" and np.isfinite(ub):
            ax.plot([0, ub * 100], [y, y], color=col, lw=1.2)
            ax.plot([ub * 100], [y], marker="<", color=col, ms=5)
            ax.annotate(f"≤ {ub:.1%} (one-sided)", (ub * 100, y), xytext=(4, -3), textcoords="offset points", fontsize=6, color=col)
        elif st == "lower bound only" and np.isfinite(lb):
            ax.plot([lb * 100, 100], [y, y], color=col, lw=1.2)
            ax.plot([lb * 100], [y], marker=">", color=col, ms=5)
            ax.annotate(f"≥ {lb:.1%} (one-sided)", (lb * 100, y), xytext=(4, -3), textcoords="offset points", fontsize=6, color=col)
        elif st == "withheld":
            head = why.split(":", 1)[0]
            ax.annotate(f"withheld: {head}", (0, y), xytext=(2, -3), textcoords="offset points", fontsize=6, color=col)


def plot_threshold_curves(filter_curve: pd.DataFrame | None, detector_curve: pd.DataFrame | None, *, actual_filter: float = 0.5):
    """Leak rate vs the filter's blocking threshold (left) and vs the detector's flagging threshold (right)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, df, est, title, mark in (
        (axes[0], filter_curve, "leak_rate", "vs the filter's blocking threshold (labels basis)", actual_filter),
        (axes[1], detector_curve, "leak_rate", "vs the detector's flagging threshold (corrected)", 0.5),
    ):
        if df is None or not len(df):
            ax.text(0.5, 0.5, "not available for these inputs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for c, g in df.groupby("category", sort=False):
            ax.plot(g["threshold"], g[est] * 100, marker="o", ms=3, label=c)
        ax.axvline(mark, color="k", ls=":", lw=1)
        ax.set_xlabel("threshold")
        ax.set_ylabel("leak rate (%)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
