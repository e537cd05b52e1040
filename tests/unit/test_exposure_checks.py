"""Checks of the black-box exposure design: pre-policy placebo windows, negative controls, the
outside-interest world (issue 14, items 1-3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.contract.art9 import ART9, label_matrix
from analysis.leakage.checks import design_caveat, design_checks, negative_control_pairs
from analysis.leakage.data import DEFAULT_CONTROLS, ExposureData
from analysis.leakage.exposure import ExposureTest
from analysis.simulate import simulate
from analysis.util.taxonomy import category_ad_nodes, load_taxonomy
from analysis.validation.worlds import inputs_from_world

SMALL = {"n_users": 1500, "n_conversations": 6000, "n_impressions": 120_000, "seed": 11}


def _fit(world, placebo):
    inp = inputs_from_world(world, seed=1)
    data = ExposureData.build(inp.impressions, inp.users, excluded_regions=world.config.excluded_regions,
                              policy_date=world.config.policy_date)
    member = pd.DataFrame(label_matrix(world.conversation_truth["art9"], ART9), columns=list(ART9),
                          index=inp.conversations["conversation_id"].astype(str))
    t = ExposureTest(30, 199, seed=1, glm=False).fit(data, inp.conversations, member, category_ad_nodes(), placebo=placebo).table
    return t[(t["design"] == "matched") & t["p_permutation"].notna()]


@pytest.fixture(scope="module")
def worlds():
    return {m: simulate({**SMALL, "mode": m}, text=False) for m in ("default", "outside_interest")}  # the black box reads no text


def test_outside_interest_world_has_no_chat_flow_but_topic_following_ads(worlds):
    w = worlds["outside_interest"]
    c = w.ground_truth["counts"]
    assert c["impressions_chat_targeted"] == 0 and c["impressions_outside_interest"] > 0.02 * c["impressions"]
    assert not any("ai_chat" in list(s) for s in w.impressions["targeting_sources"])
    assert worlds["default"].ground_truth["counts"]["impressions_outside_interest"] == 0


def test_placebo_window_is_null_where_flow_starts_at_the_policy_and_reveals_outside_interest(worlds):
    pl = _fit(worlds["default"], placebo=True)
    assert len(pl) >= 5 and (pl["p_permutation"] < 0.05).mean() <= 0.2  # no flow before the policy date
    real = _fit(worlds["default"], placebo=False)
    assert set(real["region_group"]) == {"included", "excluded"}
    oi = _fit(worlds["outside_interest"], placebo=True)
    assert (oi["p_permutation"] < 0.05).mean() >= 0.8, "interest from outside the chat shows before the policy too"
    assert (pl["window"] == "placebo").all() and (real["window"] == "policy").all()


def test_placebo_needs_a_long_enough_pre_period(worlds):
    w = worlds["default"]
    inp = inputs_from_world(w, seed=1)
    data = ExposureData.build(inp.impressions, inp.users, excluded_regions=w.config.excluded_regions, policy_date="2025-10-15")
    member = pd.DataFrame({"health": label_matrix(w.conversation_truth["art9"], ["health"])[:, 0]},
                          index=inp.conversations["conversation_id"].astype(str))
    with pytest.raises(ValueError, match="placebo window too short"):
        ExposureTest(30, 99, glm=False).fit(data, inp.conversations, member, {"health": ["317"]}, placebo=True)


def test_negative_control_node_is_far_from_the_category_and_from_every_conversation_topic():
    tax = load_taxonomy()
    tier1 = tax.set_index("id")["tier1_id"]
    nodes = {**category_ad_nodes(), **DEFAULT_CONTROLS}
    counts = pd.Series({"473": 900, "1": 500, "596": 400, "210": 1000, "52": 300})
    pairs = negative_control_pairs(nodes, counts, conversation_nodes={"474", "596"})
    assert set(c for c, _ in pairs.values()) == set(nodes)
    for name, (c, n) in pairs.items():
        assert name == f"{c} -> {n}"
        assert tier1[n] not in {tier1[x] for x in nodes[c]}
        # 210 (Food & Drink) holds cooking's node; 473 is the parent of a conversation node; 596 is one
        assert n not in {"210", "473", "596"}
    assert {n for _, n in pairs.values()} == {"1"}  # the most frequent node left


def test_design_checks_fail_on_a_placebo_rise_and_say_when_they_cannot_fail():
    rng = np.random.default_rng(0)
    base = {"kind": "sensitive", "design": "matched", "region_group": "included"}
    null = pd.DataFrame([{**base, "category": f"c{i}", "window": w, "p_permutation": rng.uniform(0.05, 1)}
                         for i in range(10) for w in ("placebo", "policy")])
    neg = pd.DataFrame([{**base, "kind": "negative_control", "category": f"c{i} -> 1", "window": "policy",
                         "p_permutation": rng.uniform(0.05, 1)} for i in range(10)])
    ok = design_checks(pd.concat([null, neg]), min_p=0.001)
    assert not ok["failed"].any() and ok["can_fail"].all() and set(ok["tests"]) == {10}
    assert "cannot tell it from chat flow" in design_caveat(ok)
    rise = null.copy()
    rise.loc[rise["window"] == "placebo", "p_permutation"] = 0.001
    bad = design_checks(pd.concat([rise, neg]), min_p=0.001)
    assert bad.set_index("check").loc["placebo", "failed"] and not bad.set_index("check").loc["negative_control", "failed"]
    assert "FAILED the pre-policy placebo" in design_caveat(bad)
    # policy-window rows of the real test never enter the placebo family
    assert bad.set_index("check").loc["placebo", "tests"] == 10
    rise.loc[rise["window"] == "placebo", "p_permutation"] = 0.01  # the smallest p at 99 permutations
    weak = design_checks(pd.concat([rise, neg]), min_p=0.01)  # 10 tests x 0.01 >= 0.05
    assert not weak["can_fail"].any() and not weak["failed"].any()
    assert "cannot fail" in design_caveat(weak)


def test_sequential_permutation_p_value_is_uniform_under_the_null_and_fine_at_the_tail():
    """Besag-Clifford: valid (P(p <= u) ~ u, heavy tails, unequal groups), stops early under the null,
    and keeps the full run's 1 / (B + 1) resolution where multiplicity families decide."""
    from analysis.leakage.exposure import _perm_welch, _subset_sums

    rng = np.random.default_rng(3)
    subsets = _subset_sums(2.0 ** np.arange(7), 3, 70_000, rng)[0]  # each 3-subset of 7 has a distinct sum
    _, counts = np.unique(subsets, return_counts=True)
    assert len(counts) == 35 and counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000
    p = np.array([_perm_welch(rng.standard_t(3, 25), 2 * rng.standard_t(3, 300), 9999, rng) for _ in range(1500)])
    for u in (0.05, 0.2, 0.5):
        assert abs((p <= u).mean() - u) < 3.5 * np.sqrt(u * (1 - u) / len(p)), u
    assert _perm_welch(rng.normal(1.5, 1, 30), rng.normal(0, 1, 400), 9999, rng) == 1 / 10_000
    mid = _perm_welch(rng.normal(0.2, 1, 30), rng.normal(0, 1, 400), 9999, rng)  # stops at 50 exceedances
    assert 0.005 < mid < 0.5 and abs(50 / mid - round(50 / mid)) < 1e-6  # h / draws
