"""The stakeholder summary: its sentences carry the numbers of the stage outputs."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.contract.settings import SummarySettings
from analysis.summary import AuditSummary
from analysis.util.storage import write_json, write_parquet


def _metrics(run_dir, stage, records):
    write_json([{"group": {}, "ci_low": None, "ci_high": None, "truth": None, "n": None, **r} for r in records], run_dir / "metrics" / f"{stage}.json")


@pytest.fixture
def fake_run(tmp_path):
    _metrics(tmp_path, "03_leakage", [
        {"metric": "leak_rate", "group": {"category": "health", "region_group": "all"}, "estimate": 0.021, "ci_low": 0.016, "ci_high": 0.027},
        {"metric": "leak_rate", "group": {"category": "trade_union", "region_group": "all"}, "estimate": 0.122, "ci_low": 0.101, "ci_high": 0.145, "truth": 0.09},
        {"metric": "leak_rate", "group": {"category": "religion", "region_group": "all"}, "estimate": 0.009, "ci_low": 0.004, "ci_high": 0.018},
        {"metric": "violation_impressions", "group": {"region": "DE"}, "estimate": 1234},
        {"metric": "tolerance_p_value_holm", "group": {"category": "health", "region_group": "all"}, "estimate": 0.02},
        {"metric": "tolerance_p_value_holm", "group": {"category": "trade_union", "region_group": "all"}, "estimate": 0.0001},
        {"metric": "tolerance_p_value_holm", "group": {"category": "religion", "region_group": "all"}, "estimate": 0.7},
    ])
    _metrics(tmp_path, "04_engagement_lift", [
        {"metric": "did_rel_lift", "group": {"estimand": "included_post"}, "estimate": 0.045, "ci_low": 0.021, "ci_high": 0.069, "truth": 0.0451},
        {"metric": "ab_rel_lift", "group": {"estimand": "treatment_arm"}, "estimate": 0.05, "ci_low": -0.01, "ci_high": 0.11},
        {"metric": "ab_cuped_rel_lift", "group": {"estimand": "treatment_arm"}, "estimate": 0.052, "ci_low": 0.004, "ci_high": 0.1},
    ])
    write_parquet(pd.DataFrame({"topic": [-1, 0, 1, 2, 3], "label": ["outliers", "hiking boots", "sourdough baking", "job search", "tiny"],
                                "size": [50, 400, 300, 200, 4], "share": [50 / 954, 400 / 954, 300 / 954, 200 / 954, 4 / 954]}), tmp_path / "data" / "topic_info.parquet")
    return tmp_path


def test_sentences_carry_the_numbers_of_the_stage_outputs(fake_run):
    a = {x.key: x for x in AuditSummary(fake_run, SummarySettings(leak_tolerance=0.01)).answers()}
    assert a["topics"].sentence.startswith("Across 954 conversations the analysis found 4 topics; the most common were hiking boots (41.9%), sourdough baking (31.4%) and job search (21.0%)")
    assert "tiny" not in a["topics"].sentence  # a topic of fewer than k conversations is not named
    assert a["leakage"].sentence.startswith("Trade-union conversations passed the filter 12.2% of the time (95% CI 10.1–14.5%), the highest")
    assert "2 of 3 categories leak significantly more than the 1% tolerance (one-sided exact test, Holm-adjusted" in a["leakage"].sentence
    assert "1,234 impressions carried a chat-derived signal" in a["leakage"].sentence
    assert "changed by +4.5% (95% CI 2.1–6.9%)" in a["lift"].sentence and "statistically significant lift" in a["lift"].sentence
    assert "randomized holdout comparison gives +5.2% (95% CI 0.4–10.0%; CUPED-adjusted" in a["lift"].sentence
    assert not a["ad_categories"].assessed and "did not run" in a["ad_categories"].sentence
    t = AuditSummary(fake_run).estimates_vs_truth().set_index("metric")
    assert bool(t.loc["did_rel_lift", "covers_truth"]) and not bool(t.loc["leak_rate", "covers_truth"])




def test_label_budget_sentence_rounds_large_plans_and_names_what_no_budget_can_show(tmp_path):
    """A category whose estimate lies above the tolerance gets no budget: the sentence says so instead
    of quoting the other category's budget for both; millions are not quoted to the unit."""
    rows = [{"metric": "leak_rate_clustered", "group": {"category": c, "region_group": "all", "clusters": 150}, "estimate": e, "ci_low": lo, "ci_high": hi}
            for c, e, lo, hi in (("religion", 0.0097, 0.003, 0.035), ("ethnicity", 0.02, 0.008, 0.047), ("health", 0.05, 0.03, 0.08))]
    rows += [{"metric": "leak_rate_upper_bound", "group": {"category": c, "basis": "labels, user-clustered", "verdict": v}, "estimate": 0.05}
             for c, v in (("religion", "not shown to exceed"), ("ethnicity", "not shown to exceed"), ("health", "exceeds"))]
    rows += [{"metric": "label_budget", "group": {"category": "religion", "basis": "labels only (design effect)"}, "estimate": 20_983_087},
             {"metric": "label_budget", "group": {"category": "ethnicity", "basis": "labels only (design effect)"}, "estimate": None}]
    _metrics(tmp_path, "03_leakage", rows)
    a = {x.key: x.sentence for x in AuditSummary(tmp_path).answers()}["leakage"]
    assert "showing religion below the tolerance would take about 21 million labeled conversations." in a
    assert "Ethnicity cannot be shown below it: its estimate lies at or above the tolerance." in a
    assert "20,983,087" not in a


def test_topics_and_categories_are_named_by_readable_labels_and_counted_in_users(fake_run):
    """Stage 02's readable topic names (labels without their tier-1 tail) name the topics; each conversation's
    own tier-1 answers question 2; a topic or category of fewer than k users is not named."""
    d = fake_run / "data"
    conv_ids = [f"c{i}" for i in range(954)]
    topic = [-1] * 50 + [0] * 400 + [1] * 300 + [2] * 200 + [3] * 4
    write_parquet(pd.DataFrame({"conversation_id": conv_ids, "topic": topic}), d / "topics.parquet")
    # topic 1 (300 conversations) comes from 5 users only; the others from many
    user = [f"u{i}" if t != 1 else f"u{i % 5}" for i, t in enumerate(topic)]
    write_parquet(pd.DataFrame({"conversation_id": conv_ids, "user_id": user}), d / "conversations.parquet")
    write_parquet(pd.DataFrame({"topic": [0, 1, 2], "readable_label": ["Hiking: trail shoes, boot sizes (Travel 81%)", "Baking (Food & Drink 90%)",
                                                                    "Job Search: cover letter, interview (Careers 62%)"],
                                "readable_name": ["Hiking: trail shoes, boot sizes", "Baking", "Job Search: cover letter, interview"]}),
                  d / "topic_categories.parquet")
    tier1 = ["653"] * 500 + ["123"] * 400 + [None] * 54  # Travel, Careers, none
    write_parquet(pd.DataFrame({"conversation_id": conv_ids, "tier1_id": ["596"] * 954, "conv_tier1_id": tier1}), d / "conversation_categories.parquet")
    a = {x.key: x for x in AuditSummary(fake_run).answers()}
    topics = a["topics"].sentence
    assert "“Hiking: trail shoes, boot sizes” (41.9%)" in topics and "“Job Search: cover letter, interview” (21.0%)" in topics
    assert "Baking" not in topics and "sourdough" not in topics and "81%" not in topics  # 5 users: not named
    from analysis.util.taxonomy import load_taxonomy
    names = load_taxonomy().set_index("id")["label"]
    cats = a["ad_categories"].sentence
    assert cats.startswith("By each conversation's own category, chats feed mostly the IAB categories")
    assert f"{names['653']} (52.4%)" in cats and f"{names['123']} (41.9%)" in cats and names["596"] not in cats
    assert "5.7% of conversations fit no ad category" in cats


def test_summary_withholds_what_the_design_checks_say_cannot_hold(tmp_path):
    """A failed placebo / negative-control check: exposure-based violation flags are not reported as
    leakage; a rejected pre-trend test over regions: the DiD is not the lift answer (issue 14)."""
    flag = {"metric": "violation_flag", "group": {"region": "DE"}, "estimate": 1}
    viol = {"metric": "violation_impressions", "group": {"region": "DE"}, "estimate": 0}
    check = lambda v: {"metric": "exposure_design_check", "group": {"check": "placebo", "verdict": v}, "estimate": 0.001 if v == "failed" else 0.8, "n": 20}  # noqa: E731
    did = {"metric": "region_did_rel_lift", "group": {"estimand": "included_post", "regions_included": 9, "regions_excluded": 11},
           "estimate": 0.08, "ci_low": 0.02, "ci_high": 0.14}
    for verdict, pre_p in (("failed", 0.01), ("passed", 0.4)):
        run = tmp_path / verdict
        _metrics(run, "03_leakage", [flag, viol, check(verdict)])
        _metrics(run, "04_engagement_lift", [did, {"metric": "pretrend_p_value", "estimate": pre_p}])
        s = AuditSummary(run)
        a = {x.key: x.sentence for x in s.answers()}
        if verdict == "failed":
            assert "failed its pre-policy placebo" in a["leakage"] and "not reported as leakage" in a["leakage"]
            assert "flags DE" not in a["leakage"]
            assert "already trended apart" in a["lift"] and "statistically significant lift" not in a["lift"]
            assert any("not evidence of leakage" in c for c in s.caveats())
        else:
            assert "flags DE" in a["leakage"]
            assert "statistically significant lift" in a["lift"] and "trended apart" not in a["lift"]
            assert any("passed its pre-policy placebo" in c for c in s.caveats())


def test_truth_table_names_each_headline_estimate_and_whether_its_interval_holds_the_truth(tmp_path):
    """The stakeholder table: the headline estimators in words, percentages, and yes/no per row; the
    leak-rate figure and sentence use the user-clustered labeled-sample rate (PPI++ is a companion:
    it under-covers in some adversarial worlds), and the verdicts and label budget of that basis."""
    ub = lambda c, v, basis: {"metric": "leak_rate_upper_bound", "group": {"category": c, "basis": basis, "verdict": v}, "estimate": 0.02}  # noqa: E731
    _metrics(tmp_path, "03_leakage", [
        {"metric": "leak_rate", "group": {"category": "health", "region_group": "all", "basis": "labels"}, "estimate": 0.5, "ci_low": 0.4, "ci_high": 0.6, "truth": 0.03},
        {"metric": "leak_rate_clustered", "group": {"category": "health", "region_group": "all", "clusters": 120}, "estimate": 0.031, "ci_low": 0.02, "ci_high": 0.045, "truth": 0.03},
        {"metric": "leak_rate_clustered", "group": {"category": "religion", "region_group": "all", "clusters": 110}, "estimate": 0.05, "ci_low": 0.04, "ci_high": 0.06, "truth": 0.014},
        {"metric": "leak_rate_ppi", "group": {"category": "religion", "region_group": "all"}, "estimate": 0.2, "ci_low": 0.19, "ci_high": 0.21, "truth": 0.014},
        {"metric": "leak_rate_clustered", "group": {"category": "trade_union", "region_group": "all", "clusters": 5}, "estimate": 0.3, "ci_low": 0.1, "ci_high": 0.6, "truth": 0.2},
        ub("health", "not shown to exceed", "labels, user-clustered"), ub("religion", "exceeds", "labels, user-clustered"),
        ub("health", "exceeds", "PPI++ by filter stratum"), ub("religion", "exceeds", "PPI++ by filter stratum"),
        {"metric": "label_budget", "group": {"category": "health", "basis": "labels only (design effect)"}, "estimate": 5000},
        {"metric": "label_budget", "group": {"category": "health", "basis": "PPI++ (detector + labels)"}, "estimate": 3000},
    ])
    s = AuditSummary(tmp_path)
    t = s.truth_table()
    name = "Leak rate (labeled sample, users as clusters)"
    assert list(t.index) == [f"{name}, health", f"{name}, religion"]
    assert t.loc[f"{name}, health"].tolist() == ["3.1%", "2.0–4.5%", "3.0%", "yes"]
    assert t.loc[f"{name}, religion", "CI holds the truth"] == "no"
    assert s.headline_leak_metric() == "leak_rate_clustered"
    fig = s.fig_leak_rates()
    assert sorted(tl.get_text() for tl in fig.axes[0].get_yticklabels()) == ["health", "religion"]
    assert sorted(fig.axes[0].lines[0].get_xdata()) == [0.031, 0.05]  # not the Wilson 0.5 nor PPI++'s 0.2
    a = {x.key: x.sentence for x in s.answers()}["leakage"]
    assert ("Religion conversations passed the filter 5.0% of the time (95% CI 4.0–6.0%; labeled sample, 110 users as clusters), "
            "the highest of the two sensitive categories with data from at least 10 users.") in a
    assert "Trade" not in a and "5 users" not in a  # a rate resting on fewer than k users is not shown
    assert "1 of 2 categories exceed it, 0 are shown below it, and 1 is neither" in a
    assert "At the current estimates, showing health below the tolerance would take about 5,000 labeled conversations (3,000 with the detector's scores, PPI++)." in a
    assert AuditSummary(tmp_path / "empty").truth_table().empty
