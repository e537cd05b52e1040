"""Learning curve of the conversation categorizer on the gold set's train split: what more labels buy.

    .venv/bin/python bench/mapping_learning_curve.py [--fractions 0.25 0.5 0.75 1] [--repeats 3]

The shipped categorizer (`analysis.mapping.categorizer.ConversationCategorizer`, the settings of
`data/labels/fit_categorizer.py`: user side + first reply, kNN vote 0.35, prototype vote 0.2) by the
same 5-fold CV on train (StratifiedGroupKFold by ShareGPT chat, seed 0): each held-out fold is
categorized by a model fitted on a seeded random `fraction` of the *chats* of the other folds (all
of a chat's parts go together). Tier-1 accuracy over the train split's non-sensitive conversations
labeled with a tier-1, out of fold, with a 95% CI cluster-robust by chat. A fraction below 1 is
drawn `--repeats` times (seeds 0..); each repeat is a row, and the mean is printed. Only train rows
are read: the frozen test split is not touched. Rows go to bench/results/mapping_learning_curve.csv.
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

OUT = ROOT / "bench" / "results" / "mapping_learning_curve.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--repeats", type=int, default=3, help="random chat subsets per fraction below 1")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"--fractions must lie in (0, 1], got {args.fractions}")

    from fit_categorizer import folds_of, load_documents, load_gold, scored

    from analysis.mapping.accuracy import tier1_accuracy
    from analysis.mapping.categorizer import ConversationCategorizer, conversation_features

    df = load_gold()
    df = df[df["split"] == "train"].reset_index(drop=True)  # train only
    texts = load_documents(df["conversation_id"])
    t0 = time.perf_counter()
    X = conversation_features(texts["document"].tolist(), "minilm", replies=texts["first_reply"].tolist()).X
    print(f"features of {len(df)} train conversations in {time.perf_counter() - t0:.1f} s", flush=True)
    y = df["tier1"].to_numpy(dtype=object)
    folds = folds_of(df)
    m = scored(df)
    chats = df["chat"].to_numpy()
    rows = []
    for frac in args.fractions:
        for rep in range(1 if frac == 1 else args.repeats):
            rng = np.random.default_rng(rep)
            pred = np.empty(len(df), dtype=object)
            n_fit = []
            t0 = time.perf_counter()
            for k in np.unique(folds):
                tr = folds != k
                pool = np.unique(chats[tr])
                keep = set(rng.choice(pool, int(round(frac * len(pool))), replace=False))
                sub = tr & np.isin(chats, list(keep))
                n_fit.append(int(sub.sum()))
                cat = ConversationCategorizer(backend="minilm", with_reply=True).fit(X[sub], y[sub])
                p = cat.predict_proba(X[folds == k])
                pred[folds == k] = p.columns.to_numpy()[p.to_numpy().argmax(axis=1)]
            acc = tier1_accuracy(pred[m], y[m], chats[m])
            row = {"fraction": frac, "repeat": rep, "train_conversations_per_fit": round(float(np.mean(n_fit))),
                   "scored": acc["n"], "chats": acc["topics"], "accuracy": round(acc["accuracy"], 4),
                   "ci_low": round(acc["ci_low"], 4), "ci_high": round(acc["ci_high"], 4),
                   "ci_method": "cluster-robust by ShareGPT chat", "split": "train (5-fold CV by chat, seed 0)",
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, flush=True)
    out = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    print(out.groupby("fraction").agg(fit_on=("train_conversations_per_fit", "mean"), accuracy=("accuracy", "mean"),
                                      ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), repeats=("repeat", "count")).round(3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
