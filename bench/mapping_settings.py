"""Re-choose the categorizer's settings by grouped CV on the gold set's train split (never test).

    .venv/bin/python bench/mapping_settings.py [--C 1 2 4] [--k 10 20] [--knn-weight 0.2 0.35 0.5] [--proto-weight 0.1 0.2 0.3]

The categorizer's probability is a blend: (1 - pw) * ((1 - kw) * logistic + kw * kNN vote) + pw *
prototype vote (`analysis.mapping.categorizer`). Per fold of the 5-fold CV by ShareGPT chat (seed 0,
as `data/labels/fit_categorizer.py`), one model per C is fitted on the other folds and its three
parts are computed once; every blend and k is then scored without refitting. Tier-1 accuracy over
the train split's non-sensitive tier-1-labeled conversations, out of fold. The best setting is
compared with the shipped one by the paired difference of hits on the same rows, CI cluster-robust
by chat; note that the best of a grid is optimistic by construction (the CI ignores the choice), so
a change should win by more than that interval. Rows: bench/results/mapping_settings.csv.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data" / "labels"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--C", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    ap.add_argument("--k", nargs="+", type=int, default=[10, 20])
    ap.add_argument("--knn-weight", nargs="+", type=float, default=[0.2, 0.35, 0.5])
    ap.add_argument("--proto-weight", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mapping_settings.csv"))
    args = ap.parse_args(argv)

    from fit_categorizer import folds_of, load_documents, load_gold, paired_difference, scored

    from analysis.mapping.categorizer import ConversationCategorizer, conversation_features

    shipped = ConversationCategorizer()
    df = load_gold()
    df = df[df["split"] == "train"].reset_index(drop=True)  # train only
    texts = load_documents(df["conversation_id"])
    X = conversation_features(texts["document"].tolist(), "minilm", replies=texts["first_reply"].tolist()).X
    y = df["tier1"].to_numpy(dtype=object)
    folds = folds_of(df)
    m = scored(df)
    classes = None
    parts: dict = {}  # (C, part) -> out-of-fold probabilities
    for C in args.C:
        t0 = time.perf_counter()
        for f in np.unique(folds):
            te = folds == f
            cat = ConversationCategorizer(C=C, with_reply=True).fit(X[~te], y[~te])
            if classes is None:
                classes = list(cat.classes)
            if list(cat.classes) != classes:
                raise ValueError(f"fold {f}: classes differ between folds (the tier-1 prototypes should make them equal)")
            z = X[te] @ cat.coef.T + cat.intercept
            z = np.exp(z - z.max(axis=1, keepdims=True))
            for key, val in [("logistic", z / z.sum(axis=1, keepdims=True)), ("proto", cat._proto_proba(X[te]))] + [
                    (f"knn{k}", _knn(cat, X[te], k)) for k in args.k]:
                parts.setdefault((C, key), np.zeros((len(y), len(classes))))[te] = val
        print(f"C {C}: 5 folds in {time.perf_counter() - t0:.0f} s", flush=True)
    cls = np.asarray(classes, dtype=object)
    rows, hits = [], {}
    for C, k, kw, pw in itertools.product(args.C, args.k, args.knn_weight, args.proto_weight):
        p = (1 - pw) * ((1 - kw) * parts[(C, "logistic")] + kw * parts[(C, f"knn{k}")]) + pw * parts[(C, "proto")]
        h = (cls[p.argmax(axis=1)] == y)[m].astype(float)
        hits[(C, k, kw, pw)] = h
        rows.append({"C": C, "knn_k": k, "knn_weight": kw, "proto_weight": pw, "accuracy": round(float(h.mean()), 4), "n": int(m.sum())})
    res = pd.DataFrame(rows).sort_values("accuracy", ascending=False)
    key0 = (shipped.C, shipped.knn_k, shipped.knn_weight, shipped.proto_weight)
    if key0 not in hits:
        raise SystemExit(f"the shipped setting {key0} is not in the grid")
    best = tuple(res.iloc[0][["C", "knn_k", "knn_weight", "proto_weight"]])
    best = (float(best[0]), int(best[1]), float(best[2]), float(best[3]))
    res["shipped"] = [(r.C, r.knn_k, r.knn_weight, r.proto_weight) == key0 for r in res.itertuples()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res.to_csv(args.out, index=False)
    print(res.head(12).to_string(index=False))
    print(f"shipped {key0}: {hits[key0].mean():.4f}; best {best}: {hits[best].mean():.4f}; best - shipped (paired, train CV):",
          paired_difference(hits[best], hits[key0], df.loc[m, "chat"]))
    return 0


def _knn(cat, X: np.ndarray, k: int) -> np.ndarray:
    keep = cat.knn_k
    cat.knn_k = k
    try:
        return cat._knn_proba(X)
    finally:
        cat.knn_k = keep


if __name__ == "__main__":
    raise SystemExit(main())
