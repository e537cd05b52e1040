"""The sensitive-topic detector on a simulated world with 6,000 labels: precision and recall targets."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.detector.evaluation import evaluate_detector
from analysis.detector.model import SensitiveDetector
from analysis.ingest.conversations import build_conversations
from analysis.simulate import simulate


@pytest.mark.slow
def test_detector_meets_precision_and_recall_on_a_simulated_world():
    """Notebook 02's default, 5-fold cross-fitting, on a world with the default world's 6,000 labels
    (here every conversation, labeled by the simulator's truth): out-of-fold precision and recall
    >= 0.90 for every category and micro-averaged. And the cv_folds 1 path (fit on the labeled half,
    judge the other half) micro-averaged: with ~100 positives a category in a half, its per-category
    estimates scatter by about +-0.03 from world to world (seeds 8-11 gave lowest categories of
    0.83-0.92, in fp32 and bf16 alike), too noisy for a per-category bar."""
    w = simulate({"seed": 8, "n_users": 1500, "n_conversations": 6000, "n_impressions": 2000, "label_share": 0.5})
    conv = build_conversations(w.messages, w.users)
    truth = w.conversation_truth.set_index("conversation_id").loc[conv["conversation_id"], "art9"].reset_index(drop=True)
    det = SensitiveDetector(backend="minilm")
    docs = conv["document"].tolist()
    # segments and lexicon, as a refit reads them but without the head vector (a MiniLM pass more) and so without the
    # shipped neighbour vote (it needs the head vector; a refit never reads it)
    feats = det.features(docs, head=False, vote=False)
    cf = det.cross_fit(docs, truth, np.arange(len(docs)) % 5, features=feats)
    v = evaluate_detector(cf.flags, truth)
    per = v.per_category.set_index("category")
    assert (per["positives"] >= 150).all()
    bad = per[(per["precision"] < 0.9) | (per["recall"] < 0.9)]
    assert bad.empty, bad[["tp", "fp", "fn", "precision", "recall"]]
    m = v.micro.iloc[0]
    assert m.precision >= 0.93 and m.recall >= 0.93 and m.precision_low >= 0.9 and m.recall_low >= 0.9
    # cv_folds 1: fit on the labeled half, judge the other half
    tune = conv["conversation_id"].isin(w.labels["conversation_id"]).to_numpy()
    half = SensitiveDetector(backend="minilm")
    half.fit([d for d, t in zip(docs, tune) if t], truth[tune].reset_index(drop=True), features=feats[tune].reset_index(drop=True))
    d = half.detect([d for d, t in zip(docs, tune) if not t], features=feats[~tune].reset_index(drop=True))
    m1 = evaluate_detector(d.flags, truth[~tune].reset_index(drop=True)).micro.iloc[0]
    assert m1.precision >= 0.93 and m1.recall >= 0.93 and m1.precision_low >= 0.9 and m1.recall_low >= 0.9
    # the passing-mention traps of the catalogue stay unflagged
    traps = conv["document"].str.contains("race condition|health check endpoint|god mode|master/slave", case=False).to_numpy()
    clean = traps & np.array([len(t) == 0 for t in truth])
    assert clean.sum() >= 20 and d.flags.to_numpy()[clean[~tune]].any(axis=1).mean() <= 0.05
    assert cf.flags.to_numpy()[clean].any(axis=1).mean() <= 0.05
