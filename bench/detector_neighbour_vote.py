"""Issue 15, session 8: does a neighbour vote (or a non-linear head) beat the shipped detector's heads?
TRAIN split only; the test split is not read.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/detector_neighbour_vote.py [--hgb]

Candidates, judged against the shipped features (user-side segments mean/max, head, first reply,
prototype and lexicon features; L2 logistic heads C 0.005, Platt, recall-floored precision-0.80 cuts):

1. **+ neighbour vote** (fixed before any figure): per conversation, the exp(20 x cosine)-weighted
   share of its 25 nearest labeled TRAIN conversations (cosine of the unit [head | segment mean |
   reply] vectors, each block unit-normalized; the categorizer's `_neighbour_vote` weights) that are
   positive for health, religion, politics, ethnicity, sexual orientation, and (gold rows, which carry
   a tier-1) that carry the IAB tier-1 Medical Health, Healthy Living, Religion & Spirituality,
   Politics, Sensitive Topics, Law: 11 columns appended to the heads' features. Neighbours never come
   from the conversation's own ShareGPT chat, and only from the rows the model in question is fitted
   on: every model of the cross-fitting (pair, fold) recomputes the votes of its training rows (leave
   own chat out) and of the rows it scores from its own training rows. The Art. 9 part alone is
   printed as an ablation (not a candidate).
2. (`--hgb`) **HistGradientBoosting heads** on the shipped features (sklearn, class-balanced
   sample weights, early stopping off, fixed settings below), same Platt and threshold rule.

Everything is cross-fitted exactly as `SensitiveDetector.cross_fit` does it (5 folds grouped by
ShareGPT chat, `fit_defaults.grouped_folds`): the fold-k model is fitted on the other folds, its Platt
scaling and threshold on the out-of-fold scores of the pair models (fitted without folds k and j,
scoring j), so the fold-k flags are nested. The shipped features run through the same code first and
must reproduce `cross_fit`'s out-of-fold figures. Decision rule (fixed before the run): a candidate
ships only if its mAP(4) minus the shipped one has a paired bootstrap 95% CI (1,000 resamples of
ShareGPT chats) with lower bound > 0 AND its nested macro-F1(4) is not below the shipped point figure.

`--user-side` (session 8, issue 15): the same study for the `minilm_user_side` entry that scores corpora
without replies: features without the first reply (the entry's current features are the baseline),
candidate 1 votes from unit [head | segment mean] vectors (each block unit-normalized), same rule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "labels"))
import fit_defaults as fd  # noqa: E402

from analysis.contract.art9 import ART9, label_matrix  # noqa: E402
from analysis.detector.evaluation import evaluate_detector  # noqa: E402
from analysis.detector.features import head_columns, reply_columns  # noqa: E402
from analysis.detector.model import REAL_CHAT_FITTING, SensitiveDetector, _fit_platt, _head_matrix, _platt, _standardize, choose_threshold  # noqa: E402
from analysis.detector.vote import VOTE_ART9, VOTE_IAB, vote_shares  # noqa: E402
from analysis.mapping.labels import read_labels  # noqa: E402
from analysis.util.embeddings import default_cache_dir  # noqa: E402

K, TEMP = 25, 20.0
CATS = fd.FOUR
OUT = Path(__file__).parent / "results"


def unit(X):
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def load(user_side: bool = False):
    """Train rows, texts, features (user side + head + first reply; `user_side`: without the reply) and tier-1s."""
    lab = fd.load_labels()
    tr = (lab["split"] == "train").to_numpy()
    lab = lab[tr].reset_index(drop=True)
    texts = fd.load_documents(lab).tolist()
    det = SensitiveDetector(backend="minilm", fitting=REAL_CHAT_FITTING)
    cache = default_cache_dir() / "gold_features" / "detector_features_minilm.parquet"
    user = fd.features(det, lab["conversation_id"], texts, cache)
    feats = pd.concat([user, head_columns(texts, "minilm")] + ([] if user_side else [reply_columns(fd.load_replies(lab), "minilm")]), axis=1)
    gold = read_labels(fd.GOLD / "labels.csv")[["conversation_id", "iab_tier1"]]
    t1 = lab[["conversation_id"]].merge(gold, on="conversation_id", how="left")["iab_tier1"].astype(object)
    return det, lab, texts, feats, t1.where(t1.notna(), None).to_numpy()


def vote_matrix(feats: pd.DataFrame, lab: pd.DataFrame, t1, dedup: float | None = None,
                blocks=("head", "mean", "reply")) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(cosine matrix of the unit [`blocks`] vectors with same-chat pairs at -inf, vote targets per row (NaN: not in
    that vote's pool), names). `dedup`: pairs at cosine >= dedup are at -inf too (ShareGPT holds one conversation
    under several chat ids)."""
    blocks = [unit(feats[[c for c in feats.columns if c.startswith(f"emb__{b}_")]].to_numpy(np.float32)) for b in blocks]
    V = unit(np.hstack(blocks))
    S = V @ V.T
    chat = pd.factorize(fd.chat_of(lab["conversation_id"]))[0]
    S[chat[:, None] == chat[None, :]] = -np.inf
    if dedup is not None:
        near = S >= dedup
        print(f"train rows with another chat's row at cosine >= {dedup}: {int(near.any(1).sum())} of {len(S)} (left out of each other's votes)")
        S[near] = -np.inf
    ya = label_matrix(lab["art9"], ART9)
    cols, names = [], []
    for c in VOTE_ART9:
        cols.append(ya[:, ART9.index(c)].astype(float))
        names.append(f"vote_art9_{c}")
    has = np.array([v is not None for v in t1])
    for k, n in VOTE_IAB.items():
        cols.append(np.where(has, (t1 == k).astype(float), np.nan))
        names.append(f"vote_iab_{n}")
    return S, np.column_stack(cols), names


def votes(S, T, pool: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per query row, per target column: the exp(TEMP x cosine)-weighted share of its K nearest rows of
    `pool` (boolean masks) among those with that target (same-chat rows are at -inf and never count):
    the shipped `vote_shares` on the rows the model in question may read."""
    return vote_shares(S[np.ix_(query, pool)], T[pool], K, TEMP)


def logistic_head(C=REAL_CHAT_FITTING.head_C):
    from sklearn.linear_model import LogisticRegression

    def fit(X, y):
        mean, scale, Z = _standardize(X)
        m = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(Z, y)
        return lambda Xq: m.predict_proba((Xq - mean) / scale)[:, 1]
    return fit


def hgb_head(seed=0):
    from sklearn.ensemble import HistGradientBoostingClassifier

    def fit(X, y):
        w = np.where(y, (~y).sum() / max(y.sum(), 1), 1.0)
        m = HistGradientBoostingClassifier(learning_rate=0.05, max_iter=300, max_leaf_nodes=15, min_samples_leaf=20,
                                           l2_regularization=1.0, max_features=0.3, early_stopping=False, random_state=seed)
        m.fit(X, y, sample_weight=w)
        return lambda Xq: m.predict_proba(Xq)[:, 1]
    return fit


def cross_fit(H, Y, folds, head, extra=None):
    """Out-of-fold calibrated scores and nested flags per category (`cross_fit`'s scheme). `extra(train,
    query)`: extra columns for the rows `query` computed from the rows `train` (None: none)."""
    ks = np.unique(folds)
    n = len(Y)
    inner = {}

    def model(train, query_sets):
        Xtr = H[train] if extra is None else np.hstack([H[train], extra(train, train)])
        Xq = [H[q] if extra is None else np.hstack([H[q], extra(train, q)]) for q in query_sets]
        out = []
        for j in range(Y.shape[1]):
            f = head(Xtr, Y[train, j])
            out.append([f(x) for x in Xq])
        return [np.column_stack([o[i] for o in out]) for i in range(len(query_sets))]

    for a_i, a in enumerate(ks):
        for b in ks[a_i + 1:]:
            train = ~np.isin(folds, (a, b))
            pa, pb = model(train, [folds == b, folds == a])
            inner[(a, b)], inner[(b, a)] = pa, pb  # (k, j): fitted without k and j, scores j
        print(f"  pairs with fold {a} done", flush=True)
    scores, flags, raw = np.zeros((n, Y.shape[1])), np.zeros((n, Y.shape[1]), bool), np.zeros((n, Y.shape[1]))
    for k in ks:
        tr, te = folds != k, folds == k
        (pk,) = model(tr, [te])
        raw[te] = pk
        sel = np.full((n, Y.shape[1]), np.nan)
        for j in ks[ks != k]:
            sel[folds == j] = inner[(k, j)]
        for c in range(Y.shape[1]):
            ab = _fit_platt(sel[tr, c], Y[tr, c])
            cut = choose_threshold(_platt(ab, sel[tr, c]), Y[tr, c], min_precision=REAL_CHAT_FITTING.min_precision,
                                   min_recall=REAL_CHAT_FITTING.min_recall)
            scores[te, c] = _platt(ab, pk[:, c])
            flags[te, c] = scores[te, c] >= cut
    return SimpleNamespace(scores=pd.DataFrame(scores, columns=list(CATS)), flags=pd.DataFrame(flags, columns=list(CATS)))


def figures(r, lab) -> dict:
    from sklearn.metrics import average_precision_score

    Y = label_matrix(lab["art9"], list(CATS))
    v = evaluate_detector(r.flags, lab["art9"])
    pc = v.per_category.set_index("category")
    out = {"mAP(4)": float(np.mean([average_precision_score(Y[:, j], r.scores[c]) for j, c in enumerate(CATS)])),
           "macro-F1(4)": float(pc.loc[list(CATS), "f1"].mean())}
    for j, c in enumerate(CATS):
        out[f"AP {c}"] = float(average_precision_score(Y[:, j], r.scores[c]))
        out[f"F1 {c}"] = float(pc.loc[c, "f1"])
        out[f"P {c}"] = float(pc.loc[c, "precision"]) if pc.loc[c, "flagged"] else float("nan")
        out[f"R {c}"] = float(pc.loc[c, "recall"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hgb", action="store_true", help="also candidate 2: HistGradientBoosting heads")
    ap.add_argument("--no-vote", action="store_true", help="skip candidate 1")
    ap.add_argument("--dedup", type=float, default=None, metavar="COS",
                    help="leave rows of other chats at cosine >= COS out of each other's votes (near-duplicate check)")
    ap.add_argument("--user-side", action="store_true",
                    help="the user-side entry (corpora without replies): features without the first reply, votes from unit "
                         "[head | segment mean] vectors (no ablation run)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    det, lab, texts, feats, t1 = load(a.user_side)
    folds = fd.grouped_folds(lab)
    Y = label_matrix(lab["art9"], list(CATS))
    H = _head_matrix(feats, det.cats)
    print(f"{len(lab)} train rows, {H.shape[1]} head columns; positives {dict(zip(CATS, Y.sum(0).tolist()))} ({time.perf_counter() - t0:.0f} s)")
    res, rows = {}, []
    with threadpool_limits(1):
        ref = det.cross_fit(texts, lab["art9"], folds, features=feats, source="train", workers=1)
        res["cross_fit (shipped code)"] = SimpleNamespace(scores=ref.scores[list(CATS)], flags=ref.flags[list(CATS)])
        t = time.perf_counter()
        res["shipped features"] = cross_fit(H, Y, folds, logistic_head())
        print(f"shipped features: {time.perf_counter() - t:.0f} s", flush=True)
        if not a.no_vote:
            S, T, names = vote_matrix(feats, lab, t1, a.dedup, ("head", "mean") if a.user_side else ("head", "mean", "reply"))
            print("vote targets:", dict(zip(names, np.nansum(T, 0).astype(int).tolist())), flush=True)
            cands = [("+ neighbour vote (Art. 9 + IAB): candidate 1", slice(None))]
            if not a.user_side:
                cands.append(("+ neighbour vote, Art. 9 part only (ablation)", slice(0, len(VOTE_ART9))))
            for name, cols in cands:
                t = time.perf_counter()
                res[name] = cross_fit(H, Y, folds, logistic_head(), extra=lambda tr, q, cols=cols: votes(S, T[:, cols], tr, q))
                print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        if a.hgb:
            t = time.perf_counter()
            res["HistGradientBoosting heads: candidate 2"] = cross_fit(H, Y, folds, hgb_head())
            print(f"hgb: {time.perf_counter() - t:.0f} s", flush=True)
    base = res["shipped features"]
    for name, r in res.items():
        f = figures(r, lab)
        diff = fd.paired_bootstrap(lab, base, r) if name != "shipped features" else {"macro-F1(4)": "-", "mAP(4)": "-"}
        rows.append({"candidate": name, **{k: round(v, 3) for k, v in f.items()}, "mAP(4) - shipped": diff["mAP(4)"],
                     "macro-F1(4) - shipped": diff["macro-F1(4)"]})
        print(f"{name}: mAP(4) {f['mAP(4)']:.3f}, nested macro-F1(4) {f['macro-F1(4)']:.3f}; vs shipped features: {diff}", flush=True)
    out = pd.DataFrame(rows)
    OUT.mkdir(exist_ok=True)
    p = OUT / ("detector_neighbour_vote_train7857" + ("_user_side" if a.user_side else "") + ("_hgb" if a.hgb else "") + (f"_dedup{a.dedup:g}" if a.dedup else "") + ".csv")
    out.to_csv(p, index=False)
    print(out.to_string())
    print(f"wrote {p} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
