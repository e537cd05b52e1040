"""Every lift estimator on one LiftData: the stage's report."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from analysis.contract.settings import LiftSettings
from analysis.impressions import LiftData
from analysis.lift.ab import ABResult, ABTest, Cuped, TwoGroupResult
from analysis.lift.categories import CategoryLift, CategoryLiftResult
from analysis.lift.did import (
    DiDResult,
    DiffInDiff,
    EventStudy,
    EventStudyResult,
    RandomizationResult,
    RegionRandomization,
)
from analysis.lift.regional import RegionDiD, RegionDiDResult, RegionEventStudy, RegionEventStudyResult
from analysis.util.taxonomy import load_taxonomy

# ----------------------------------------------------------------------- the stage


@dataclass
class LiftReport:
    """All engagement-lift estimates of one audit run."""
    data: LiftData
    did: DiDResult | None  # None when the log lacks a group x period cell (e.g. no excluded regions)
    event_study: RegionEventStudyResult | None  # over regions (the policy's units): its pre-trend test is the check
    randomization: RandomizationResult | None
    cuped: TwoGroupResult | None  # included vs excluded, post period, pre-period CTR covariate (diagnostic only:
    # regions are not randomized, so a pooled theta carries their baseline difference; never a headline)
    ab: ABResult | None
    categories: CategoryLiftResult | None
    region_did: RegionDiDResult | None = None  # the headline: inference over regions, the units the policy was assigned to
    event_study_users: EventStudyResult | None = None  # user-clustered (comparison: ignores region-level shocks)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # headline metric -> why it could not be computed
    ground_truth: dict | None = None  # a simulated world's truth, attached by the stage after estimation

    def summary(self) -> pd.DataFrame:
        parts = [r.summary() for r in (self.region_did, self.did, self.ab) if r is not None]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def to_frame(self, ground_truth: dict | None = None) -> pd.DataFrame:
        """Headline estimates with CIs, the estimand each targets and (for simulated worlds) its truth."""
        lt = (ground_truth or self.ground_truth or {}).get("lift", {})
        inc, arm = lt.get("included_post", {}), lt.get("treatment_arm", {})
        d, rd = self.did, self.region_did
        rows = []
        if rd is not None:
            rows.append(("region_did_rel_lift", rd.rel_lift, rd.ci, "included_post", inc.get("rel"), rd.p_value))
        if d is not None:
            rows += [
                ("did_abs_lift", d.abs_lift, d.ci, "included_post", inc.get("abs"), d.p_value),
                ("did_rel_lift", d.rel_lift, d.rel_ci_delta, "included_post", inc.get("rel"), d.p_value),
                ("did_rel_lift_fieller", d.rel_lift, d.rel_ci_fieller, "included_post", inc.get("rel"), d.p_value),
            ]
        if self.ab is not None:
            a, ac = self.ab.plain, self.ab.cuped
            rows += [
                ("ab_abs_lift", a.abs_lift, a.ci, "treatment_arm", arm.get("abs"), a.p_value),
                ("ab_rel_lift", a.rel_lift, a.rel_ci_delta, "treatment_arm", arm.get("rel"), a.p_value),
                ("ab_rel_lift_fieller", a.rel_lift, a.rel_ci_fieller, "treatment_arm", arm.get("rel"), a.p_value),
                ("ab_cuped_abs_lift", ac.abs_lift, ac.ci, "treatment_arm", arm.get("abs"), ac.p_value),
                ("ab_cuped_rel_lift", ac.rel_lift, ac.rel_ci_delta, "treatment_arm", arm.get("rel"), ac.p_value),
            ]
        out = pd.DataFrame(rows, columns=["metric", "estimate", "ci", "estimand", "truth", "p_value"])
        out["ci_low"] = [x[0] for x in out["ci"]]
        out["ci_high"] = [x[1] for x in out["ci"]]
        out["covers_truth"] = [(lo <= t <= hi) if t is not None else None for lo, hi, t in zip(out["ci_low"], out["ci_high"], out["truth"])]
        return out.drop(columns="ci")[["metric", "estimand", "estimate", "ci_low", "ci_high", "truth", "covers_truth", "p_value"]]


def analyse(data: LiftData, settings: LiftSettings | None = None, *, event_study: bool = True) -> LiftReport:
    """Every estimator of the stage on one LiftData; parts that the data cannot support are skipped with a note."""
    s = settings or LiftSettings()
    alpha, n_permutations, seed = s.alpha, s.lift_permutations, s.seed
    notes = []

    def attempt(name, f):
        try:
            return f()
        except ValueError as e:
            notes.append(f"{name} skipped: {e}")
            return None

    skipped = {}
    did = attempt("difference-in-differences", lambda: DiffInDiff(alpha).fit(data))
    if did is None:
        skipped["did_rel_lift"] = _why_no_did(data) or notes[-1].split(" skipped: ", 1)[-1]
    region_did = attempt("region-level DiD", lambda: RegionDiD(alpha, n_permutations=n_permutations, seed=seed).fit(data.user_period))
    if region_did is None:
        skipped["region_did_rel_lift"] = _why_no_did(data) or notes[-1].split(" skipped: ", 1)[-1]
    elif region_did.caveat:
        notes.append(f"region-level DiD ({region_did.clusters}): {region_did.caveat}")
    pu = data.per_user()
    cuped = attempt("region CUPED", lambda: Cuped(alpha).fit_users(pu, pu["included"].to_numpy(), "region CUPED (diagnostic: regions not randomized)"))
    es_users = attempt("event study", lambda: EventStudy(alpha=alpha).fit(data)) if event_study and did is not None else None
    es = attempt("region-level event study", lambda: RegionEventStudy(alpha=alpha, seed=seed).fit(data)) \
        if event_study and did is not None else None
    ri = attempt("randomization inference", lambda: RegionRandomization(n_permutations=n_permutations, seed=seed).fit(data)) if did is not None else None
    ab = None
    if data.users["arm"].notna().any():
        try:
            ab = ABTest(alpha, s.expected_holdout_share, target_rel_lift=s.target_rel_lift, n_permutations=n_permutations, seed=seed).fit(data)
        except ValueError as e:
            notes.append(f"A/B skipped: {e}")
            skipped["ab_rel_lift"] = str(e)
    else:
        notes.append("A/B skipped: the impressions carry no arm")
        skipped["ab_rel_lift"] = "no holdout arm: the impressions carry no treatment/holdout assignment"
    cats = None
    if data.category_cells is not None:
        labels = load_taxonomy().set_index("id")["path"]
        try:
            cats = CategoryLift(alpha, s.min_cell_users, labels).fit(data)
        except ValueError as e:
            notes.append(f"per-category lift skipped: {e}")
    if ab is not None:
        notes += [f"A/B: {w}" for w in ab.warnings]
    if es is not None and es.pretrend_p < alpha:
        notes.append(f"pre-trend test over regions rejects parallel trends (slope {es.pretrend_slope:+.4f} log CTR per week, "
                     f"p = {es.pretrend_p:.3g}): the DiD estimates are suspect")
    return LiftReport(data, did, es, ri, cuped, ab, cats, region_did=region_did, event_study_users=es_users, notes=notes, skipped=skipped)


def _why_no_did(data: LiftData) -> str | None:
    """The plain reason a difference-in-differences is impossible on this log, if it is one of the usual ones."""
    inc = data.users["included"].astype(bool) if len(data.users) else pd.Series(dtype=bool)
    if not inc.any():
        return "no users in included regions: nothing received the policy"
    if inc.all():
        return "no users in excluded regions: the difference-in-differences compares included with excluded regions"
    weeks = data.user_week["week"]
    if not (weeks >= 0).any():
        return "no impressions after the policy date"
    if not (weeks < 0).any():
        return "no impressions before the policy date"
    return None
