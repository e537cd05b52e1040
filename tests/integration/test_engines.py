"""The dask engine gives the pandas engine's results on the same input and seed (2-worker LocalCluster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis.contract.settings import IngestSettings, LiftSettings, TopicSettings
from analysis.engines import check_engine, make_engine
from analysis.engines.dask import DaskEngine
from analysis.engines.pandas import PandasEngine
from analysis.impressions import aggregate, read_impressions
from analysis.lift.did import DiffInDiff
from analysis.lift.report import analyse
from analysis.stages import ingest
from analysis.topics.modeler import TopicModeler
from analysis.util.embeddings import STATIC, Embedder


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    # threads, not processes: starting worker processes would dominate a small test
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, Client(lc) as c:
        yield c


@pytest.fixture(scope="module")
def run_dir(small_world_dir, tmp_path_factory) -> Path:
    rd = tmp_path_factory.mktemp("engine_run")
    ingest.run(rd, IngestSettings(input_dir=str(small_world_dir)))
    # the impression log as a partitioned dataset (4 part files of 2 row groups each), as a
    # platform export or a data lake would hold it
    t = pq.read_table(rd / "data" / "impressions.parquet")
    part = rd / "data" / "impressions_parts"
    part.mkdir()
    step = -(-t.num_rows // 4)
    for i in range(4):
        pq.write_table(t.slice(i * step, step), part / f"part-{i:03d}.parquet", row_group_size=-(-step // 2))
    return rd


def test_engine_parameter_is_checked():
    assert check_engine(None) == "pandas"
    assert isinstance(make_engine("pandas"), PandasEngine) and isinstance(make_engine("dask", "tcp://nowhere:1"), DaskEngine)
    with pytest.raises(ValueError):
        check_engine("spark")
    with pytest.raises(ValueError, match="engine must be one of"):
        TopicSettings(engine="spark")


def test_dask_aggregation_equals_pandas(run_dir, cluster_client):
    users = pd.read_parquet(run_dir / "data" / "users.parquet", columns=["user_id", "region"])
    want = aggregate(read_impressions(run_dir / "data" / "impressions.parquet"), users)
    for src in ("impressions.parquet", "impressions_parts"):
        got = DaskEngine(client=cluster_client).aggregate(run_dir / "data" / src, users, policy_date="2025-12-16", excluded_regions=None)
        pd.testing.assert_frame_equal(got.user_week, want.user_week)
        pd.testing.assert_frame_equal(got.users, want.users, check_dtype=False)
        pd.testing.assert_frame_equal(got.category_cells.reset_index(drop=True), want.category_cells.reset_index(drop=True), check_dtype=False)
        assert (got.n_impressions, got.n_dropped) == (want.n_impressions, want.n_dropped)
    # and so every estimate: the DiD and the whole stage's analysis
    a, b = DiffInDiff().fit(got), DiffInDiff().fit(want)
    assert a.abs_lift == pytest.approx(b.abs_lift, rel=1e-12) and a.ci == pytest.approx(b.ci, rel=1e-12)
    s = LiftSettings(lift_permutations=200, seed=1)
    ra, rb = analyse(got, s), analyse(want, s)
    assert ra.ab.plain.rel_lift == pytest.approx(rb.ab.plain.rel_lift, rel=1e-12)
    assert ra.ab.permutation_p == rb.ab.permutation_p  # seeded permutations see the same users in the same order


def test_dask_impression_reader_equals_pandas(run_dir, cluster_client):
    want = read_impressions(run_dir / "data" / "impressions.parquet")
    got = DaskEngine(client=cluster_client).read_impressions(run_dir / "data" / "impressions_parts")
    pd.testing.assert_frame_equal(got, want, check_dtype=False, check_categorical=True)


def test_dask_topics_equal_pandas(run_dir, cluster_client, tmp_path):
    conv_path = run_dir / "data" / "conversations.parquet"
    s = TopicSettings(fit_sample=600, topic_seed=3, cache_dir=str(tmp_path / "cache"))
    want = TopicModeler(s).fit(pd.read_parquet(conv_path), embedder=Embedder(STATIC, cache_dir=tmp_path / "a"))
    # what stage 01 does with an engine: clean on it, fit the sample here, embed and assign the rest on it
    eng, emb = DaskEngine(client=cluster_client), Embedder(STATIC, cache_dir=tmp_path / "b")
    meta = pd.read_parquet(conv_path, columns=["conversation_id", "user_id", "region", "excluded", "started_at"])
    got = TopicModeler(s).fit(meta, embedder=emb, documents=eng.clean_documents(conv_path, s.max_chars),
                              embed_assign=eng.embed_assign(emb, s.opening_weight))
    a, b = got.assignments, want.assignments
    assert (a["assigned_by"] == "knn").sum() > 500  # most documents were assigned on the workers
    pd.testing.assert_series_equal(a["topic"], b["topic"])
    pd.testing.assert_series_equal(a["topic_label"], b["topic_label"])
    np.testing.assert_allclose(a["similarity"], b["similarity"], atol=1e-5)
    pd.testing.assert_frame_equal(got.topic_info.drop(columns=["npmi"]), want.topic_info.drop(columns=["npmi"]))
    np.testing.assert_allclose(got.model.centroids(), want.model.centroids(), atol=1e-5)
