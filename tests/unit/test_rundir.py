"""The run-folder contract: typed artifact paths, `require` naming the stage to run first, and the
metric-name registry the writers enforce."""

from __future__ import annotations

import pytest

from analysis.contract import metric_names
from analysis.contract.rundir import ARTIFACTS, MissingArtifact, RunDir, StageInputError
from analysis.contract.stages import INGEST, LEAKAGE, STAGES
from analysis.util.metrics import MetricsRecorder, read_metrics


def test_artifacts_have_one_path_each_and_a_known_writer():
    paths = [a.relpath for a in ARTIFACTS.values()]
    assert len(paths) == len(set(paths))
    assert all(a.stage in STAGES for a in ARTIFACTS.values())
    rd = RunDir("/tmp/run")
    assert rd.conversations == rd.path("conversations") == rd.root / "data" / "conversations.parquet"
    assert rd.metrics_file(LEAKAGE).name == "03_leakage.json"
    with pytest.raises(KeyError, match="unknown artifact 'nope'"):
        rd.path("nope")


def test_require_names_the_missing_files_and_the_stage_that_writes_them(tmp_path):
    rd = RunDir(tmp_path)
    rd.data.mkdir()
    rd.conversations.write_bytes(b"x")
    assert rd.require("conversations") == rd.conversations
    with pytest.raises(MissingArtifact, match=r"topics\.parquet, topic_info\.parquet not found in .*: run stage 01 \(topics\) first") as e:
        rd.require("conversations", "topics", "topic_info")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, StageInputError)
    with pytest.raises(MissingArtifact, match="conversation_categories.parquet.*stage 02"):
        rd.require("conversation_categories")


def test_metric_names_are_registered_per_stage(tmp_path):
    m = MetricsRecorder(tmp_path, INGEST)
    m.add(metric_names.CONVERSATIONS, 3)
    with pytest.raises(ValueError, match="metric 'conversation' is not registered for stage 00_ingest"):
        m.add("conversation", 3)
    m.write()
    assert read_metrics(RunDir(tmp_path))["metric"].tolist() == ["conversations"]
    with pytest.raises(ValueError, match="unknown stage"):
        RunDir(tmp_path).metrics_file("07_nothing")


def test_both_engines_implement_the_protocol():
    from analysis.engines import Engine, make_engine

    for name in ("pandas", "dask"):
        e = make_engine(name, "tcp://127.0.0.1:1")  # a Dask engine connects on first use only
        assert isinstance(e, Engine) and e.name == name
