"""Near-duplicate check of the neighbour vote's TEST gain (issue 15, session 8): ShareGPT holds one conversation
under several chat ids, so the split by chat does not keep duplicates apart. Counts the TEST rows with a train-pool
row at cosine >= 0.90-0.99 (vote vectors) and scores TEST with the shipped params, with those pool rows left out of
each test row's vote. Then the de-duplicated TEST view: the shipped params as scored, on the TEST rows without a
train-pool row at cosine >= 0.95 (per category precision / recall / F1 with CIs). Reads the TEST split: a check of
a shipped figure, not a choice.

    CHAT_AD_AUDIT_CACHE=... OMP_NUM_THREADS=1 .venv/bin/python bench/detector_vote_duplicates.py [--user-side]

`--user-side`: the same for the `minilm_user_side` entry (corpora without replies; features without the
reply, vote on [head | segment mean]).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data" / "labels"))
sys.path.insert(0, str(ROOT))
import fit_defaults as fd  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.detector.evaluation import evaluate_detector  # noqa: E402
from analysis.detector.features import head_columns, reply_columns  # noqa: E402
from analysis.detector.model import SensitiveDetector  # noqa: E402
from analysis.detector.vote import chat_of, vote_shares, vote_vectors  # noqa: E402
from analysis.util.embeddings import default_cache_dir  # noqa: E402

lab = fd.load_labels()
texts = fd.load_documents(lab).tolist()
tr = (lab["split"] == "train").to_numpy()
USER_SIDE = "--user-side" in sys.argv[1:]
det = SensitiveDetector(backend="minilm")
if USER_SIDE:
    det = det.for_corpus(None)[0]  # the shipped file's user-side entry
cache = default_cache_dir() / "gold_features" / "detector_features_minilm.parquet"
uf = fd.features(det, lab["conversation_id"], texts, cache)
feats = pd.concat([uf, head_columns(texts, "minilm")] + ([] if USER_SIDE else [reply_columns(fd.load_replies(lab), "minilm")]), axis=1)
pool = det.vote_pool()
te = ~tr
lte = lab[te].reset_index(drop=True)
fte = feats[te].reset_index(drop=True)
V = vote_vectors(fte, pool.blocks)
S = V @ pool.vectors.T
mx = S.max(1)
for t in (0.90, 0.95, 0.98, 0.99):
    print(f"TEST rows with a pool row at cosine >= {t}: {(mx >= t).sum()} of {len(mx)}")
tte = [t for t, k in zip(texts, te) if k]

def score(thr):
    out = pool.votes(V, chat_of(lte["conversation_id"])) if thr is None else _votes_excl(thr)
    f = pd.concat([fte, pd.DataFrame(out, columns=[f"emb__vote_{n}" for n in pool.names])], axis=1)
    r = det.detect(tte, lte["conversation_id"], features=f)
    v = evaluate_detector(r.flags, lte["art9"])
    return fd.macro_f1(v), fd.mean_ap(r.scores, lte["art9"]), r

def _votes_excl(thr):
    """NeighbourVote.votes with the pool rows at cosine >= thr to the query left out too."""
    Sm = S.copy()
    Sm[pool.same_chat(chat_of(lte["conversation_id"]))] = -np.inf
    Sm[Sm >= thr] = -np.inf
    return vote_shares(Sm, pool.targets, pool.k, pool.temperature)

base = score(None)
print(f"shipped, as scored: macro-F1(4) {base[0]:.3f} mAP(4) {base[1]:.3f}")
for thr in (0.98, 0.95, 0.90):
    m = score(thr)
    print(f"pool rows at cosine >= {thr} left out: macro-F1(4) {m[0]:.3f} mAP(4) {m[1]:.3f}")
# which test rows have near-duplicates, and are they positives?
pos = lte["art9"].astype(str).str.contains("health|religion|politics|ethnicity")
print("near-dup (>=0.95) test rows that are Art.9(4) positive:", int((pos.to_numpy() & (mx >= 0.95)).sum()), "of", int(pos.sum()))

# the de-duplicated TEST view: the same flags and scores, on the rows without a near-copy in the training split
keep = mx < 0.95
lk = lte[keep].reset_index(drop=True)
v = evaluate_detector(base[2].flags[keep].reset_index(drop=True), lk["art9"])
print(f"\nde-duplicated TEST view ({keep.sum()} of {len(keep)} rows, none with a train-pool row at cosine >= 0.95): "
      f"macro-F1(4) {fd.macro_f1(v):.3f} mAP(4) {fd.mean_ap(base[2].scores[keep].reset_index(drop=True), lk['art9']):.3f}")
cols = ["category", "positives", "flagged", "precision", "precision_low", "precision_high", "recall", "recall_low",
        "recall_high", "f1", "f1_low", "f1_high"]
print(v.to_frame()[cols].round(3).to_string(index=False))
