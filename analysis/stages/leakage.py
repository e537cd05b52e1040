"""Stage 03, leakage: do sensitive (GDPR Art. 9) conversations reach ad targeting?

Reads stage 00's conversations, users, impressions, filter decisions and labels and stage 02's
conversation categories and detector validation; runs every estimator of `analysis.leakage`
(white box, misclassification-corrected, black-box exposure, violations); attaches a simulated
world's true leak rates; writes `metrics/03_leakage.json`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.contract import metric_names as M
from analysis.contract.rundir import RunDir
from analysis.contract.settings import LeakageSettings
from analysis.contract.stages import LEAKAGE
from analysis.engines import Engine, make_engine
from analysis.leakage.corrected import ESTIMATED, published_limits
from analysis.leakage.data import LeakageInputs
from analysis.leakage.report import LeakageReport, analyse
from analysis.util.metrics import MetricsRecorder
from analysis.validation.truth import GroundTruth, evaluate_leakage


def run(run_dir: RunDir | str, settings: LeakageSettings | None = None, engine: Engine | None = None) -> LeakageReport:
    rd, s = RunDir.of(run_dir), settings or LeakageSettings()
    engine = engine or make_engine(s.engine, s.dask_scheduler)
    report = analyse(read_inputs(rd, engine), s)
    truth = GroundTruth.read(rd)
    world = truth.world if truth is not None else None
    evaluate_leakage(report, world)
    report.ground_truth = world
    record_metrics(report, rd, world)
    return report


def read_inputs(rd: RunDir, engine: Engine) -> LeakageInputs:
    """Stage 00 and 02 outputs; the impressions through the engine (the chat flag instead of lists)."""
    conv_p, users_p, cats_p = rd.require("conversations", "users", "conversation_categories")

    def opt(key):
        p = rd.optional(key)
        return pd.read_parquet(p) if p is not None else None

    conv = pd.read_parquet(conv_p, columns=["conversation_id", "user_id", "region", "excluded", "started_at"])
    imp_p = rd.optional("impressions")
    imp = engine.read_impressions(imp_p) if imp_p is not None else None
    return LeakageInputs(conv, pd.read_parquet(users_p, columns=["user_id", "region"]), pd.read_parquet(cats_p), imp,
                         opt("filter_decisions"), opt("labels"), opt("detector_validation"))


def record_metrics(report, run_dir: RunDir | str, ground_truth: dict | None = None) -> MetricsRecorder:
    """metrics/03_leakage.json: the headline estimates with their CIs, and the truth of a simulated world."""
    m = MetricsRecorder(run_dir, LEAKAGE)
    if report.whitebox is not None:
        for r in report.whitebox.table.itertuples():
            grp = {"category": r.category, "region_group": r.region_group, "basis": r.basis}
            truth = getattr(r, "truth", None)
            truth = None if truth is None or pd.isna(truth) else truth
            # headline CI: Wilson (coverage ~0.95 by simulation); Clopper-Pearson (exact, >= 0.95) beside
            m.add(M.LEAK_RATE, r.leak_rate, group=grp, ci=(r.wilson_low, r.wilson_high), truth=truth, n=r.n)
            m.add(M.LEAK_RATE_CP, r.leak_rate, group=grp, ci=(r.cp_low, r.cp_high), truth=truth, n=r.n)
            m.add(M.TOLERANCE_P, r.p_tolerance, group=grp, n=r.n)
            m.add(M.TOLERANCE_P_HOLM, r.p_holm, group=grp, n=r.n)
            m.add(M.TOLERANCE_P_BH, r.p_bh, group=grp, n=r.n)
    if report.corrected is not None:
        for r in report.corrected.table.itertuples():
            truth = getattr(r, "truth", None)
            truth = None if truth is None or pd.isna(truth) else truth
            grp = {"category": r.category, "region_group": r.region_group}
            # the raw detector-based rate is biased by the detector's errors: recorded as uncorrected, no truth beside it
            m.add(M.LEAK_RATE_DETECTOR_RAW, r.raw_rate, group=grp | {"correction": "none"}, ci=(r.raw_low, r.raw_high), n=r.flagged)
            # Rogan-Gladen: a comparison, valid only if the detector errs alike among passed and blocked conversations.
            # A row on the boundary carries only its one-sided bound (the other CI end None), a withheld row nothing;
            # the note says why (corrected.CorrectedLeakage's boundary rule and assumption checks)
            m.add(M.LEAK_RATE_CORRECTED, r.leak_rate if r.status == ESTIMATED else None,
                  group=grp | {"assumes": "non-differential detector error"}, ci=published_limits(r._asdict()),
                  truth=truth, n=r.n, note=None if r.status == ESTIMATED else f"{r.status}: {r.reason}")
    if report.clustered is not None:
        for r in report.clustered.itertuples():
            truth = getattr(r, "truth", None)
            truth = None if truth is None or pd.isna(truth) else truth
            grp = {"category": r.category, "region_group": r.region_group, "basis": "labels", "clusters": int(r.clusters)}
            m.add(M.LEAK_RATE_CLUSTERED, r.rate, group=grp, ci=(r.ci_low, r.ci_high), truth=truth, n=r.n)
            if r.region_group == "all":  # the headline verdict (PPI++'s is recorded beside it, basis named)
                m.add(M.LEAK_UPPER_BOUND, r.upper_1s, group={"category": r.category, "basis": M.BOUND_BASIS_CLUSTERED,
                                                              "verdict": r.verdict, "tolerance": report.settings.leak_tolerance}, n=r.n)
    if report.ppi is not None:
        for r in report.ppi.table.itertuples():
            truth = getattr(r, "truth", None)
            truth = None if truth is None or pd.isna(truth) else truth
            grp = {"category": r.category, "region_group": "all", "basis": "PPI++ by filter stratum", "clusters": int(r.clusters)}
            m.add(M.LEAK_RATE_PPI, r.rate, group=grp, ci=(r.ci_low, r.ci_high), truth=truth, n=r.n_labeled)
            m.add(M.LEAK_UPPER_BOUND, r.upper_1s, group={"category": r.category, "basis": "PPI++ by filter stratum",
                                                          "verdict": r.verdict, "tolerance": report.settings.leak_tolerance}, n=r.n_labeled)
    if report.label_budget is not None:
        for r in report.label_budget.itertuples():
            m.add(M.LABEL_BUDGET, r.labels_needed if np.isfinite(r.labels_needed) else None,
                  group={"category": r.category, "tolerance": report.settings.leak_tolerance, "basis": r.basis}, n=r.labels_now)
    if report.exposure is not None:
        for r in report.exposure.table.itertuples():
            grp = {"category": r.category, "kind": r.kind, "design": r.design, "region_group": r.region_group}
            if getattr(r, "window", "policy") == "placebo":
                grp["window"] = "pre-policy placebo"
            m.add(M.EXPOSURE_EFFECT, r.effect, group=grp, ci=(r.ci_low, r.ci_high), n=r.n_treated)
            m.add(M.EXPOSURE_P, r.p_permutation, group=grp, n=r.n_treated)
            m.add(M.EXPOSURE_P_GLM, r.p_glm, group=grp, n=r.n_treated)
        checks = report.exposure.checks
        for r in (checks.itertuples() if checks is not None else ()):
            # the design's checks: a failed one means the exposure test's detections are not evidence of leakage
            m.add(M.EXPOSURE_CHECK, None if pd.isna(r.min_p_holm) else r.min_p_holm, n=r.tests,
                  group={"check": r.check, "verdict": "failed" if r.failed else ("passed" if r.tests and r.can_fail else
                                                                                   ("cannot fail (too few permutations)" if r.tests else "not run"))})
    for metric, reason in report.skipped.items():
        m.skip(metric, reason)
    if report.violations is not None and "violation_impressions" not in report.skipped:
        byr = ((ground_truth or {}).get("violations") or {}).get("by_region") or {}
        for r in report.violations.itertuples():
            truth = sum(byr.values()) if r.region == "ALL excluded" else byr.get(r.region, 0)
            m.add(M.VIOLATION_IMPRESSIONS, r.chat_impressions, group={"region": r.region}, truth=truth if ground_truth else None)
            m.add(M.VIOLATION_FLAG, bool(r.flagged), group={"region": r.region})
        if "family_tests" in report.violations.attrs:  # one Holm family: false alarms by the tests <= alpha
            m.add(M.VIOLATION_FAMILY_TESTS, report.violations.attrs["family_tests"],
                  group={"adjustment": "holm", "family_wise_false_alarm_at_most": report.settings.alpha})
    m.write()
    return m


