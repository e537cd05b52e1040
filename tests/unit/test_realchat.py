"""The real-chat world: real texts and hand labels inside, users, regions, the filter and the ad log
simulated around them with the truth the labels give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.contract.schemas import DataError
from analysis.ingest.inputs import load_inputs
from analysis.realchat import RealWorldConfig, chat_of, simulate_real
from analysis.util.regions import DEFAULT_POLICY_DATE, is_excluded

CHATS = Path(__file__).resolve().parents[1] / "data" / "inputs" / "sharegpt_truncated" / "sharegpt.json"


@pytest.fixture
def labels(tmp_path) -> Path:
    """Hand labels of the 11 complete conversations, as people write them (tier-1 names, ';' lists)."""
    rows = ["conversation_id,art9,iab_tier1"]
    arts = ["", "", "", "health", "", "religion", "", "", "", "", "health;politics"]
    tier = ["Sports", "food & drink", "Travel", "Medical Health", "596", "Religion & Spirituality", "Pets", "Personal Finance", "sports", "none", "Politics"]
    ids = [f"sg{c // 2}_{c % 2}" for c in range(11)]
    rows += [f"{i},{a},{t}" for i, a, t in zip(ids, arts, tier)]
    p = tmp_path / "labels.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_real_world_is_built_on_the_labeled_conversations(labels, tmp_path):
    cfg = RealWorldConfig(seed=1, chats_per_user=1.0, impressions_per_user=400, label_share=0.5, excluded_share=0.4)
    w = simulate_real(CHATS, [labels], cfg)
    ct = w.conversation_truth.set_index("conversation_id")
    assert len(ct) == 11 and set(w.messages["conversation_id"]) == set(ct.index)
    assert ct.loc["sg1_1", "art9"] == ["health"] and ct.loc["sg5_0", "art9"] == ["health", "politics"]
    assert ct.loc["sg0_1", "iab_tier1"] == "210" and pd.isna(ct.loc["sg4_1", "iab_tier1"])  # "none": no tier-1
    # parts of one ShareGPT chat share a user
    owner = w.messages.groupby("conversation_id")["user_id"].first()
    assert (owner.groupby(chat_of(owner.index.to_series())).nunique() == 1).all()
    # the filter's truth: the expected pass probability of each category's conversations
    leak = w.ground_truth["leakage"]
    health = ct[ct["art9"].map(lambda v: "health" in v)]
    assert leak["health"]["n_conversations"] == 2
    assert leak["health"]["leak_rate"] == pytest.approx(health["p_pass"].mean())
    assert leak["trade_union"]["leak_rate"] is None
    assert ct.loc["sg5_0", "p_pass"] == pytest.approx((1 - cfg.filter_catch["health"]) * (1 - cfg.filter_catch["politics"]))
    # chat-targeted ads: after the policy date, in included regions only, the source conversation's labeled tier-1
    imp = w.impressions.merge(w.impression_truth, on="impression_id").merge(w.users, on="user_id")
    ct_imp = imp[imp["chat_targeted"]]
    assert len(ct_imp) > 0 and (ct_imp["shown_at"] >= pd.Timestamp(DEFAULT_POLICY_DATE, tz="UTC")).all()
    assert not is_excluded(ct_imp["region"]).any()
    assert (ct_imp["ad_category"].to_numpy() == ct.loc[ct_imp["source_conversation_id"], "iab_tier1"].to_numpy()).all()
    assert ct_imp["targeting_sources"].map(lambda v: "ai_chat" in list(v)).all()
    assert not ct.loc[ct_imp["source_conversation_id"], "blocked"].any()  # a blocked conversation never targets
    assert "arm" not in w.impressions  # no holdout by default, as in most external audits


def test_real_world_writes_inputs_that_ingest_reads_as_written(labels, tmp_path):
    w = simulate_real(CHATS, [labels], {"seed": 2, "label_share": 1.0, "chats_per_user": 2.0})
    out = w.write(tmp_path / "world")
    inp = load_inputs(out)
    assert len(inp.quarantine) == 0
    assert inp.labels.set_index("conversation_id")["iab_tier1"].to_dict()["sg1_0"] == "653"  # written as a name, read as the id
    gt = json.loads((out / "ground_truth.json").read_text())
    assert gt["world_kind"] == "real_chats" and gt["counts"]["conversations"] == 11
    again = simulate_real(CHATS, [labels], {"seed": 2, "label_share": 1.0, "chats_per_user": 2.0})
    pd.testing.assert_frame_equal(w.impressions.drop(columns="targeting_sources"), again.impressions.drop(columns="targeting_sources"))


def test_labels_that_match_no_chat_are_an_error(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("conversation_id,art9\nnope_0,health\n")
    with pytest.raises(DataError, match="none of the 1 labeled conversations is in the chats"):
        simulate_real(CHATS, [p], {"seed": 1})


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="unknown real-world parameter"):
        RealWorldConfig.from_dict({"n_users": 5})
    assert np.isclose(RealWorldConfig().filter_catch["health"], 0.85)
