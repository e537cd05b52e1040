"""Every metric name a stage records in `metrics/<stage>.json`: the writers (`MetricsRecorder`)
refuse a name not listed here, and the summary (stage 05) reads these same constants."""

from __future__ import annotations

from analysis.contract.stages import INGEST, LEAKAGE, LIFT, MAPPING, TOPICS

# stage 00
ROWS_READ = "rows_read"
ROWS_QUARANTINED = "rows_quarantined"
CONVERSATIONS = "conversations"
USERS = "users"
USERS_EXCLUDED_REGION = "users_excluded_region"
IMPRESSIONS = "impressions"
VOICE_SHARE = "voice_share"
# stage 01
TOPIC_QUALITY = (
    "documents", "documents_empty_after_cleaning", "documents_cleaned", "topics", "outlier_share_before_reduction",
    "outlier_share_after_reduction", "outlier_share", "npmi", "topic_diversity", "ari", "nmi", "true_topics",
    "embeddings_computed", "embeddings_cached", "seconds", "docs_per_second",
)
# stage 02
PREVALENCE_FLAGGED = "prevalence_flagged"
PRECISION, RECALL, F1, SPECIFICITY = "precision", "recall", "f1", "specificity"
DETECTOR = (PRECISION, RECALL, F1, SPECIFICITY)
TIER1_ACCURACY = "tier1_accuracy_nonsensitive"
TIER1_ACCURACY_CONVERSATION = "tier1_accuracy_conversation_nonsensitive"  # the per-conversation categorizer
TIER1_RECALL = "tier1_recall"  # per labeled tier-1: share of its conversations categorized as it
TOPICS_BY_SOURCE = "topics_by_source"
OVERRIDE_APPLIED = "override_applied"
# stage 03
LEAK_RATE = "leak_rate"
LEAK_RATE_CP = "leak_rate_cp"
TOLERANCE_P = "tolerance_p_value"
TOLERANCE_P_HOLM = "tolerance_p_value_holm"
TOLERANCE_P_BH = "tolerance_p_value_bh"
LEAK_RATE_DETECTOR_RAW = "leak_rate_detector_raw"
LEAK_RATE_CORRECTED = "leak_rate_corrected"
EXPOSURE_EFFECT = "exposure_effect"
EXPOSURE_P = "exposure_p_value"
EXPOSURE_P_GLM = "exposure_p_value_glm"
VIOLATION_IMPRESSIONS = "violation_impressions"
VIOLATION_FLAG = "violation_flag"
# issue 14: inference at the unit of clustering / assignment, prediction-powered, compliance
LEAK_RATE_CLUSTERED = "leak_rate_clustered"  # labeled sample, user-clustered Wilson (headline)
LEAK_RATE_PPI = "leak_rate_ppi"  # PPI++ stratified by filter decision (headline)
LEAK_UPPER_BOUND = "leak_rate_upper_bound"  # one-sided upper bound; group carries the compliance verdict
BOUND_BASIS_CLUSTERED = "labels, user-clustered"  # the headline verdict's basis (PPI++'s is recorded beside it)
LABEL_BUDGET = "label_budget"  # labeled conversations needed to show a rate below the tolerance
VIOLATION_FAMILY_TESTS = "violation_family_tests"  # tests in the one Holm family (false alarms <= alpha)
EXPOSURE_CHECK = "exposure_design_check"  # placebo / negative-control check: min Holm p; group carries passed / failed
# stage 04: headline lifts (estimate with CI, truth when simulated)
DID_ABS, DID_REL, DID_REL_FIELLER = "did_abs_lift", "did_rel_lift", "did_rel_lift_fieller"
CUPED_ABS, CUPED_REL, CUPED_REL_FIELLER = "cuped_abs_lift", "cuped_rel_lift", "cuped_rel_lift_fieller"
AB_ABS, AB_REL, AB_REL_FIELLER = "ab_abs_lift", "ab_rel_lift", "ab_rel_lift_fieller"
AB_CUPED_ABS, AB_CUPED_REL = "ab_cuped_abs_lift", "ab_cuped_rel_lift"
DID_P = "did_p_value"
CUPED_VARIANCE_REDUCTION = "cuped_variance_reduction"
PRETREND_P = "pretrend_p_value"  # linear pre-trend slope over regions (CR3)
PRETREND_P_USER = "pretrend_p_value_user_clustered"  # joint F, users as clusters (comparison)
RANDOMIZATION_P = "randomization_p_value"
AB_SRM_P, AB_SRM_FLAG = "ab_srm_p_value", "ab_srm_flag"
AB_PERMUTATION_P = "ab_permutation_p_value"
AB_CUPED_VARIANCE_REDUCTION = "ab_cuped_variance_reduction"
AB_MDE_REL, AB_CUPED_MDE_REL = "ab_mde_rel", "ab_cuped_mde_rel"
REGION_DID_REL, REGION_DID_P, REGION_RI_P = "region_did_rel_lift", "region_did_p_value", "region_randomization_p_value"
CATEGORY_REL_LIFT = "category_rel_lift"
CATEGORIES_SIGNIFICANT_BH = "categories_significant_bh"

METRICS: dict[str, frozenset[str]] = {
    INGEST: frozenset({ROWS_READ, ROWS_QUARANTINED, CONVERSATIONS, USERS, USERS_EXCLUDED_REGION, IMPRESSIONS, VOICE_SHARE}),
    TOPICS: frozenset(TOPIC_QUALITY),
    MAPPING: frozenset({PREVALENCE_FLAGGED, *DETECTOR, TIER1_ACCURACY, TIER1_ACCURACY_CONVERSATION, TIER1_RECALL, TOPICS_BY_SOURCE, OVERRIDE_APPLIED}),
    LEAKAGE: frozenset({LEAK_RATE, LEAK_RATE_CP, TOLERANCE_P, TOLERANCE_P_HOLM, TOLERANCE_P_BH, LEAK_RATE_DETECTOR_RAW,
                        LEAK_RATE_CORRECTED, EXPOSURE_EFFECT, EXPOSURE_P, EXPOSURE_P_GLM, VIOLATION_IMPRESSIONS, VIOLATION_FLAG,
                        LEAK_RATE_CLUSTERED, LEAK_RATE_PPI, LEAK_UPPER_BOUND, LABEL_BUDGET, VIOLATION_FAMILY_TESTS, EXPOSURE_CHECK}),
    LIFT: frozenset({DID_ABS, DID_REL, DID_REL_FIELLER, CUPED_ABS, CUPED_REL, CUPED_REL_FIELLER, AB_ABS, AB_REL, AB_REL_FIELLER,
                     AB_CUPED_ABS, AB_CUPED_REL, IMPRESSIONS, DID_P, CUPED_VARIANCE_REDUCTION, PRETREND_P, PRETREND_P_USER, RANDOMIZATION_P,
                     AB_SRM_P, AB_SRM_FLAG, AB_PERMUTATION_P, AB_CUPED_VARIANCE_REDUCTION, AB_MDE_REL, AB_CUPED_MDE_REL,
                     CATEGORY_REL_LIFT, CATEGORIES_SIGNIFICANT_BH, REGION_DID_REL, REGION_DID_P, REGION_RI_P}),
}


def check(stage: str, metric: str) -> None:
    """Raise if `stage` does not declare `metric` (a typo would otherwise vanish from the summary)."""
    if stage not in METRICS:
        raise ValueError(f"stage {stage!r} records no metrics (stages with metrics: {sorted(METRICS)})")
    if metric not in METRICS[stage]:
        raise ValueError(f"metric {metric!r} is not registered for stage {stage} in analysis.contract.metric_names")
