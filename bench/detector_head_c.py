"""Re-choose the heads' L2 penalty (`head_C`) on the grown training split by grouped CV (issue 15).

    .venv/bin/python bench/detector_head_c.py            # writes bench/results/detector_head_c_train<N rows>.csv

For every C of the grid, the shipped method with that `head_C` (`REAL_CHAT_FITTING` otherwise) is
cross-fitted exactly as `fit_defaults.py` does it (5 folds grouped by ShareGPT chat: every training
row gets an out-of-fold calibrated score and flag; Platt and thresholds from the other folds' models).
Printed: mAP(4) and macro-F1(4) of the out-of-fold scores / flags, and their paired differences to the
shipped C with 95% bootstrap CIs (ShareGPT chats resampled, 1,000 times). The rule, fixed before the
run: a C replaces the shipped one only if its macro-F1(4) difference CI lies above 0 (and mAP(4) does
not fall). The test split is not read. One thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data" / "labels"))

GRID = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def main() -> None:
    import fit_defaults
    import threadpoolctl
    from detector_learning_curve import N_BOOT, metrics

    from analysis.contract.art9 import label_matrix
    from analysis.detector.model import REAL_CHAT_FITTING, SensitiveDetector

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default=",".join(map(str, GRID)))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    threadpoolctl.threadpool_limits(1)
    lab = fit_defaults.load_labels()
    lab = lab[lab["split"] == "train"].reset_index(drop=True)  # the test split is not read
    texts = fit_defaults.load_documents(lab).tolist()
    det = SensitiveDetector(backend="minilm", fitting=REAL_CHAT_FITTING)
    feats = fit_defaults.features(det, lab["conversation_id"], texts,
                                  fit_defaults.default_cache_dir() / "gold_features" / "detector_features_minilm.parquet")
    folds = fit_defaults.grouped_folds(lab)
    cats = det.cats
    Y = label_matrix(lab["art9"], cats)
    cols = [cats.index(c) for c in fit_defaults.FOUR]
    grid = [float(c) for c in a.grid.split(",")]
    ref = REAL_CHAT_FITTING.head_C
    if ref not in grid:
        grid.append(ref)
    res = {}
    for C in grid:
        t0 = time.perf_counter()
        d = SensitiveDetector(backend="minilm", fitting=replace(REAL_CHAT_FITTING, head_C=C))
        cf = d.cross_fit(None, lab["art9"], folds, features=feats, workers=1)
        res[C] = (cf.scores[cats].to_numpy(), cf.flags[cats].to_numpy())
        m, f, _, f1 = metrics(*res[C], Y, cols)
        print(f"head_C {C}: mAP(4) {m:.3f}, macro-F1(4) {f:.3f} ({dict(zip(fit_defaults.FOUR, np.round(f1, 3)))}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    g = pd.factorize(fit_defaults.chat_of(lab["conversation_id"]))[0]
    members = [np.flatnonzero(g == k) for k in range(g.max() + 1)]
    rng = np.random.default_rng(fit_defaults.SEED)
    boot = {C: [] for C in grid}
    for _ in range(N_BOOT):
        ix = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        for C in grid:
            boot[C].append(metrics(res[C][0][ix], res[C][1][ix], Y[ix], cols)[:2])
    rows = []
    for C in grid:
        m, f, ap_, f1 = metrics(*res[C], Y, cols)
        d = np.array(boot[C]) - np.array(boot[ref])
        lo, hi = np.quantile(d, [0.025, 0.975], axis=0)
        rows.append({"head_C": C, "train_rows": len(lab), "mAP4": round(m, 4), "macroF1_4": round(f, 4),
                     "mAP4_minus_shipped_low": round(lo[0], 4), "mAP4_minus_shipped_high": round(hi[0], 4),
                     "macroF1_4_minus_shipped_low": round(lo[1], 4), "macroF1_4_minus_shipped_high": round(hi[1], 4),
                     **{f"F1_{c}": round(v, 4) for c, v in zip(fit_defaults.FOUR, f1)},
                     **{f"AP_{c}": round(v, 4) for c, v in zip(fit_defaults.FOUR, ap_)}})
    out = pd.DataFrame(rows).sort_values("head_C")
    path = a.out or str(ROOT / "bench" / "results" / f"detector_head_c_train{len(lab)}.csv")
    out.to_csv(path, index=False)
    print(f"\nhead_C by 5-fold grouped CV on the TRAIN split ({len(lab)} rows; differences to the shipped {ref}, "
          f"{N_BOOT} chat-bootstrap resamples) -> {path}")
    print(out.to_string(index=False))


if __name__ == "__main__":
    main()
