"""Topic -> IAB mapping and the stage-02 runner: accuracy against the simulator's truth, overrides,
outputs the leakage stage reads, and a clear failure when stage 01 has not run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.contract.rundir import RunDir, StageInputError
from analysis.contract.schemas import DataError
from analysis.contract.settings import MappingSettings
from analysis.mapping.accuracy import tier1_accuracy
from analysis.mapping.labels import read_labels
from analysis.mapping.mapper import TopicMapper, topic_info_from_assignments
from analysis.mapping.overrides import Overrides
from analysis.stages import mapping as mapping_stage
from analysis.stages.mapping import _labels
from analysis.util.taxonomy import TaxonomyError


def test_stage_fails_clearly_without_stage_01(small_run):
    with pytest.raises(StageInputError, match="topics.parquet, topic_info.parquet not found .* run stage 01"):
        mapping_stage.run(small_run, MappingSettings(seed=0))


def test_topics_map_to_the_right_tier1_for_ad_topics(small_world, small_run):
    """With the simulator's topics as the clustering, ad topics land in their true IAB tier-1."""
    conv = pd.read_parquet(small_run / "data" / "conversations.parquet")
    truth = small_world.conversation_truth
    info = topic_info_from_assignments(conv, truth[["conversation_id", "topic"]])
    m = TopicMapper(backend="static", threshold=0.2).map(info, dict(zip(conv["conversation_id"], conv["document"])))
    t = m.table.set_index("topic")
    kinds = {x["key"]: (x["kind"], x.get("iab_id")) for x in small_world.ground_truth["topics"]}
    from analysis.util.taxonomy import tier1_of

    ad = [k for k, (kind, _) in kinds.items() if kind == "ad" and k in t.index]
    true_t1 = tier1_of(pd.Series([kinds[k][1] for k in ad], index=ad))
    acc = (t.loc[ad, "tier1_id"] == true_t1).mean()
    assert len(ad) >= 25 and acc >= 0.85, t.loc[ad, ["path", "score"]]
    assert all(len(x) == 3 for x in t["top3"]) and set(t["source"]) <= {"similarity", "unmapped"}
    # the sensitive topics that have an IAB home land in it
    assert t.loc["health_diabetes", "art9_node"] == "health" and t.loc["politics_elections", "art9_node"] == "politics"


def test_overrides_win_and_are_recorded(tmp_path):
    p = tmp_path / "ov.yaml"
    p.write_text("topics:\n  hiking: '159'\n  small_talk: unmapped\nad_nodes:\n  health: ['286']\n")
    ov = Overrides.load(p)
    info = pd.DataFrame({"topic": ["hiking", "small_talk"], "label": ["hiking", "small_talk"],
                         "keywords": [["trail", "boots", "hike"], ["hi", "joke"]], "representative_docs": [["best boots for a day hike"], ["tell me a joke"]]})
    m = TopicMapper(backend="static", threshold=0.0, overrides=ov).map(info)
    t = m.table.set_index("topic")
    assert t.loc["hiking", "iab_id"] == "159" and t.loc["hiking", "source"] == "override"
    assert t.loc["small_talk", "source"] == "unmapped" and pd.isna(t.loc["small_talk", "iab_id"])
    assert {o["topic"] for o in m.overrides_applied} == {"hiking", "small_talk"} and ov.ad_nodes == {"health": ["286"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("topics:\n  hiking: 'nope'\n")
    with pytest.raises(TaxonomyError, match="bad.yaml: topic 'hiking': unknown IAB node id 'nope'"):
        Overrides.load(bad)


def test_tier1_accuracy_interval_is_cluster_robust_by_topic():
    """Errors come in whole topics: the interval must be wider than one over independent conversations."""
    from statsmodels.stats.proportion import proportion_confint


    topic = np.repeat(np.arange(40), 50)
    pred = np.where(np.isin(topic, [3, 11, 17, 29]), "wrong", "right")  # 4 of 40 topics mapped wrong: 90%
    t = tier1_accuracy(pred, np.full(len(pred), "right"), topic)
    lo, hi = proportion_confint(1800, 2000, method="wilson")
    assert t["accuracy"] == 0.9 and t["topics"] == 40
    assert t["ci_high"] - t["ci_low"] > 3 * (hi - lo) and t["ci_low"] < 0.85
    none = tier1_accuracy([None, "a"], ["a", "a"], [1, 2])
    assert none["accuracy"] == 0.5 and none["unmapped"] == 0.5


def test_labels_from_several_files_and_their_errors(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("conversation_id,art9\nc1,health;religion\nc2,\n")
    b.write_text("conversation_id,art9\nc3,politics\n")
    lab = read_labels([a, b])
    assert lab.set_index("conversation_id")["art9"].to_dict() == {"c1": ["health", "religion"], "c2": [], "c3": ["politics"]}
    b.write_text("conversation_id,art9\nc1,politics\n")
    with pytest.raises(ValueError, match="conversation 'c1' is labeled in more than one row/file"):
        read_labels([a, b])
    b.write_text("conversation_id,art9\nc3,politics\nc4,astrology\n")
    with pytest.raises(DataError, match=r"b\.csv: row 2, column 'art9': expected a list of Art. 9 categories.*'astrology'"):
        read_labels([a, b])
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_labels(tmp_path / "nope.csv")
    # tier-1 as people write it: ids or names in any case, 'none' for no tier-1; anything else is named
    b.write_text("conversation_id,art9,iab_tier1\nc3,politics,Politics\nc4,,food & drink\nc5,,596\nc6,,none\n")
    assert read_labels(b).set_index("conversation_id")["iab_tier1"].fillna("-").to_dict() == {"c3": "386", "c4": "210", "c5": "596", "c6": "-"}
    b.write_text("conversation_id,art9,iab_tier1\nc3,politics,Politcs\n")
    with pytest.raises(DataError, match=r"row 1, column 'iab_tier1': not an IAB 3.0 tier-1 id or name.*'Politcs'"):
        read_labels(b)


def test_labels_split_keeps_one_split_and_refuses_labels_without_one(tmp_path):
    """make sharegpt validates the shipped models on the gold set's frozen test split only."""
    f = tmp_path / "gold.csv"
    f.write_text("conversation_id,split,art9\nc1,train,health\nc2,test,\nc3,test,politics\nc4,test,\n")
    conv = pd.DataFrame({"conversation_id": ["c1", "c2", "c3"]})
    notes = []
    lab = _labels(RunDir.of(tmp_path / "run"), MappingSettings(labels_path=str(f), labels_split="test"), conv, notes)
    assert sorted(lab["conversation_id"]) == ["c2", "c3"] and "split 'test': 3 conversations" in notes[0]
    f.write_text("conversation_id,art9\nc1,health\n")
    with pytest.raises(DataError, match=r"gold\.csv: column 'split': labels_split='test' is set but the labels have no split column"):
        _labels(RunDir.of(tmp_path / "run"), MappingSettings(labels_path=str(f), labels_split="test"), conv, [])
