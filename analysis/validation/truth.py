"""A run's ground truth (simulated worlds only) and the evaluation step that attaches it.

Stage 00 copies `ground_truth.json` and `truth/conversations.parquet` of a simulated world into
the run folder (`RunDir.ground_truth`, `RunDir.truth_conversations`); later stages read them here,
never the input folder. Estimators do not see the truth: each stage estimates, then calls the
`evaluate_*` function of its results, which adds `truth` (and `covers_truth_*`) columns.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9
from analysis.contract.rundir import RunDir
from analysis.topics.quality import agreement
from analysis.util.storage import atomic_path

WORLD_TRUTH = "ground_truth.json"
WORLD_CONVERSATIONS = Path("truth") / "conversations.parquet"


def copy_world_truth(input_dir: str | Path, run_dir: RunDir) -> bool:
    """Copy a simulated world's truth into the run folder; False when the inputs are not a simulated world."""
    src = Path(input_dir)
    if not (src.is_dir() and (src / WORLD_TRUTH).exists()):
        return False
    for s, key in ((src / WORLD_TRUTH, "ground_truth"), (src / WORLD_CONVERSATIONS, "truth_conversations")):
        if s.exists():
            with atomic_path(run_dir.path(key)) as tmp:
                shutil.copyfile(s, tmp)
    return True


@dataclass
class GroundTruth:
    """What a simulated world knows: `world` (ground_truth.json) and per-conversation truth."""

    world: dict
    conversations_path: Path | None

    @classmethod
    def read(cls, run_dir: str | Path | RunDir) -> "GroundTruth | None":
        rd = RunDir.of(run_dir)
        if not rd.exists("ground_truth"):
            return None
        return cls(json.loads(rd.ground_truth.read_text()), rd.optional("truth_conversations"))

    def topics(self) -> pd.DataFrame | None:
        """conversation_id, topic (the simulator's true topic)."""
        if self.conversations_path is None:
            return None
        return pd.read_parquet(self.conversations_path, columns=["conversation_id", "topic"])

    def art9_prevalence(self, conversation_ids) -> dict[str, float]:
        """True share of `conversation_ids` about each Art. 9 category."""
        if self.conversations_path is None:
            return {}
        t = pd.read_parquet(self.conversations_path, columns=["conversation_id", "art9"])
        t = t[t["conversation_id"].isin(conversation_ids)]
        return {c: float(t["art9"].map(lambda v, c=c: c in list(v)).mean()) for c in ART9}

    def counts(self) -> dict:
        return self.world.get("counts", {})


# ---------------------------------------------------------------------------- evaluation steps


def attach_leak_truth(t: pd.DataFrame, truth: dict | None) -> None:
    """Add the true leak rate per category and region group, and whether each CI covers it."""
    if not truth:
        return

    def tv(c, g):
        row = truth.get(c) or {}
        v = row.get("leak_rate") if g == "all" else ((row.get("by_region_group") or {}).get(g) or {}).get("leak_rate")
        return np.nan if v is None else float(v)

    t["truth"] = [tv(c, g) for c, g in zip(t["category"], t["region_group"])]
    for lo, hi, name in (("cp_low", "cp_high", "cp"), ("wilson_low", "wilson_high", "wilson"), ("ci_low", "ci_high", "ci")):
        if lo in t:
            t[f"covers_truth_{name}"] = np.where(t["truth"].notna() & t[lo].notna(), (t[lo] <= t["truth"]) & (t["truth"] <= t[hi]), None)


def evaluate_leakage(report, world: dict | None) -> None:
    """Stage 03's tables with the true leak rates beside the estimates."""
    truth = (world or {}).get("leakage")
    for res in {id(r): r for r in (report.whitebox, report.whitebox_detector) if r is not None}.values():
        attach_leak_truth(res.table, truth)
    if report.corrected is not None:
        attach_leak_truth(report.corrected.table, truth)
    if getattr(report, "clustered", None) is not None:
        attach_leak_truth(report.clustered, truth)
    if getattr(report, "ppi", None) is not None:
        report.ppi.table["region_group"] = "all"
        attach_leak_truth(report.ppi.table, truth)


def evaluate_lift(report, world: dict | None) -> None:
    """Stage 04's per-category table with the true matched lift beside the estimate."""
    truth = ((world or {}).get("lift") or {}).get("by_category_matched_lift")
    if report is not None and report.categories is not None:
        report.categories.table["truth"] = report.categories.table["ad_category"].map(truth) if truth else np.nan


def evaluate_topics(result, truth: pd.DataFrame | None) -> None:
    """Stage 01's quality table with agreement (ARI, NMI) against the simulator's true topics,
    inserted after the topic-diversity row."""
    if truth is None or not len(truth):
        return
    conv, q = result.assignments, result.quality
    tr = conv[["conversation_id"]].merge(truth[["conversation_id", "topic"]], on="conversation_id", how="left")
    have = tr["topic"].notna().to_numpy()
    if not have.any():
        return
    topic_all = conv["topic"].to_numpy()
    rows = []

    def add(metric, estimate, n=None, **group):
        rows.append({"metric": metric, "estimate": None if estimate is None else float(estimate), "n": n, "group": group})

    ag = agreement(topic_all[have], tr["topic"].to_numpy()[have])
    add("ari", ag["ari"], int(have.sum()), truth="simulator topic")
    add("nmi", ag["nmi"], int(have.sum()), truth="simulator topic")
    non_out = have & (topic_all != -1)
    if non_out.sum() > 1:
        ag2 = agreement(topic_all[non_out], tr["topic"].to_numpy()[non_out])
        add("ari", ag2["ari"], int(non_out.sum()), truth="simulator topic", scope="non-outliers")
    add("true_topics", int(pd.Series(tr["topic"].to_numpy()[have]).nunique()))
    at = int(np.flatnonzero(q["metric"].to_numpy() == "topic_diversity")[-1]) + 1 if (q["metric"] == "topic_diversity").any() else len(q)
    result.quality = pd.concat([q.iloc[:at], pd.DataFrame(rows), q.iloc[at:]], ignore_index=True)
