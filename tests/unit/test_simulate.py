"""The simulator's truths agree with its tables, worlds are reproducible, and the switches work."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.simulate import ART9, WorldConfig, load_catalog, simulate
from analysis.util.taxonomy import load_taxonomy


def test_catalog_covers_the_required_topics():
    cat = load_catalog()
    kinds = pd.Series([t["kind"] for t in cat]).value_counts()
    assert kinds["ad"] >= 25 and kinds["noise"] >= 3
    per_cat = pd.Series([t["category"] for t in cat if t["kind"] == "sensitive"]).value_counts()
    assert set(per_cat.index) == set(ART9) and (per_cat >= 3).all()
    ids = set(load_taxonomy()["id"])
    for t in cat:
        if t["kind"] != "noise":
            assert t["iab_id"] in ids, f"{t['key']}: IAB id {t['iab_id']} is not an IAB 3.0 node"
        assert len(t["openers"]) >= 5, t["key"]


def test_same_seed_same_world_other_seed_other_world():
    cfg = {"seed": 3, "n_users": 50, "n_conversations": 120, "n_impressions": 3000}
    a, b, c = simulate(cfg), simulate(cfg), simulate({**cfg, "seed": 4})
    pd.testing.assert_frame_equal(a.messages, b.messages)
    pd.testing.assert_frame_equal(a.impressions.drop(columns="targeting_sources"), b.impressions.drop(columns="targeting_sources"))
    assert a.ground_truth["leakage"] == b.ground_truth["leakage"]
    assert not a.messages["text"].equals(c.messages["text"])


def test_a_world_without_text_is_the_same_world():
    """simulate(text=False) (the exposure-design benchmark) leaves out the messages and nothing else."""
    cfg = {"seed": 5, "n_users": 50, "n_conversations": 120, "n_impressions": 3000}
    a, b = simulate(cfg), simulate(cfg, text=False)
    assert len(b.messages) == 0 and list(b.messages.columns) == list(a.messages.columns)
    pd.testing.assert_frame_equal(a.impressions.drop(columns="targeting_sources"), b.impressions.drop(columns="targeting_sources"))
    pd.testing.assert_frame_equal(a.conversation_truth, b.conversation_truth)
    pd.testing.assert_frame_equal(a.filter_decisions, b.filter_decisions)
    assert a.ground_truth["leakage"] == b.ground_truth["leakage"]
    # "ai_chat" among the targeting sources is the simulator's chat_targeted (exposure_world_rows reads the latter)
    chat = a.impressions["targeting_sources"].map(lambda s: "ai_chat" in list(s))
    assert (chat.to_numpy(bool) == a.impression_truth["chat_targeted"].to_numpy(bool)).all()


def test_tables_follow_the_contract(small_world):
    w = small_world
    assert set(w.messages["role"]) == {"user", "assistant"}
    assert set(w.messages["modality"]) <= {"text", "voice"}
    assert w.messages.groupby("conversation_id")["user_id"].nunique().max() == 1
    assert not w.messages.duplicated(["conversation_id", "turn_index"]).any()
    assert w.impressions["impression_id"].is_unique and w.users["user_id"].is_unique
    assert w.messages["sent_at"].min() >= pd.Timestamp("2025-09-01", tz="UTC")
    assert w.messages["sent_at"].max() < pd.Timestamp("2026-04-02", tz="UTC")
    assert set(w.impressions["user_id"]) <= set(w.users["user_id"])


def test_realized_leak_rates_match_filter_decisions(small_world):
    w = small_world
    t = w.conversation_truth.merge(w.filter_decisions, on="conversation_id")
    for c in ART9:
        has = t["art9"].map(lambda xs: c in xs)
        gt = w.ground_truth["leakage"][c]
        assert gt["n_conversations"] == has.sum()
        assert gt["leak_rate_realized"] == pytest.approx((~t.loc[has, "blocked"]).mean(), abs=1e-12)
        # the estimand is the mean pass probability of this world's conversations about c
        assert gt["leak_rate"] == pytest.approx(t.loc[has, "p_pass"].mean(), abs=1e-12)
        assert gt["leak_rate"] <= gt["leak_rate_param"] + 1e-12  # mixed conversations can only be caught more
    assert (w.filter_decisions["blocked"] == (w.filter_decisions["score"] >= 0.5)).all()


def test_labels_agree_with_truth(small_world):
    w = small_world
    lab = w.labels.merge(w.conversation_truth, on="conversation_id", suffixes=("", "_truth"))
    assert len(lab) == len(w.labels) > 0
    assert (lab["art9"].map(sorted) == lab["art9_truth"].map(sorted)).all()
    assert (lab["iab_tier1"].fillna("") == lab["iab_tier1_truth"].fillna("")).all()


def test_chat_targeting_respects_the_policy(small_world):
    w = small_world
    imp = w.impressions.merge(w.impression_truth, on="impression_id").merge(w.users[["user_id", "region"]], on="user_id")
    ai = imp["targeting_sources"].map(lambda s: "ai_chat" in list(s))
    assert (ai == imp["chat_targeted"]).all()
    ct = imp[imp["chat_targeted"]]
    assert len(ct) > 0
    assert (ct["shown_at"] >= pd.Timestamp("2025-12-16", tz="UTC")).all()
    assert not ct["region"].isin(WorldConfig().excluded_regions).any()
    assert (ct["arm"] == "treatment").all()
    # the source conversation is the user's own, before the impression, and unblocked
    src = ct.merge(w.conversation_truth[["conversation_id", "user_id", "started_at"]], left_on="source_conversation_id", right_on="conversation_id", suffixes=("", "_src"))
    assert (src["user_id"] == src["user_id_src"]).all() and (src["started_at"] <= src["shown_at"]).all()
    blocked = set(w.filter_decisions.loc[w.filter_decisions["blocked"], "conversation_id"])
    assert not ct["source_conversation_id"].isin(blocked).any()


def test_lift_truth_recomputes_from_impression_truth(small_world):
    w = small_world
    imp = w.impressions.merge(w.impression_truth, on="impression_id").merge(w.users[["user_id", "region"]], on="user_id")
    inc_post = ~imp["region"].isin(WorldConfig().excluded_regions) & (imp["shown_at"] >= pd.Timestamp("2025-12-16", tz="UTC"))
    sel = imp[inc_post]
    truth = w.ground_truth["lift"]["included_post"]
    assert truth["rel"] == pytest.approx(sel["p_click"].mean() / sel["p_click_counterfactual"].mean() - 1)
    assert truth["rel"] > 0.01
    # realized clicks agree with their probabilities (within 4 SD)
    p = imp["p_click"].to_numpy()
    assert abs(imp["clicked"].sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    assert w.ground_truth["lift"]["holdout_arm"]["rel"] == 0


def test_null_world_has_no_lift_and_no_leakage():
    w = simulate({"seed": 5, "mode": "null", "n_users": 200, "n_conversations": 600, "n_impressions": 20000})
    assert w.ground_truth["counts"]["impressions_chat_targeted"] == 0
    assert w.ground_truth["lift"]["included_post"]["abs"] == 0
    assert all(v["leak_rate"] == 0 and v["n_passed"] == 0 for v in w.ground_truth["leakage"].values())


def test_violation_world_targets_an_excluded_region():
    w = simulate({"seed": 5, "mode": "violation", "n_users": 300, "n_conversations": 1200, "n_impressions": 40000})
    v = w.ground_truth["violations"]
    assert v["violation_regions"] == ["DE"]
    assert v["chat_targeted_impressions_in_excluded_regions"] > 0 and set(v["by_region"]) == {"DE"}


def test_text_is_varied_not_one_template_per_topic(small_world):
    w = small_world
    first = w.messages[(w.messages["role"] == "user") & (w.messages["turn_index"] == 0)].merge(w.conversation_truth[["conversation_id", "topic"]], on="conversation_id")
    distinct = first.groupby("topic")["text"].nunique()
    counts = first.groupby("topic").size()
    big = counts[counts >= 20].index
    assert (distinct[big] / counts[big]).median() > 0.8
    assert w.conversation_truth["topic_b"].notna().mean() > 0.05  # mixed-topic conversations exist


def test_bad_world_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown world parameter"):
        WorldConfig.from_dict({"n_userz": 5})
    with pytest.raises(ValueError, match="unknown world mode"):
        WorldConfig.from_dict({"mode": "chaos"})
    with pytest.raises(ValueError, match="p_sensitive"):
        WorldConfig.from_dict({"p_sensitive": 1.5})
