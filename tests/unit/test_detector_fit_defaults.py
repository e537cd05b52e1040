"""The refit path of the shipped detector (data/labels/fit_defaults.py) on a grown label set: bad label
rows are errors naming file and row, and cached features are reused only where the text is unchanged."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.contract.schemas import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data" / "labels"))
import fit_defaults  # noqa: E402


def _gold(tmp_path, monkeypatch, split_rows, label_ids):
    gold = tmp_path / "gold"
    gold.mkdir()
    pd.DataFrame(split_rows, columns=["conversation_id", "stratum", "split"]).to_csv(gold / "split.csv", index=False)
    pd.DataFrame({"conversation_id": label_ids, "art9": ["health"] + [""] * (len(label_ids) - 1)}).to_csv(gold / "labels.csv", index=False)
    for k, f in enumerate(fit_defaults.OLD):
        pd.DataFrame({"conversation_id": [f"old{k}_0"], "art9": [""]}).to_csv(tmp_path / f, index=False)
    monkeypatch.setattr(fit_defaults, "GOLD", gold)
    monkeypatch.setattr(fit_defaults, "HERE", tmp_path)
    return gold


def test_a_gold_label_row_missing_from_the_split_names_file_and_row(tmp_path, monkeypatch):
    gold = _gold(tmp_path, monkeypatch, [("a_0", "random", "train"), ("b_0", "random", "test")], ["a_0", "b_0", "c_0"])
    with pytest.raises(DataError, match=r"labels\.csv: row 3, column 'conversation_id'.*'c_0' is not in .*split\.csv") as e:
        fit_defaults.load_labels()
    assert e.value.file == str(gold / "labels.csv")


def test_a_train_row_sharing_a_chat_with_the_test_split_is_refused(tmp_path, monkeypatch):
    rows = [("a_0", "random", "train"), ("b_0", "random", "test"), ("b_4", "r3random", "train")]
    _gold(tmp_path, monkeypatch, rows, ["a_0", "b_0", "b_4"])
    with pytest.raises(DataError, match=r"split\.csv: row 3, column 'split'.*'b_4' belongs to a ShareGPT chat"):
        fit_defaults.load_labels()


def test_a_label_row_whose_conversation_the_corpus_lacks_names_file_and_row(tmp_path, monkeypatch):
    _gold(tmp_path, monkeypatch, [("a_0", "random", "train"), ("b_0", "random", "test"), ("d_1", "r3random", "train")],
          ["a_0", "b_0", "d_1"])
    lab = fit_defaults.load_labels()
    assert set(lab["conversation_id"]) == {"a_0", "b_0", "d_1", "old0_0", "old1_0"}
    docs = pd.Series({"a_0": "hi", "b_0": "there", "old0_0": "x", "old1_0": "y"})
    with pytest.raises(DataError, match=r"labels\.csv: row 3, column 'conversation_id'.*'d_1' has no user turn"):
        fit_defaults.documents_for(lab, docs)
    lab = lab[lab["conversation_id"] != "d_1"]
    assert fit_defaults.documents_for(lab, docs).tolist() == [docs[i] for i in lab["conversation_id"]]


class _CountingDetector:
    """The parts of SensitiveDetector that `fit_defaults.features` uses; records what it computes."""
    backend, spec = "minilm", "spec-v1"
    embedding = SimpleNamespace(max_segments=24)

    def __init__(self):
        self.seen = []

    def features(self, texts, head=None, vote=None):
        assert head is False and vote is False  # the cache holds the segment and lexicon features; head and vote are added apart
        self.seen.append(list(texts))
        return pd.DataFrame({"health__strong": [t.count("pain") for t in texts], "emb__mean_0": [len(t) / 10 for t in texts]})


def test_cached_features_are_reused_only_for_unchanged_texts(tmp_path):
    cache = tmp_path / "feats.parquet"
    det = _CountingDetector()
    first = fit_defaults.features(det, ["a", "b"], ["back pain", "taxes"], cache)
    assert det.seen == [["back pain", "taxes"]]
    # a grown label set (c new) where one known text changed (b): only those two are computed
    again = fit_defaults.features(det, ["c", "a", "b"], ["pain pain", "back pain", "tax law"], cache)
    assert det.seen[1] == ["pain pain", "tax law"]
    assert again["health__strong"].tolist() == [2, 1, 0]
    assert np.allclose(again["emb__mean_0"], [0.9, 0.9, 0.7])
    assert again.iloc[1].equals(first.iloc[0])
    fit_defaults.features(det, ["a", "b", "c"], ["back pain", "tax law", "pain pain"], cache)
    assert len(det.seen) == 2  # all cached now
    det.spec = "spec-v2"  # a lexicon or prototype change invalidates every row
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    assert det.seen[2] == ["back pain"]



def test_the_cache_key_does_not_depend_on_where_the_lexicon_file_was_read_from(tmp_path):
    """The spec's `source` is the path of art9.yaml, which differs between checkouts and worktrees: it
    must not invalidate the shared cache (it did: every worktree recomputed all rows); its content does."""
    import dataclasses

    from analysis.util.taxonomy import load_art9

    cache, det = tmp_path / "feats.parquet", _CountingDetector()
    det.spec = load_art9()
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    det.spec = dataclasses.replace(det.spec, source="/another/checkout/analysis/data/art9.yaml")
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    assert len(det.seen) == 1
    det.spec = dataclasses.replace(det.spec, neutralize=(*det.spec.neutralize, r"back pain relief"))
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    assert len(det.seen) == 2

def test_a_retrained_student_invalidates_its_cached_features(tmp_path, monkeypatch):
    """The `student` backend keeps its name when retrained: its file's hash is part of the key."""
    cache, det = tmp_path / "feats.parquet", _CountingDetector()
    det.backend = "student"
    monkeypatch.setattr(fit_defaults, "student_fingerprint", lambda: "aaaa")
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    assert len(det.seen) == 1
    monkeypatch.setattr(fit_defaults, "student_fingerprint", lambda: "bbbb")
    fit_defaults.features(det, ["a"], ["back pain"], cache)
    assert len(det.seen) == 2


def test_rows_are_told_apart_by_labeling_round():
    lab = pd.DataFrame({"stratum": ["random", "r2nn:ethnicity", "r3hard:health", "r4random", None, "lexicon:health"],
                        "source": ["gold"] * 5 + ["old"]})
    assert fit_defaults.label_round(lab).tolist() == ["round 1", "round 2", "round 3", "round 4", "round 1", "older labels"]
