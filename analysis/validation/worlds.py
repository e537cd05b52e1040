"""Simulation studies: simulate a world, run the estimators, compare with its truth.

One call is one row of a coverage / false-positive study (tests/validation/, docs/leakage.md,
docs/lift.md). `simulated_detector` stands in for stage 02 with known error rates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.contract.art9 import ART9, label_matrix
from analysis.contract.settings import LeakageSettings
from analysis.impressions import aggregate, chat_flag
from analysis.leakage.corrected import CorrectedLeakage
from analysis.leakage.data import (
    DEFAULT_CONTROLS,
    ExposureData,
    LeakageInputs,
    flag_matrix,
    iab_matrix,
    primary_nodes,
    validation_counts,
)
from analysis.leakage.exposure import ExposureTest, regional_exposure
from analysis.leakage.report import analyse
from analysis.leakage.whitebox import WhiteBoxLeakage
from analysis.lift.ab import ABTest, Cuped
from analysis.lift.categories import CategoryLift
from analysis.lift.did import DiffInDiff, RegionRandomization
from analysis.simulate import simulate
from analysis.util.regions import is_excluded
from analysis.util.taxonomy import category_ad_nodes
from analysis.validation.truth import attach_leak_truth


def simulated_detector(conversation_truth: pd.DataFrame, sensitivity: float | dict = 0.9, specificity: float | dict = 0.99,
                       seed: int = 0, topics: list[dict] | None = None) -> pd.DataFrame:
    """A stand-in for stage 02's output on a simulated world: flags with known error rates.

    score_c = Phi(z), z ~ N(Phi^-1(Se), 1) for true-c conversations and N(Phi^-1(1 - Sp), 1) otherwise,
    flag_c = score_c >= 0.5 (so P(flag | c) = Se, P(no flag | not c) = Sp exactly, and other
    thresholds trade one for the other). `iab_ids` holds the IAB nodes of the conversation's topics
    (both topics of a mixed conversation when `topics`, the ground truth's topic list, is given).
    """
    rng = np.random.default_rng(seed)
    y = label_matrix(conversation_truth["art9"], ART9)
    se = np.array([sensitivity[c] if isinstance(sensitivity, dict) else sensitivity for c in ART9])
    sp = np.array([specificity[c] if isinstance(specificity, dict) else specificity for c in ART9])
    mu = np.where(y, stats.norm.ppf(se)[None, :], stats.norm.ppf(1 - sp)[None, :])
    score = stats.norm.cdf(mu + rng.normal(size=y.shape))
    out = pd.DataFrame({"conversation_id": conversation_truth["conversation_id"].astype(str).to_numpy()})
    for j, c in enumerate(ART9):
        out[f"score_{c}"] = score[:, j]
    for j, c in enumerate(ART9):
        out[f"flag_{c}"] = score[:, j] >= 0.5
    flags = score >= 0.5
    out["any_sensitive"] = flags.any(axis=1)
    out["art9"] = [[c for j, c in enumerate(ART9) if f[j]] for f in flags]
    iab_of = {t["key"]: t.get("iab_id") for t in (topics or [])}
    a = conversation_truth["iab_id"].astype(object).to_numpy()
    b = conversation_truth["topic_b"].map(iab_of).astype(object).to_numpy() if topics else np.full(len(a), None)
    out["iab_ids"] = [[str(x) for x in (p, q) if isinstance(x, str) and x] for p, q in zip(a, b)]
    return out

# ------------------------------------------------------------------------- validation by simulation


def inputs_from_world(world, *, sensitivity: float | dict = 0.9, specificity: float | dict = 0.995, seed: int = 0,
                      impressions: bool = True) -> LeakageInputs:
    """The stage's inputs built in memory from a simulated World, with `simulated_detector` standing in
    for stage 02 (tests and benchmarks; the stage itself reads run_dir/data)."""
    ct = world.conversation_truth
    users = world.users[["user_id", "region"]]
    region = ct["user_id"].map(users.set_index("user_id")["region"])
    conv = pd.DataFrame({"conversation_id": ct["conversation_id"], "user_id": ct["user_id"], "region": region,
                         "excluded": is_excluded(region, world.config.excluded_regions), "started_at": ct["started_at"]})
    cats = simulated_detector(ct, sensitivity, specificity, seed=seed, topics=world.ground_truth["topics"])
    imp = None
    if impressions:

        imp = world.impressions[["user_id", "shown_at", "ad_category"]].assign(chat=chat_flag(world.impressions["targeting_sources"]))
    return LeakageInputs(conv, users, cats, imp, world.filter_decisions, world.labels, None)


def validate_leakage_world(world_config: dict, *, sensitivity: float = 0.9, specificity: float = 0.995, alpha: float = 0.05,
                   exposure: bool = False, n_permutations: int = 199, n_boot: int = 2000, controls: dict | None = None) -> pd.DataFrame:
    """Simulate one world and compare the stage's estimates with its truth: one row per category
    (white-box CIs on the true categories of all conversations and on the labeled sample, the
    corrected CI with a simulated detector, and whether each covers the true leak rate), plus with
    `exposure` the black-box p-values per category, design and region group."""

    w = simulate(world_config, text=False)  # the estimators read no text (a simulated detector stands in for stage 02)
    inp = inputs_from_world(w, sensitivity=sensitivity, specificity=specificity, seed=w.config.seed, impressions=exposure)
    truth = w.ground_truth["leakage"]
    conv = inp.conversations.set_index("conversation_id", drop=False)
    group = pd.Series(np.where(conv["excluded"], "excluded", "included"), index=conv.index)
    passed = pd.Series(~w.filter_decisions["blocked"].to_numpy(), index=w.filter_decisions["conversation_id"].astype(str)).reindex(conv.index)
    true_member = pd.DataFrame(label_matrix(w.conversation_truth["art9"], ART9), index=conv.index, columns=list(ART9))
    est = WhiteBoxLeakage(alpha)
    full = est.fit(passed, true_member, group, basis="truth").table
    attach_leak_truth(full, truth)
    lab = inp.labels.assign(conversation_id=inp.labels["conversation_id"].astype(str))
    lab_member = pd.DataFrame(label_matrix(lab["art9"], ART9), index=pd.Index(lab["conversation_id"]), columns=list(ART9))
    labeled = est.fit(passed, lab_member, group, basis="labels").table
    attach_leak_truth(labeled, truth)
    flags = flag_matrix(inp.categories).reindex(conv.index)
    res = CorrectedLeakage(alpha, n_boot, w.config.seed).fit(passed, flags, validation_counts(flags, lab), group,
                                                              exclude=pd.Index(lab["conversation_id"]))
    corr = res.table
    attach_leak_truth(corr, truth)
    # coverage of what is published: the two-sided interval, or a one-sided bound as [0, U] / [L, 1]; withheld: None
    lo, hi = res.interval()
    corr["ci_low"], corr["ci_high"] = lo, hi
    corr["covers_truth_ci"] = np.where(lo.notna() & corr["truth"].notna(), (lo <= corr["truth"]) & (corr["truth"] <= hi), None)
    key = ["category", "region_group"]
    out = full[key + ["n", "passed", "leak_rate", "truth", "covers_truth_cp", "covers_truth_wilson"]].copy()
    out["covers_truth_jeffreys"] = (full["jeffreys_low"] <= full["truth"]) & (full["truth"] <= full["jeffreys_high"])
    out = out.merge(labeled[key + ["n", "covers_truth_cp", "covers_truth_wilson"]].rename(
        columns={"n": "n_labeled", "covers_truth_cp": "labeled_covers_cp", "covers_truth_wilson": "labeled_covers_wilson"}), on=key)
    out = out.merge(corr[key + ["rg_point", "ci_low", "ci_high", "covers_truth_ci", "status"]].rename(
        columns={"rg_point": "corrected", "ci_low": "corrected_low", "ci_high": "corrected_high", "covers_truth_ci": "corrected_covers",
                 "status": "corrected_status"}), on=key)
    out["seed"], out["mode"] = w.config.seed, w.config.mode
    if exposure:
        data = ExposureData.build(inp.impressions, inp.users, excluded_regions=w.config.excluded_regions, policy_date=w.config.policy_date)

        controls = dict(DEFAULT_CONTROLS if controls is None else controls)
        member = pd.concat([true_member, iab_matrix(inp.categories, controls).reindex(conv.index)], axis=1)
        kinds = {**{c: "sensitive" for c in ART9}, **{c: "control" for c in controls}}
        ex = ExposureTest(w.config.chat_window_days, n_permutations, alpha, seed=w.config.seed).fit(
            data, inp.conversations, member, {**category_ad_nodes(), **controls}, kinds).table
        reg = regional_exposure(data, inp.conversations, primary_nodes(inp.categories), window_days=w.config.chat_window_days,
                                n_permutations=n_permutations, alpha=alpha, seed=w.config.seed)
        ex = pd.concat([ex, reg], ignore_index=True)
        ex["seed"], ex["mode"] = w.config.seed, w.config.mode
        return out, ex
    return out


def exposure_world_rows(world_config: dict, *, alpha: float = 0.05, n_permutations: int = 9999, sensitivity: float = 0.9,
                        specificity: float = 0.995) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate one world and run the black-box design as stage 03 does (positive and negative controls,
    the policy window and the pre-policy placebo, each excluded region's own test, the violation
    family and the design checks), on the true sensitive categories. Returns (exposure rows, design
    checks, violations), each tagged with the world's seed and mode."""
    w = simulate(world_config, text=False)  # the black box reads no text
    inp = inputs_from_world(w, sensitivity=sensitivity, specificity=specificity, seed=w.config.seed, impressions=False)
    # "ai_chat" among the targeting sources is exactly the simulator's chat_targeted (faster than reading the lists)
    imp = w.impressions[["user_id", "shown_at", "ad_category"]].assign(chat=w.impression_truth["chat_targeted"].to_numpy(bool))
    cats = inp.categories.copy()
    y = label_matrix(w.conversation_truth["art9"], ART9)
    for j, c in enumerate(ART9):  # the black box on the true categories: the design, not the detector, is under test
        cats[f"flag_{c}"] = y[:, j]
    inp = LeakageInputs(inp.conversations, inp.users, cats, imp, None, None, None)
    s = LeakageSettings(policy_date=w.config.policy_date, excluded_regions=tuple(w.config.excluded_regions), alpha=alpha,
                        exposure_window_days=w.config.chat_window_days, exposure_permutations=n_permutations, seed=w.config.seed)
    rep = analyse(inp, s, glm=False)
    tag = {"seed": w.config.seed, "mode": world_config.get("mode", "default") if not world_config.get("outside_interest_since")
           else "outside_interest_from_policy"}
    return rep.exposure.table.assign(**tag), rep.exposure.checks.assign(**tag), rep.violations.assign(**tag)


def category_lift_rows(world_config: dict, *, alpha: float = 0.05, min_users: int = 10) -> pd.DataFrame:
    """Simulate one world and run stage 04's per-category lift: one row per tested ad category with the
    estimate, its CI (as shipped) and the category's true lift parameter."""
    w = simulate(world_config, text=False)  # the ad log only
    d = aggregate(w.impressions, w.users, policy_date=w.config.policy_date, excluded_regions=w.config.excluded_regions)
    t = CategoryLift(alpha, min_users).fit(d).table
    t = t[t["tested"]].copy()
    truth = w.ground_truth["lift"]["by_category_matched_lift"]
    t["truth"] = t["ad_category"].map(truth)
    t["covers"] = (t["rel_ci_low"] <= t["truth"]) & (t["truth"] <= t["rel_ci_high"])
    t["seed"] = w.config.seed
    return t[["seed", "ad_category", "users_chat", "users_other", "n_chat_impressions", "rel_lift", "rel_ci_low", "rel_ci_high",
              "truth", "covers"]]


def validate_lift_world(world_config: dict, *, expected_holdout_share: float | None = None, alpha: float = 0.05, n_permutations: int = 200) -> dict:
    """Simulate one world, run the headline estimators, and compare with its truth.

    Returns p-values, whether each CI covers its truth, and the CUPED variance reductions: one row
    of a coverage / false-positive study (tests/test_lift_simulation.py, docs/lift.md).
    """

    w = simulate(world_config, text=False)  # the ad log only
    h = expected_holdout_share if expected_holdout_share is not None else w.config.holdout_share
    d = aggregate(w.impressions.drop(columns=["targeting_sources"]), w.users, policy_date=w.config.policy_date,
                  excluded_regions=w.config.excluded_regions)
    did = DiffInDiff(alpha).fit(d)
    pu = d.per_user()
    cu = Cuped(alpha).fit_users(pu, pu["included"].to_numpy())
    ab = ABTest(alpha, h, n_permutations=n_permutations, seed=w.config.seed).fit(d)
    ri = RegionRandomization(n_permutations=n_permutations, seed=w.config.seed).fit(d)
    lt = w.ground_truth["lift"]
    inc, arm = lt["included_post"], lt["treatment_arm"]

    def covers(ci, x):
        return bool(ci[0] <= x <= ci[1])

    return {
        "seed": w.config.seed, "mode": w.config.mode, "truth_rel": inc["rel"], "truth_ab_rel": arm["rel"],
        "did_p": did.p_value, "cuped_p": cu.p_value, "ab_p": ab.plain.p_value, "ab_cuped_p": ab.cuped.p_value,
        "ab_perm_p": ab.permutation_p, "ri_p": ri.p_value,
        "did_abs_cov": covers(did.ci, inc["abs"]), "did_rel_cov": covers(did.rel_ci_delta, inc["rel"]),
        "did_rel_fieller_cov": covers(did.rel_ci_fieller, inc["rel"]),
        "cuped_abs_cov": covers(cu.ci, inc["abs"]), "cuped_rel_cov": covers(cu.rel_ci_delta, inc["rel"]),
        "cuped_rel_fieller_cov": covers(cu.rel_ci_fieller, inc["rel"]),
        "ab_abs_cov": covers(ab.plain.ci, arm["abs"]), "ab_rel_cov": covers(ab.plain.rel_ci_delta, arm["rel"]),
        "ab_rel_fieller_cov": covers(ab.plain.rel_ci_fieller, arm["rel"]),
        "ab_cuped_abs_cov": covers(ab.cuped.ci, arm["abs"]), "ab_cuped_rel_cov": covers(ab.cuped.rel_ci_delta, arm["rel"]),
        "cuped_vr": cu.variance_reduction, "ab_cuped_vr": ab.cuped.variance_reduction, "srm_flag": ab.srm_flag,
    }
