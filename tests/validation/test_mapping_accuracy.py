"""Stage-01 topics mapped to IAB tier 1 on a mid-sized world: the accuracy target against the truth."""

from __future__ import annotations

import pytest

from analysis.ingest.conversations import build_conversations
from analysis.mapping.accuracy import tier1_accuracy
from analysis.mapping.mapper import TopicMapper
from analysis.simulate import simulate
from analysis.topics.modeler import TopicModeler


@pytest.mark.slow
def test_stage01_topics_map_to_the_true_tier1_on_a_mid_sized_world():
    """The issue's target on stage 01's own clusters, not the simulator's topics: tier-1 accuracy of
    non-sensitive conversations >= 0.85 against the truth. 10,000 conversations: below that the
    clusters themselves are too impure (6,000: majority-tier-1 ceiling 0.84; 1,600: 0.70)."""

    w = simulate({"seed": 7, "n_users": 2500, "n_conversations": 10_000, "n_impressions": 1000})
    conv = build_conversations(w.messages, w.users)
    res = TopicModeler().fit(conv)
    m = TopicMapper(backend="minilm").map(res.topic_info, dict(zip(conv["conversation_id"], conv["document"])))
    a = res.assignments.merge(w.conversation_truth[["conversation_id", "iab_tier1", "art9"]], on="conversation_id")
    a = a[a["art9"].map(len).eq(0) & a["iab_tier1"].notna()]
    t = tier1_accuracy(a["topic"].map(dict(zip(m.table["topic"], m.table["tier1_id"]))), a["iab_tier1"].astype(str), a["topic"])
    assert t["n"] > 5000 and t["accuracy"] >= 0.85 and t["ci_low"] < t["accuracy"] < t["ci_high"], t
