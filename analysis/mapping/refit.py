"""The detector-refit policy of stage 02: when labels exist, refit the sensitive-topic detector on
them and validate it out of sample, then score every conversation.

- no labels: the shipped (or given) parameters score everything; no validation;
- labels, refit off (or fewer than `min_labels_to_fit` with "auto"): validation uses all labels;
- refit with `cv_folds` > 1: cross-prediction (Zrnic & Candes 2023, "Cross-prediction-powered
  inference"). Every conversation, labeled or not, gets a fold number from its user's id (`id_hash`
  with the run's seed; the conversation id where `conv` has no `user_id`) and is scored and flagged
  by the detector fitted without that fold's labels. Folds by user keep a user's other conversations
  (and, on ShareGPT, the other parts of a chat) out of the model that scores them, so the out-of-fold
  figures are those of a new user. A labeled conversation's score is thus out of fold, and the
  labeled and unlabeled conversations of a fold are scored by the same model and thresholds: they
  are exchangeable, so the validation (on labeled) describes the flags stage 03 counts (unlabeled),
  and its Rogan-Gladen correction and PPI++ read one predictor on both. The detector fitted on all
  labels is fitted too (`detection.params`, saved as detector_params.json for other corpora) but
  scores none of this run's conversations;
- refit with `cv_folds` <= 1: fit on a `tune_share` part of the labels (id-hash split), validate
  on the rest; the fitted detector scores everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.contract.settings import MappingSettings
from analysis.detector.evaluation import Validation, evaluate_detector
from analysis.detector.model import CrossFit, Detection, SensitiveDetector, has_replies
from analysis.mapping.labels import id_hash


@dataclass
class DetectorRun:
    """The detection of every conversation and, with labels, its validation."""

    detection: Detection
    validation: Validation | None
    params_source: str
    held_out: pd.DataFrame | None  # the labels the validation used (None: no labels)
    notes: list[str] = field(default_factory=list)


def detect_with_refit(det: SensitiveDetector, conv: pd.DataFrame, labels: pd.DataFrame | None, settings: MappingSettings,
                      *, params_source: str) -> DetectorRun:
    """Score `conv` (conversation_id, document, optionally first_reply and user_id) with `det`, refitting it on
    `labels` per the policy above. A refit reads the assistant's first reply when `conv` has any; the
    given parameters read it when they were fitted with it (when `conv` has none: the detector
    `SensitiveDetector.for_corpus` picks, with its note). `detection.params` are the params that scored
    (with cross-prediction: the all-labels fit, while the fold detectors scored)."""
    s = settings
    notes: list[str] = []
    pos = pd.Series(np.arange(len(conv)), index=conv["conversation_id"])
    docs_all = conv["document"].tolist()
    fit = False
    tune = np.zeros(0 if labels is None else len(labels), dtype=bool)
    if labels is not None:
        fit = s.fit_detector is True or (s.fit_detector == "auto" and len(labels) >= s.min_labels_to_fit)
        if not fit:
            notes.append(f"detector not refitted ({len(labels)} labels < min_labels_to_fit={s.min_labels_to_fit} or fit_detector off): "
                         "validation uses all labels" + (" — in-sample if these labels tuned the defaults" if s.labels_path else ""))
    replies = conv["first_reply"].tolist() if "first_reply" in conv else None
    replied = has_replies(replies)
    if not fit:  # the given parameters score: without replies, maybe their user-side fit (the detection carries the params used)
        det, note = det.for_corpus(replies)
        notes += [note] if note else []
    use_reply = replied if fit else det.params.with_reply
    use_head = True if fit else det.params.with_head  # a refit reads the head vector, as the shipped fit does
    # ... but not the neighbour vote: its pool is the gold set's labels, a refit learns from this run's
    feats = det.features(docs_all, (replies if replied else [None] * len(conv)) if use_reply else None, head=use_head,
                         vote=False if fit else None, ids=conv["conversation_id"].tolist())
    cf: CrossFit | None = None
    if labels is not None and fit and s.cv_folds and s.cv_folds > 1:
        unit = conv["user_id"] if "user_id" in conv else conv["conversation_id"]
        fold = (id_hash(unit, s.seed) * s.cv_folds).astype(int)  # every conversation's, labeled or not, by user
        lp = pos[labels["conversation_id"]].to_numpy()
        cf = det.cross_fit([docs_all[i] for i in lp], labels["art9"].reset_index(drop=True), fold[lp],
                           features=feats.iloc[lp].reset_index(drop=True), source=f"all {len(labels)} labeled conversations of this run")
        scores, flags = cf.predict(det, feats, fold, docs_all)
        detection = Detection(conv["conversation_id"].reset_index(drop=True), scores, flags, feats, det.params)
        params_source = (f"{s.cv_folds}-fold cross-prediction on this run's {len(labels)} labeled conversations: every conversation "
                         f"is scored by the detector fitted without its fold (fold by {unit.name} hash; labeled ones out of fold); the "
                         "detector fitted on all labels is saved (detector_params.json) but scores none of this run")
    elif labels is not None and fit:
        tune = id_hash(labels["conversation_id"], s.seed) < s.tune_share
        lt = labels[tune]
        det.fit([docs_all[i] for i in pos[lt["conversation_id"]].to_numpy()], lt["art9"].reset_index(drop=True),
                features=feats.iloc[pos[lt["conversation_id"]].to_numpy()].reset_index(drop=True),
                source=f"{int(tune.sum())} labeled conversations of this run (tuning part)")
        params_source = f"fitted on {int(tune.sum())} labeled conversations; validated on the other {int((~tune).sum())}"
    if cf is None:
        detection = det.detect(docs_all, conv["conversation_id"], features=feats)
    validation = held_out = None
    if labels is not None:
        held_out = labels[~tune]
        validation = evaluate_detector(detection.flags.iloc[pos[held_out["conversation_id"]].to_numpy()].reset_index(drop=True),
                                       held_out["art9"].reset_index(drop=True))
    return DetectorRun(detection, validation, params_source, held_out, notes)
