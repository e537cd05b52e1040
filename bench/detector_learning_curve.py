"""What more labels buy: a learning curve of the shipped detector's method on the TRAIN split (issue 15).

    .venv/bin/python bench/detector_learning_curve.py   # writes bench/results/detector_learning_curve_train<N rows>.csv

Outer loop: the 5 folds of `fit_defaults.grouped_folds` (grouped by ShareGPT chat, the shipped CV's
folds). For each held-out fold, the other folds' ShareGPT chats are shuffled (seeded) and the first
25 / 50 / 75 / 100% of them (nested: each fraction contains the smaller ones) are the training part.
On it the shipped method is fitted exactly as `fit_defaults.py --write` fits the defaults
(`SensitiveDetector.cross_fit` with `REAL_CHAT_FITTING` on 5 inner folds grouped by chat: heads,
Platt scaling and thresholds all from the training part), and the held-out fold is scored. Every
training row is thus scored once per fraction by a detector that never saw it or its chat.

Printed and written, per fraction: training rows and positives (mean over the outer folds), mAP(4)
(average precision of the calibrated scores, mean over health, religion, politics, ethnicity) and
macro-F1(4) of the flags, with 95% bootstrap CIs (ShareGPT chats resampled, 1,000 times), the paired
difference to 100%, and the slope per doubling of the training rows (least squares of the metric on
log2 rows over the four fractions, its CI from the same resamples). A `--repeats` > 1 draws the
fractions' chats again with other seeds and pools the held-out scores (the curve's subsample noise).
Nothing here touches the test split. One thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data" / "labels"))

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
N_BOOT = 1000


def curve(lab: pd.DataFrame, feats: pd.DataFrame, *, fractions=FRACTIONS, repeats: int = 1, seed: int) -> tuple[dict, pd.DataFrame]:
    """Held-out calibrated scores and flags per (repeat, fraction) for every training row, and the
    training part's size and positives per (repeat, fraction, outer fold)."""
    import fit_defaults

    from analysis.contract.art9 import label_matrix
    from analysis.detector.model import REAL_CHAT_FITTING, SensitiveDetector

    outer = fit_defaults.grouped_folds(lab)
    chats = fit_defaults.chat_of(lab["conversation_id"]).to_numpy()
    det = SensitiveDetector(backend="minilm", fitting=REAL_CHAT_FITTING)
    Y = label_matrix(lab["art9"], det.cats)
    out, sizes = {}, []
    for r in range(repeats):
        for f in fractions:
            out[(r, f)] = (np.zeros(Y.shape), np.zeros(Y.shape, dtype=bool))
        for k in np.unique(outer):
            rng = np.random.default_rng([seed, r, int(k)])
            order = rng.permutation(np.unique(chats[outer != k]))
            te = np.flatnonzero(outer == k)
            for f in fractions:
                keep = set(order[: int(np.ceil(f * len(order)))])
                rows = np.flatnonzero((outer != k) & np.isin(chats, list(keep)))
                part = lab.iloc[rows].reset_index(drop=True)
                t0 = time.perf_counter()
                d = SensitiveDetector(backend="minilm", fitting=REAL_CHAT_FITTING)
                d.cross_fit(None, part["art9"], fit_defaults.grouped_folds(part), features=feats.iloc[rows].reset_index(drop=True),
                            workers=1)
                res = d.detect([""] * len(te), features=feats.iloc[te].reset_index(drop=True))
                out[(r, f)][0][te] = res.scores[det.cats].to_numpy()
                out[(r, f)][1][te] = res.flags[det.cats].to_numpy()
                sizes.append({"repeat": r, "fraction": f, "fold": int(k), "train_rows": len(rows),
                              **{f"positives_{c}": int(Y[rows, j].sum()) for j, c in enumerate(det.cats)},
                              "heads": ",".join(sorted(d.params.heads)), "seconds": round(time.perf_counter() - t0, 1)})
                print(f"repeat {r} fold {k} fraction {f:.2f}: {len(rows)} rows, heads {sorted(d.params.heads)}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out, pd.DataFrame(sizes)


def metrics(S: np.ndarray, F: np.ndarray, Y: np.ndarray, cols: list[int]) -> tuple[float, float, list[float], list[float]]:
    """(mAP, macro-F1, per-category AP, per-category F1) over the columns `cols`."""
    from sklearn.metrics import average_precision_score

    ap = [float(average_precision_score(Y[:, j], S[:, j])) if Y[:, j].any() else np.nan for j in cols]
    tp, d = (F & Y).sum(0), F.sum(0) + Y.sum(0)
    f1 = [float(2 * tp[j] / d[j]) if d[j] else 0.0 for j in cols]
    return float(np.nanmean(ap)), float(np.mean(f1)), ap, f1


def summarize(out: dict, sizes: pd.DataFrame, lab: pd.DataFrame, cats: list[str], four: tuple[str, ...], *, seed: int,
              n_boot: int = N_BOOT) -> pd.DataFrame:
    """Per fraction: sizes, mAP(4) and macro-F1(4) with bootstrap CIs (chats resampled), paired differences to
    the largest fraction, and the slope per doubling of training rows."""
    import fit_defaults

    from analysis.contract.art9 import label_matrix

    Y = label_matrix(lab["art9"], cats)
    cols = [cats.index(c) for c in four]
    fracs = sorted({f for _, f in out})
    reps = sorted({r for r, _ in out})
    # pooled over repeats: each repeat scores every row once; stacking them keeps the pairing by row
    S = {f: np.vstack([out[(r, f)][0] for r in reps]) for f in fracs}
    F = {f: np.vstack([out[(r, f)][1] for r in reps]) for f in fracs}
    Yr = np.vstack([Y] * len(reps))
    g = pd.factorize(fit_defaults.chat_of(lab["conversation_id"]))[0]
    members = [np.concatenate([np.flatnonzero(g == c) + r * len(lab) for r in range(len(reps))]) for c in range(g.max() + 1)]
    n_rows = sizes.groupby("fraction")["train_rows"].mean()
    x = np.log2(n_rows.loc[fracs].to_numpy())
    point = {f: metrics(S[f], F[f], Yr, cols) for f in fracs}
    rng = np.random.default_rng(seed)
    boot = np.zeros((n_boot, len(fracs), 2))
    for b in range(n_boot):
        ix = np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        for i, f in enumerate(fracs):
            boot[b, i] = metrics(S[f][ix], F[f][ix], Yr[ix], cols)[:2]

    upper = np.array([f >= 0.5 for f in fracs])  # at 25% some folds lack the rows for a head (< 20 positives): the lexicon rule

    def slope(v, sel=slice(None)):  # least-squares slope of a metric on log2(training rows)
        return float(np.polyfit(x[sel], np.asarray(v)[sel], 1)[0])

    rows = []
    for i, f in enumerate(fracs):
        m, mf, ap, f1 = point[f]
        lo, hi = np.quantile(boot[:, i], [0.025, 0.975], axis=0)
        dlo, dhi = np.quantile(boot[:, i] - boot[:, -1], [0.025, 0.975], axis=0)
        pos = sizes[sizes["fraction"] == f][[f"positives_{c}" for c in four]].mean()
        rows.append({"fraction": f, "train_rows": round(float(n_rows.loc[f]), 1),
                     **{f"positives_{c}": round(float(pos[f"positives_{c}"]), 1) for c in four},
                     "mAP4": round(m, 4), "mAP4_low": round(lo[0], 4), "mAP4_high": round(hi[0], 4),
                     "macroF1_4": round(mf, 4), "macroF1_4_low": round(lo[1], 4), "macroF1_4_high": round(hi[1], 4),
                     "mAP4_minus_full_low": round(dlo[0], 4), "mAP4_minus_full_high": round(dhi[0], 4),
                     "macroF1_4_minus_full_low": round(dlo[1], 4), "macroF1_4_minus_full_high": round(dhi[1], 4),
                     **{f"AP_{c}": round(a, 4) for c, a in zip(four, ap)}, **{f"F1_{c}": round(v, 4) for c, v in zip(four, f1)}})
    res = pd.DataFrame(rows)
    for j, name in enumerate(("mAP4", "macroF1_4")):
        for tag, sel in (("", slice(None)), ("_from50", upper)):
            sl = [slope(boot[b, :, j], sel) for b in range(n_boot)]
            res[f"{name}_per_doubling{tag}"] = round(slope(res[name].to_numpy(), sel), 4)
            res[f"{name}_per_doubling{tag}_low"], res[f"{name}_per_doubling{tag}_high"] = (
                round(float(q), 4) for q in np.quantile(sl, [0.025, 0.975]))
    return res


def main() -> None:
    import fit_defaults
    import threadpoolctl

    from analysis.detector.model import REAL_CHAT_FITTING, SensitiveDetector

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="CSV (default: bench/results/detector_learning_curve_train<N rows>.csv)")
    ap.add_argument("--scores", default=None, help="keep the held-out scores here (.npz; outside the repo: per conversation) "
                    "and summarize from them when they exist")
    ap.add_argument("--features-cache", default=None, help="as fit_defaults.py (default: its default)")
    a = ap.parse_args()
    threadpoolctl.threadpool_limits(1)
    t0 = time.perf_counter()
    lab = fit_defaults.load_labels()
    lab = lab[lab["split"] == "train"].reset_index(drop=True)  # the test split is not read
    texts = fit_defaults.load_documents(lab).tolist()
    det = SensitiveDetector(backend="minilm", fitting=REAL_CHAT_FITTING)
    cache = Path(a.features_cache) if a.features_cache else fit_defaults.default_cache_dir() / "gold_features" / "detector_features_minilm.parquet"
    feats = fit_defaults.features(det, lab["conversation_id"], texts, cache)
    if a.scores and Path(a.scores).exists():  # the held-out scores of an earlier run with these labels: summarize only
        z = np.load(a.scores, allow_pickle=False)
        if z["ids"].tolist() != lab["conversation_id"].tolist():
            raise ValueError(f"{a.scores}: held-out scores of other training rows; delete it to refit")
        out = {(int(r), f): (z[f"s_{int(r)}_{f}"], z[f"f_{int(r)}_{f}"]) for r, f in z["keys"].tolist()}
        sizes = pd.read_csv(Path(a.scores).with_suffix(".sizes.csv"))
    else:
        out, sizes = curve(lab, feats, repeats=a.repeats, seed=fit_defaults.SEED)
        if a.scores:
            np.savez(a.scores, ids=lab["conversation_id"].to_numpy(dtype=str), keys=np.array(list(out), dtype=float),
                     **{f"s_{r}_{f}": v[0] for (r, f), v in out.items()}, **{f"f_{r}_{f}": v[1] for (r, f), v in out.items()})
            sizes.to_csv(Path(a.scores).with_suffix(".sizes.csv"), index=False)
    res = summarize(out, sizes, lab, det.cats, fit_defaults.FOUR, seed=fit_defaults.SEED)
    a.out = a.out or str(ROOT / "bench" / "results" / f"detector_learning_curve_train{len(lab)}.csv")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res.to_csv(a.out, index=False)
    print(f"\nlearning curve on the TRAIN split ({len(lab)} rows, 5 outer folds grouped by chat, {a.repeats} draw(s) of the "
          f"fractions; CIs: {N_BOOT} chat-bootstrap resamples) -> {a.out}, {time.perf_counter() - t0:.0f} s")
    print("| share of training chats | training rows | positives h / r / p / e | mAP(4) [95% CI] | macro-F1(4) [95% CI] | "
          "mAP(4) - 100% | macro-F1(4) - 100% |")
    for r in res.itertuples():
        print(f"| {r.fraction:.0%} | {r.train_rows:.0f} | {r.positives_health:.0f} / {r.positives_religion:.0f} / "
              f"{r.positives_politics:.0f} / {r.positives_ethnicity:.0f} | {r.mAP4:.3f} [{r.mAP4_low:.3f}, {r.mAP4_high:.3f}] | "
              f"{r.macroF1_4:.3f} [{r.macroF1_4_low:.3f}, {r.macroF1_4_high:.3f}] | "
              f"[{r.mAP4_minus_full_low:+.3f}, {r.mAP4_minus_full_high:+.3f}] | [{r.macroF1_4_minus_full_low:+.3f}, {r.macroF1_4_minus_full_high:+.3f}] |")
    r = res.iloc[0]
    for tag, what in (("", "25-100%"), ("_from50", "50-100%")):
        print(f"per doubling of training rows ({what}): mAP(4) {r[f'mAP4_per_doubling{tag}']:+.3f} [{r[f'mAP4_per_doubling{tag}_low']:+.3f}, "
              f"{r[f'mAP4_per_doubling{tag}_high']:+.3f}], macro-F1(4) {r[f'macroF1_4_per_doubling{tag}']:+.3f} "
              f"[{r[f'macroF1_4_per_doubling{tag}_low']:+.3f}, {r[f'macroF1_4_per_doubling{tag}_high']:+.3f}]")
    print("per category F1 / AP:\n" + res[["fraction"] + [c for c in res if c.startswith(("F1_", "AP_"))]].round(3).to_string(index=False))
    print("fit seconds per (fold, fraction):", sizes["seconds"].describe()[["mean", "max"]].round(1).to_dict())


if __name__ == "__main__":
    main()
