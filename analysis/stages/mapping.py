"""Stage 02, ad mapping: topic -> IAB Content Taxonomy 3.0, and the GDPR Art. 9 sensitive-topic detector.

Reads `conversations.parquet` (stage 00) and `topics.parquet` + `topic_info.parquet` (stage 01).
`mapping_backend` embeds topics and IAB paths (MiniLM: few texts, and clearly better than the static
model here: tier-1 accuracy 0.76 vs 0.69 on the default world's stage-01 topics); `detector_backend`
runs the detector, with `detector_params` (a JSON file) or the shipped defaults, refitted on labels
(`labels.parquet` of stage 00, or `labels_path`) by the policy of `analysis.mapping.refit`.
`use_truth_topics` (development only) uses a simulated world's true topics instead of stage 01's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from analysis.contract import metric_names as M
from analysis.contract.rundir import RunDir, StageInputError, project_path
from analysis.contract.schemas import DataError
from analysis.contract.settings import MappingSettings
from analysis.contract.stages import MAPPING
from analysis.detector.model import FITTINGS, SensitiveDetector
from analysis.engines import Engine
from analysis.mapping.accuracy import tier1_accuracy, tier1_confusion
from analysis.mapping.categorizer import NONE, apply_overrides, categorize_run, readable_labels, topic_mix
from analysis.mapping.labels import read_labels
from analysis.mapping.mapper import (
    TopicMapper,
    TopicMapping,
    topic_info_from_assignments,
)
from analysis.mapping.overrides import UNMAPPED, Overrides
from analysis.mapping.refit import detect_with_refit
from analysis.mapping.result import AdMappingResult
from analysis.util.metrics import MetricsRecorder
from analysis.util.storage import write_json, write_parquet
from analysis.util.taxonomy import load_art9, load_taxonomy
from analysis.validation.truth import GroundTruth


def run(run_dir: RunDir | str, settings: MappingSettings | None = None, engine: Engine | None = None) -> AdMappingResult:
    """Stage 02 (the engine is not used: a few hundred topics and one detector pass are in-process)."""
    rd, s = RunDir.of(run_dir), settings or MappingSettings()
    conv = pd.read_parquet(rd.require("conversations"))
    notes: list[str] = []
    tax = load_taxonomy()
    overrides = Overrides.load(project_path(s.overrides_file) if s.overrides_file else None, tax)
    spec = load_art9(taxonomy=tax, ad_nodes=overrides.ad_nodes or None)
    truth = GroundTruth.read(rd)

    # ---- topics (stage 01), or the simulator's truth as a stand-in
    if s.use_truth_topics:
        topics = truth.topics() if truth is not None else None
        if topics is None:
            raise StageInputError(f"use_truth_topics needs a simulated world's truth in {rd.truth_dir} (written by stage 00)")
        assign = conv[["conversation_id"]].merge(topics, on="conversation_id", how="left").fillna({"topic": "-1"})
        info = topic_info_from_assignments(conv, assign, seed=s.seed)
        notes.append("topics: the simulator's true topics (use_truth_topics=True), not stage 01's clustering")
    else:
        topics_path, info_path = rd.require("topics", "topic_info")
        assign = pd.read_parquet(topics_path, columns=["conversation_id", "topic"])
        info = pd.read_parquet(info_path)
    mapper = TopicMapper(backend=s.mapping_backend, threshold=s.mapping_threshold, overrides=overrides, taxonomy=tax, spec=spec,
                         cache_dir=s.cache_dir)
    mapping = mapper.map(info, dict(zip(conv["conversation_id"], conv["document"])))

    # ---- sensitive detection: labels, refit policy, validation
    labels = _labels(rd, s, conv, notes)
    # a file (not loaded params): the detector reads its user-side entry for a corpus without replies, as for the defaults
    params = project_path(s.detector_params) if s.detector_params else None
    det = SensitiveDetector(backend=s.detector_backend, params=params, spec=spec, cache_dir=s.cache_dir, fitting=replace(FITTINGS[s.detector_fitting], seed=s.seed))
    source = str(s.detector_params) if s.detector_params else f"shipped defaults ({det.params.fitted_on or 'hand-set'})"
    dr = detect_with_refit(det, conv[[c for c in ("conversation_id", "document", "first_reply", "user_id") if c in conv]], labels, s, params_source=source)
    notes += dr.notes

    cc = conversation_categories(dr.detection.to_frame(), assign, mapping)

    # ---- every conversation's own tier-1/tier-2 (the topic's node above is kept as topic_*)
    cats = categorize_run(conv, labels, backend=s.mapping_backend, model_path=s.categorizer_model, fit=s.fit_categorizer,
                          min_labels=s.min_labels_to_fit, cv_folds=s.cv_folds, seed=s.seed, cache_dir=s.cache_dir, taxonomy=tax)
    notes += cats.notes
    topic_of = conv[["conversation_id"]].merge(assign[["conversation_id", "topic"]], on="conversation_id", how="left")["topic"]
    ctab, conv_overrides = apply_overrides(cats.table, topic_of, overrides.conversations,
                                           {o["topic"]: o["to"] for o in mapping.overrides_applied}, source=overrides.source, taxonomy=tax)
    cc = cc.merge(ctab.rename(columns={c: f"conv_{c}" for c in ctab.columns if c != "conversation_id"}), on="conversation_id", how="left")
    cc = cc.rename(columns={"conv_source": "conv_category_source"})
    mix = topic_mix(cc[["topic", "conv_tier1_label", "conv_path"]].rename(columns={"conv_tier1_label": "tier1_label", "conv_path": "path"}))
    mix = mix.merge(readable_labels(info, mix), on="topic", how="left")
    mapping.table = mapping.table.drop(columns=[c for c in mix.columns if c != "topic" and c in mapping.table])
    mapping.table = (mapping.table.assign(_topic=mapping.table["topic"].astype(str))
                     .merge(mix.rename(columns={"topic": "_topic"}), on="_topic", how="left").drop(columns="_topic"))
    tier1_conv = confusion = None
    if labels is not None and "iab_tier1" in labels:
        lv = labels[labels["iab_tier1"].notna() & labels["art9"].map(lambda v: len(v) == 0)]
        if len(lv):
            got = cc.set_index("conversation_id").loc[lv["conversation_id"]]
            users = conv.set_index("conversation_id")["user_id"].reindex(lv["conversation_id"]).to_numpy(dtype=object)
            users = np.where(pd.isna(users), lv["conversation_id"].to_numpy(dtype=object), users)  # no owner: its own cluster
            tier1_conv = tier1_accuracy(got["conv_tier1_id"], lv["iab_tier1"].astype(str), users)
            tier1_conv["ci_method"] = "cluster-robust by user"
            tier1_conv["model"] = cats.model_source
            confusion = tier1_confusion(got["conv_tier1_id"], lv["iab_tier1"].astype(str), tax)
    # ---- tier-1 accuracy of non-sensitive conversations against labels (simulator: iab_tier1)
    tier1 = None
    if dr.held_out is not None and "iab_tier1" in dr.held_out:
        lv = dr.held_out[dr.held_out["iab_tier1"].notna() & dr.held_out["art9"].map(lambda v: len(v) == 0)]
        if len(lv):
            got = cc.set_index("conversation_id").loc[lv["conversation_id"], ["tier1_id", "topic"]]
            tier1 = tier1_accuracy(got["tier1_id"], lv["iab_tier1"].astype(str), got["topic"])

    res = AdMappingResult(mapping.table, cc, mapping, dr.detection, dr.validation, dr.params_source, tier1, conv, notes=notes,
                          min_cell_users=s.min_cell_users, conversation_tier1_accuracy=tier1_conv,
                          tier1_confusion=confusion[0] if confusion else None, tier1_confusion_table=confusion[1] if confusion else None,
                          categorizer_source=cats.model_source, conversation_overrides_applied=conv_overrides)
    art = {
        "topic_categories": write_parquet(mapping.table, rd.topic_categories),
        "conversation_categories": write_parquet(cc, rd.conversation_categories),
        "detector_params": dr.detection.params.save(rd.detector_params),  # the given or user-side fit that scored, or a refit on all labels (with cv_folds > 1 its fold detectors scored)
        "mapping_overrides_applied": write_json({"file": overrides.source, "topics": mapping.overrides_applied, "conversations": conv_overrides,
                                                 "ad_nodes": overrides.ad_nodes,
                                                 "ad_nodes_in_use": spec.ad_nodes()}, rd.mapping_overrides_applied),
    }
    if dr.validation is not None:
        art["detector_validation"] = write_parquet(dr.validation.detector_validation(), rd.detector_validation)
        art["detector_metrics"] = write_parquet(dr.validation.to_frame(), rd.detector_metrics)
        art["detector_confusion"] = write_parquet(dr.validation.confusion.reset_index(), rd.detector_confusion)
    res.artifacts = {k: str(v) for k, v in art.items()}
    record_metrics(res, rd, truth)
    return res


def _labels(rd: RunDir, s: MappingSettings, conv: pd.DataFrame, notes: list[str]) -> pd.DataFrame | None:
    """`labels_path`, else stage 00's labels, restricted to this run's conversations (None: no labels)."""
    paths = [s.labels_path] if isinstance(s.labels_path, str) else list(s.labels_path or ())
    labels = read_labels([project_path(p) for p in paths]) if paths else (pd.read_parquet(rd.labels) if rd.exists("labels") else None)
    if labels is None:
        return None
    if s.labels_split is not None:
        if "split" not in labels.columns:
            raise DataError(paths[0] if paths else rd.labels, f"labels_split={s.labels_split!r} is set but the labels have no split column",
                            column="split")
        labels = labels[labels["split"].astype(str) == s.labels_split]
        notes.append(f"labels restricted to split {s.labels_split!r}: {len(labels)} conversations")
    labels = labels[labels["conversation_id"].isin(conv["conversation_id"])].drop_duplicates("conversation_id")
    if not len(labels):
        notes.append("labels given but none matches a conversation: no validation")
        return None
    return labels


def conversation_categories(detected: pd.DataFrame, assign: pd.DataFrame, mapping: TopicMapping) -> pd.DataFrame:
    """Per conversation: its topic's IAB node, tier 1 and path beside the detector's scores and flags;
    records each topic's sensitive share in `mapping.table`."""
    cc = detected.merge(assign[["conversation_id", "topic"]], on="conversation_id", how="left")
    tmap = mapping.table.set_index(mapping.table["topic"].astype(str))
    key = cc["topic"].astype(str)
    for col in ("iab_id", "tier1_id", "tier1_label", "path"):
        cc[col] = key.map(tmap[col])
    cc["iab_ids"] = cc["iab_id"].map(lambda v: [v] if isinstance(v, str) else [])
    share = cc.groupby(key)["any_sensitive"].mean()
    mapping.table["sensitive_share"] = mapping.table["topic"].astype(str).map(share).round(4)
    first = ["conversation_id", "topic", "iab_id", "tier1_id", "tier1_label", "path", "iab_ids"]
    return cc[first + [c for c in cc.columns if c not in first]]


def record_metrics(res: AdMappingResult, rd: RunDir, truth: GroundTruth | None) -> None:
    m = MetricsRecorder(rd, MAPPING)
    n = len(res.conversation_categories)
    truth_prev = truth.art9_prevalence(res.conversation_categories["conversation_id"]) if truth is not None else {}
    for r in res.detection.prevalence().itertuples():
        m.add(M.PREVALENCE_FLAGGED, r.share, group={"category": r.category}, n=n, truth=truth_prev.get(r.category))
    if res.validation is not None:
        for r in res.validation.to_frame().itertuples():
            g = {"category": r.category}
            m.add(M.PRECISION, r.precision, group=g, ci=(r.precision_low, r.precision_high), n=r.flagged)
            m.add(M.RECALL, r.recall, group=g, ci=(r.recall_low, r.recall_high), n=r.positives)
            m.add(M.F1, r.f1, group=g, ci=(r.f1_low, r.f1_high), n=r.n)
            m.add(M.SPECIFICITY, r.specificity, group=g, ci=(r.specificity_low, r.specificity_high), n=r.tn + r.fp)
    if res.tier1_accuracy:
        t = res.tier1_accuracy
        m.add(M.TIER1_ACCURACY, t["accuracy"], ci=(t["ci_low"], t["ci_high"]), n=t["n"])
    if res.conversation_tier1_accuracy:
        t = res.conversation_tier1_accuracy
        m.add(M.TIER1_ACCURACY_CONVERSATION, t["accuracy"], ci=(t["ci_low"], t["ci_high"]), n=t["n"])
        for r in res.tier1_confusion.itertuples():
            if r.tier1 != NONE:
                m.add(M.TIER1_RECALL, r.recall, group={"tier1": r.tier1}, n=r.labeled)
    src = res.topic_categories["source"].value_counts()
    for s in ("similarity", "override", UNMAPPED):
        m.add(M.TOPICS_BY_SOURCE, int(src.get(s, 0)), group={"source": s})
    for o in res.mapping.overrides_applied:
        m.add(M.OVERRIDE_APPLIED, 1, group={"topic": o["topic"], "to": o["to"] or UNMAPPED, "from": o["from"] or UNMAPPED})
    m.write()
