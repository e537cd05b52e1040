"""Every input shape runs to a summary: optional tables and columns absent in any combination, one
region only, only excluded regions, no impressions after the policy date, a chat corpus without an ad
log. Each stage runs or says why it cannot; no summary sentence states what the data cannot show.

Stages 00, 03, 04 and 05 run in process on each variant of a tiny simulated world; stage 02's
conversation categories (which depend only on the messages and labels) come from one run of the
stage on the full world, and stage 01 is not run (its answer says so)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.contract.rundir import ARTIFACTS
from analysis.contract.settings import IngestSettings, LeakageSettings, LiftSettings, MappingSettings
from analysis.contract.stages import MAPPING
from analysis.simulate import simulate
from analysis.stages import ingest, leakage, lift, mapping, summary
from analysis.util.metrics import read_metrics
from analysis.util.regions import is_excluded

WORLD = {"seed": 3, "n_users": 150, "n_conversations": 500, "n_impressions": 15_000}
LABEL_ARTIFACTS = ("detector_validation", "detector_metrics", "detector_confusion")


def _drop(table, *cols):
    def f(d: Path):
        p = d / f"{table}.parquet"
        pd.read_parquet(p).drop(columns=list(cols)).to_parquet(p)
    return f


def _rm(*names):
    def f(d: Path):
        for n in names:
            shutil.rmtree(d / n) if (d / n).is_dir() else (d / n).unlink()
    return f


def _set(table, col, value):
    def f(d: Path):
        p = d / f"{table}.parquet"
        t = pd.read_parquet(p)
        t[col] = value
        t.to_parquet(p)
    return f


def _before_policy(d: Path):
    p = d / "impressions.parquet"
    t = pd.read_parquet(p)
    t[t["shown_at"] < pd.Timestamp("2025-12-16", tz="UTC")].to_parquet(p)


def _all(*fs):
    def f(d):
        for g in fs:
            g(d)
    return f


# variant -> (mutation, {answer key: substrings its sentence must hold})
VARIANTS = {
    # 150 users: no category's labeled sample reaches k = 10 users, so the summary suppresses the rates, not the verdicts
    "full": (lambda d: None, {"leakage": ["labeled conversations from at least 10 users, so no leak rate is shown", "tolerance (one-sided 95% bounds)"],
                              "lift": ["difference-in-differences", "randomized holdout"]}),
    "no_arm": (_drop("impressions", "arm"), {"lift": ["difference-in-differences"]}),
    "arm_all_empty": (_set("impressions", "arm", None), {"lift": ["difference-in-differences"]}),
    "no_targeting_sources": (_drop("impressions", "targeting_sources"), {"leakage": ["could not be checked (no targeting_sources"]}),
    "no_placement_no_modality": (_all(_drop("impressions", "placement"), _drop("messages", "modality")), {}),
    "no_filter_decisions": (_rm("filter_decisions.parquet"), {"leakage": ["could not be estimated in this run (no filter decisions"]}),
    "no_labels": (_rm("labels.parquet"), {"leakage": ["passed the filter"]}),
    "no_ground_truth": (_rm("ground_truth.json", "truth"), {}),
    "bare": (_all(_rm("filter_decisions.parquet", "labels.parquet", "ground_truth.json", "truth"),
                  _drop("impressions", "arm", "targeting_sources", "placement"), _drop("messages", "modality")),
             {"leakage": ["no filter decisions", "no targeting_sources"]}),
    "one_included_region": (_set("users", "region", "US"), {"leakage": ["no users in excluded regions"], "lift": ["no users in excluded regions"]}),
    "only_excluded_regions": (_set("users", "region", "DE"), {"lift": ["no users in included regions"]}),
    "no_impressions_after_policy": (_before_policy, {"lift": ["no impressions after the policy date"]}),
    "chat_corpus_without_ad_log": (_rm("impressions.parquet", "filter_decisions.parquet"),
                                   {"leakage": ["no filter decisions", "no impressions"], "lift": ["no impressions"]}),
}


@pytest.fixture(scope="module")
def shape_world(tmp_path_factory):
    """The tiny world and a run of stages 00 and 02 on it (truth topics: no stage 01). Stage 02 only feeds the
    variants its artifacts, so it runs on the fast backends (student detector, static mapping): the categorizer is refitted on the world's
    tier-1 labels (fit_categorizer) rather than the shipped MiniLM one loaded (a MiniLM pass of ~35 CPU-s on a clean clone)."""
    world = simulate(WORLD).write(tmp_path_factory.mktemp("shape_world"))
    base = tmp_path_factory.mktemp("shape_base")
    ingest.run(base, IngestSettings(input_dir=str(world)))
    mapping.run(base, MappingSettings(use_truth_topics=True, detector_backend="student", mapping_backend="static", cv_folds=1,
                                      overrides_file=None, fit_categorizer=True))
    return world, base


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_input_shape_runs_to_an_honest_summary(variant, shape_world, tmp_path):
    world, base = shape_world
    mutate, expect = VARIANTS[variant]
    inp = tmp_path / "input"
    shutil.copytree(world, inp)
    mutate(inp)
    rd = tmp_path / "run"
    res = ingest.run(rd, IngestSettings(input_dir=str(inp)))
    q = res.summary()
    assert (q["rows_read"] == q["rows_kept"] + q["rows_quarantined"]).all()
    for key, a in ARTIFACTS.items():  # stage 02's outputs: from the full world's run
        src = base / a.relpath
        if a.stage == MAPPING and src.exists() and not (key in LABEL_ARTIFACTS and res.inputs.labels is None):
            (rd / a.relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, rd / a.relpath)
    leakage.run(rd, LeakageSettings(exposure_permutations=49, n_boot=100))
    lift.run(rd, LiftSettings(lift_permutations=49))
    s = summary.run(rd)
    answers = {a.key: a for a in s.answers()}

    assert "did not run" in answers["topics"].sentence  # stage 01 was not run here: it says so
    ran, _, not_run = s.stages_text().partition("Not run:")
    assert "stage 03 (leakage)" in ran and "stage 04 (engagement lift)" in ran and "stage 01 (topics)" in not_run
    for key in ("leakage", "lift"):  # these ran: never "did not run", never a NaN or n/a
        text = answers[key].sentence
        assert "did not run" not in text and "nan" not in text.lower() and "n/a" not in text, (key, text)
    for key, needles in expect.items():
        for needle in needles:
            assert needle in answers[key].sentence, (key, needle, answers[key].sentence)
    if not is_excluded(res.inputs.users["region"]).any():  # no finding about a group the data does not hold
        assert "No chat-derived ad signal" not in answers["leakage"].sentence
    # a figure without a value says why; no NaN anywhere
    m = read_metrics(rd)
    none = m[m["estimate"].isna()]
    assert none["note"].notna().all(), none[none["note"].isna()][["stage", "metric"]].drop_duplicates().to_string()
    assert not any("NaN" in f.read_text() for f in (rd / "metrics").glob("*.json"))
    # the violation sentence states the metrics' "ALL excluded" total, not that plus every region again
    v = m[(m["metric"] == "violation_impressions") & m["group"].map(lambda g: (g or {}).get("region") == "ALL excluded")]
    if len(v) and v["estimate"].notna().all() and v["estimate"].iloc[0] > 0:
        assert f"{int(v['estimate'].iloc[0]):,} impressions carried" in answers["leakage"].sentence
    truth = s.estimates_vs_truth()  # a real dataset (no ground truth): an empty table, not a KeyError
    if not (rd / "truth" / "ground_truth.json").exists():
        assert len(truth) == 0 and "simulated world" not in " ".join(s.caveats())
