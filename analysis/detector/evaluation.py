"""Detector evaluation against labels: precision, recall, F1, specificity with CIs, micro averages, confusion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.contract.art9 import label_matrix
from analysis.util.stats import proportion

# ------------------------------------------------------------------------------ validation


@dataclass
class Validation:
    """Flags vs labels: per-category and micro metrics with CIs, and the confusion table."""

    per_category: pd.DataFrame
    micro: pd.DataFrame
    confusion: pd.DataFrame
    n: int
    alpha: float = 0.05

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([self.per_category, self.micro], ignore_index=True)

    def detector_validation(self) -> pd.DataFrame:
        """What the leakage stage needs for Rogan-Gladen: sensitivity/specificity with counts."""
        cols = ["category", "tp", "fn", "tn", "fp", "sensitivity", "sensitivity_low", "sensitivity_high",
                "specificity", "specificity_low", "specificity_high", "n"]
        return self.per_category[cols].copy()

    def summary(self) -> pd.DataFrame:
        """Micro-averaged precision, recall and F1 with CIs (per category: `per_category`)."""
        return self.micro.copy()

    def to_markdown(self) -> str:
        m = self.micro.iloc[0]
        worst = self.per_category.sort_values("f1").iloc[0]
        return (f"{self.n} labeled conversations; micro precision {m.precision:.3f} [{m.precision_low:.3f}, {m.precision_high:.3f}], "
                f"recall {m.recall:.3f} [{m.recall_low:.3f}, {m.recall_high:.3f}], F1 {m.f1:.3f}; "
                f"lowest F1: {worst.category} {worst.f1:.3f}")


def evaluate_detector(flags: pd.DataFrame, labels, *, alpha: float = 0.05, method: str = "wilson", n_boot: int = 1000, seed: int = 0) -> Validation:
    """Per category: tp fp fn tn, precision / recall (= sensitivity) / specificity with CIs
    (`method` of statsmodels' proportion_confint, Wilson by default), F1 with a bootstrap CI;
    micro averages pool the seven categories' counts."""
    cats = list(flags.columns)
    y = label_matrix(labels, cats)
    p = flags.to_numpy(dtype=bool)
    n = len(y)
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((0, 0), dtype=int)

    def f1_ci(yy, pp):
        if not n:
            return np.nan, np.nan
        tp = (yy[boot] & pp[boot]).sum(axis=tuple(range(1, yy.ndim + 1)))
        fp = (~yy[boot] & pp[boot]).sum(axis=tuple(range(1, yy.ndim + 1)))
        fn = (yy[boot] & ~pp[boot]).sum(axis=tuple(range(1, yy.ndim + 1)))
        d = 2 * tp + fp + fn
        f = np.where(d > 0, 2 * tp / np.maximum(d, 1), np.nan)
        f = f[np.isfinite(f)]
        return (float(np.quantile(f, alpha / 2)), float(np.quantile(f, 1 - alpha / 2))) if len(f) else (np.nan, np.nan)

    def row(name, yy, pp):
        tp, fp = int((yy & pp).sum()), int((~yy & pp).sum())
        fn, tn = int((yy & ~pp).sum()), int((~yy & ~pp).sum())
        prec = proportion(tp, tp + fp, alpha, method)
        rec = proportion(tp, tp + fn, alpha, method)
        spec = proportion(tn, tn + fp, alpha, method)
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else np.nan
        lo, hi = f1_ci(yy, pp)
        return {
            "category": name, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": int(yy.size), "positives": tp + fn, "flagged": tp + fp,
            "precision": prec[0], "precision_low": prec[1], "precision_high": prec[2],
            "recall": rec[0], "recall_low": rec[1], "recall_high": rec[2],
            "f1": f1, "f1_low": lo, "f1_high": hi,
            "sensitivity": rec[0], "sensitivity_low": rec[1], "sensitivity_high": rec[2],
            "specificity": spec[0], "specificity_low": spec[1], "specificity_high": spec[2],
        }

    per = pd.DataFrame([row(c, y[:, j], p[:, j]) for j, c in enumerate(cats)])
    micro = pd.DataFrame([row("micro", y, p)])
    # confusion: true category (or none) x flagged category (or none), counting conversations
    true_names = cats + ["none"]
    # every (label, flag) pair of a conversation counts once: indicator matrices with a 'none' column
    ty = np.hstack([y, ~y.any(axis=1, keepdims=True)]).astype(np.int64)
    tp_ = np.hstack([p, ~p.any(axis=1, keepdims=True)]).astype(np.int64)
    conf = pd.DataFrame(ty.T @ tp_, index=pd.Index(true_names, name="label"), columns=pd.Index(true_names, name="flagged"))
    return Validation(per, micro, conf, n, alpha)
