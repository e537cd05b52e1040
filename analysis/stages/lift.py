"""Stage 04, engagement lift: does chat-based personalization lift engagement (CTR)?

Reduces stage 00's impression log to sufficient statistics on the engine, runs every estimator of
`analysis.lift`, attaches a simulated world's true lifts and writes `metrics/04_engagement_lift.json`.
A run without an impression log (a chat export) records that and returns None.
"""

from __future__ import annotations

import pandas as pd

from analysis.contract import metric_names as M
from analysis.contract.rundir import RunDir
from analysis.contract.settings import LiftSettings
from analysis.contract.stages import LIFT
from analysis.engines import Engine, make_engine
from analysis.lift.report import LiftReport, analyse
from analysis.util.metrics import MetricsRecorder
from analysis.validation.truth import GroundTruth, evaluate_lift


def run(run_dir: RunDir | str, settings: LiftSettings | None = None, engine: Engine | None = None) -> LiftReport | None:
    rd, s = RunDir.of(run_dir), settings or LiftSettings()
    if not rd.exists("impressions"):
        # a chat-only corpus (e.g. a ChatGPT export): nothing to estimate, and the run goes on
        m = MetricsRecorder(rd, LIFT)
        m.add(M.IMPRESSIONS, 0)
        m.skip(M.DID_REL, "no impressions: the lift needs an ad log")
        m.write()
        return None
    engine = engine or make_engine(s.engine, s.dask_scheduler)
    users = pd.read_parquet(rd.require("users"), columns=["user_id", "region"])
    data = engine.aggregate(rd.impressions, users, policy_date=s.policy_date, excluded_regions=s.excluded_regions)
    report = analyse(data, s)
    truth = GroundTruth.read(rd)
    world = truth.world if truth is not None else None
    evaluate_lift(report, world)
    report.ground_truth = world
    record_metrics(report, rd, world)
    return report


def record_metrics(report, run_dir: RunDir | str, ground_truth: dict | None = None) -> MetricsRecorder:
    """metrics/04_engagement_lift.json: the headline estimates with their CIs, and the truth of a simulated world."""
    m = MetricsRecorder(run_dir, LIFT)
    nd = report.did.n_users if report.did is not None else None
    rd = report.region_did
    for r in report.to_frame(ground_truth).itertuples():
        n = report.ab.plain.n_treated + report.ab.plain.n_control if r.metric.startswith("ab_") and report.ab else nd
        group = {"estimand": r.estimand}
        if r.metric == M.REGION_DID_REL:  # clusters beside the interval: n = regions
            n = rd.regions_included + rd.regions_excluded
            group |= {"regions_included": rd.regions_included, "regions_excluded": rd.regions_excluded}
        m.add(r.metric, r.estimate, ci=(r.ci_low, r.ci_high), truth=r.truth, n=n, group=group)
    if rd is not None:
        m.add(M.REGION_DID_P, rd.p_value, n=rd.regions_included + rd.regions_excluded)
        m.add(M.REGION_RI_P, rd.p_randomization, n=rd.regions_included + rd.regions_excluded)
    m.add(M.IMPRESSIONS, report.data.n_impressions)
    for metric, reason in report.skipped.items():
        m.skip(metric, reason)
    if report.did is not None:
        m.add(M.DID_P, report.did.p_value, n=nd)
    if report.cuped is not None:
        m.add(M.CUPED_VARIANCE_REDUCTION, report.cuped.variance_reduction, n=report.cuped.n_treated + report.cuped.n_control)
    es = report.event_study
    if es is not None:  # over regions: the policy's units; clusters beside it
        m.add(M.PRETREND_P, es.pretrend_p, n=es.regions_included + es.regions_excluded,
              group={"test": "linear pre-trend slope, CR3 over regions", "regions_included": es.regions_included,
                     "regions_excluded": es.regions_excluded})
    if report.event_study_users is not None:
        m.add(M.PRETREND_P_USER, report.event_study_users.pretrend_p, group={"test": "joint F, users as clusters"})
    if report.randomization is not None:
        m.add(M.RANDOMIZATION_P, report.randomization.p_value, n=report.randomization.n_regions)
    if report.ab is not None:
        m.add(M.AB_SRM_P, report.ab.srm_p, n=sum(report.ab.n_users.values()))
        m.add(M.AB_SRM_FLAG, report.ab.srm_flag)
        m.add(M.AB_PERMUTATION_P, report.ab.permutation_p, n=sum(report.ab.n_users.values()))
        m.add(M.AB_CUPED_VARIANCE_REDUCTION, report.ab.cuped.variance_reduction)
        m.add(M.AB_MDE_REL, report.ab.power["mde_rel_plain"])
        m.add(M.AB_CUPED_MDE_REL, report.ab.power["mde_rel_cuped"])
    if report.categories is not None:
        for r in report.categories.table[report.categories.table["tested"]].itertuples():
            m.add(M.CATEGORY_REL_LIFT, r.rel_lift, group={"ad_category": r.ad_category, "design": "observational"},
                  ci=(r.rel_ci_low, r.rel_ci_high), truth=None if pd.isna(r.truth) else r.truth,
                  n=r.users_chat + r.users_other)
        m.add(M.CATEGORIES_SIGNIFICANT_BH, int(report.categories.table["significant_bh"].sum()))
    m.write()
    return m


