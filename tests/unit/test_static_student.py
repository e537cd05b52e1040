"""The packaged static student of MiniLM (`student` backend, issue 15 session 9): it loads from the package
file alone, with the network refused, and reproduces the vectors stored with it."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from analysis.util.embeddings import STUDENT, Embedder, load_student, student_path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_packaged_student_loads_offline_and_reproduces_its_stored_vectors(tmp_path, no_network):
    with np.load(student_path(), allow_pickle=False) as z:
        texts, want = [str(t) for t in z["check_texts"]], z["check_vectors"]
    assert len(texts) >= 4 and want.shape == (len(texts), 256)
    e = Embedder(STUDENT, cache_dir=tmp_path)
    assert e.model_id.startswith("student-") and e.dim == 256
    np.testing.assert_allclose(e.encode(texts), want, atol=1e-5)
    # a second embedder on the same cache serves the same vectors from it
    again = Embedder(STUDENT, cache_dir=tmp_path)
    np.testing.assert_allclose(again.encode(texts), want, atol=1e-5)
    assert again.stats.cached == len(set(texts)) and again.stats.computed == 0


def test_the_student_reads_what_the_teacher_reads_and_keeps_topics_apart():
    m = load_student()
    assert m.max_length == 256  # MiniLM's 256 word pieces
    x = m.encode(["my doctor says my blood pressure is far too high", "I was diagnosed with hypertension last week",
                  "how do I sort a list of dictionaries in python by a key"], use_multiprocessing=False)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.1


def test_the_shipped_student_entries_score_a_corpus_with_and_without_replies(tmp_path, no_network):
    """The fast detector option: the `student` entry (head + first reply + its own vote pool) scores a corpus
    with replies; without any, its `student_user_side` entry (vote on [head | mean]) does."""
    from analysis.detector.model import SensitiveDetector

    det = SensitiveDetector(backend="student", cache_dir=tmp_path)
    texts = ["I was diagnosed with type 2 diabetes last month and my doctor wants me to start insulin. What should I eat now?",
             "write a python function that reverses a linked list and explain its complexity"]
    replies = ["I am sorry to hear about your diagnosis. Managing type 2 diabetes mostly comes down to steady carbohydrate "
               "intake, fibre and regular meals.", "Here is a function that reverses a singly linked list in place, in O(n) time."]
    r = det.detect(texts, ["a_0", "b_0"], replies=replies)
    assert r.params.with_reply and r.params.vote["pool"] == "detector_vote_student.npz"
    assert r.flags.loc[0, "health"] and not r.flags.loc[1].any()
    u = det.detect(texts, ["a_0", "b_0"])
    assert not u.params.with_reply and u.params.vote["blocks"] == ["head", "mean"]
    assert u.scores.loc[0, "health"] > 0.5 > u.scores.loc[1, "health"]
