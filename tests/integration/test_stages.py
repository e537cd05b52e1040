"""Stage runners on a small world: the artifacts later stages read, metrics, overrides."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.contract.settings import MappingSettings
from analysis.stages import mapping as mapping_stage


@pytest.mark.slow
def test_stage_outputs_on_a_small_world(small_world_dir, small_run, tmp_path):
    """The whole stage with truth topics: the tables the leakage stage reads, metrics, overrides."""
    ov = tmp_path / "ov.yaml"
    ov.write_text("topics:\n  hiking: '159'\n")
    res = mapping_stage.run(small_run, MappingSettings(use_truth_topics=True, overrides_file=str(ov), detector_backend="student",
                                                       min_labels_to_fit=100, seed=0))
    d = small_run / "data"
    cc = pd.read_parquet(d / "conversation_categories.parquet")
    assert {"conversation_id", "iab_id", "tier1_id", "iab_ids", "any_sensitive"} <= set(cc.columns)
    assert all(f"flag_{c}" in cc and f"score_{c}" in cc for c in res.detection.flags.columns)
    assert len(cc) == 1600 and cc["conversation_id"].is_unique
    tc = pd.read_parquet(d / "topic_categories.parquet")
    assert tc.set_index("topic").loc["hiking", "source"] == "override"
    dv = pd.read_parquet(d / "detector_validation.parquet")
    assert list(dv.columns[:5]) == ["category", "tp", "fn", "tn", "fp"] and (dv[["tp", "fn", "tn", "fp"]].sum(axis=1) == dv["n"]).all()
    applied = json.loads((d / "mapping_overrides_applied.json").read_text())
    assert applied["topics"][0]["to"] == "159" and applied["ad_nodes_in_use"]["trade_union"] == ["123", "383"]
    metrics = pd.DataFrame(json.loads((small_run / "metrics" / "02_ad_mapping.json").read_text()))
    assert {"precision", "recall", "prevalence_flagged", "tier1_accuracy_nonsensitive", "override_applied"} <= set(metrics["metric"])
    assert res.tier1_accuracy["accuracy"] >= 0.85
    # every conversation has its own tier-1 (or none) and tier-2; the topic override reaches its conversations
    assert {"conv_tier1_id", "conv_tier1_label", "conv_tier1_score", "conv_iab_id", "conv_category_source"} <= set(cc.columns)
    assert cc["conv_tier1_label"].notna().all()
    hiking = cc[cc["topic"].astype(str) == "hiking"]
    assert len(hiking) and (hiking["conv_category_source"] == "override_topic").all() and (hiking["conv_tier1_id"] == "150").all()
    assert {"category_mix", "top_tier1_share", "readable_label", "readable_name"} <= set(tc.columns) and tc["readable_label"].notna().all()
    # refitted on the world's 305 tier-1 labels by cross-fitting, validated out of fold (6,000 labels of the default world: see docs/mapping.md)
    t = res.conversation_tier1_accuracy
    assert "refitted" in res.categorizer_source and t["accuracy"] >= 0.7 and t["ci_low"] < t["accuracy"] < t["ci_high"], t
    assert {"tier1_accuracy_conversation_nonsensitive", "tier1_recall"} <= set(metrics["metric"])
    assert set(res.tier1_confusion.columns) >= {"tier1", "labeled", "correct", "recall", "precision"}
    # the simulator's prevalence sits near what the detector flags
    prev = metrics[metrics["metric"] == "prevalence_flagged"].dropna(subset=["truth"])
    assert (abs(prev["estimate"] - prev["truth"]) < 0.03).all()
    # published tables suppress small cells
    assert res.prevalence_by_region()["users"].map(lambda v: isinstance(v, str) or v >= 10).all()
    small = lambda v: not isinstance(v, str) and 0 < v < 10  # noqa: E731
    per_tier1, table = res.tier1_validation_tables()
    assert not table.map(small).any().any() and not per_tier1[["labeled", "categorized_as", "correct"]].map(small).any().any()
    assert per_tier1.loc[per_tier1["labeled"].astype(str) == "<10", "recall"].isna().all()
    per_cat, confusion = res.detector_validation_tables()
    assert not confusion.map(small).any().any() and not per_cat[["positives", "flagged", "tp", "fp", "fn"]].map(small).any().any()
