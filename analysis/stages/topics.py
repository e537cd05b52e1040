"""Stage 01, topics: what do people talk about with the AI?

Cleans the conversations' documents and fits topics (`analysis.topics`), with the heavy steps on
the engine; writes the per-conversation topics, the topic table, topics over time and by region
(small cells suppressed), the model, and the quality metrics (with ARI/NMI against a simulated
world's true topics).
"""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq

from analysis.contract.rundir import RunDir
from analysis.contract.settings import TopicSettings
from analysis.contract.stages import TOPICS
from analysis.engines import Engine, make_engine
from analysis.topics.modeler import TopicModeler
from analysis.topics.result import TopicsResult
from analysis.util.embeddings import get_embedder
from analysis.util.metrics import MetricsRecorder
from analysis.util.storage import write_parquet
from analysis.validation.truth import GroundTruth, evaluate_topics

META_COLUMNS = ("conversation_id", "user_id", "region", "excluded", "started_at")


def run(run_dir: RunDir | str, settings: TopicSettings | None = None, engine: Engine | None = None) -> TopicsResult:
    """Stage 01 on `data/conversations.parquet`; see the module docstring for what it writes."""
    rd, s = RunDir.of(run_dir), settings or TopicSettings()
    engine = engine or make_engine(s.engine, s.dask_scheduler)
    path = rd.require("conversations")
    modeler = TopicModeler(s)
    if s.max_documents is not None:
        # a bounded sample of conversations: cleaned and embedded in process, whatever the engine
        res = modeler.fit(pd.read_parquet(path))
    else:
        names = pq.ParquetDataset(path).schema.names
        conv = pd.read_parquet(path, columns=[c for c in META_COLUMNS if c in names])
        docs = engine.clean_documents(path, s.max_chars)
        embedder = get_embedder(s.embedding_backend, s.cache_dir)
        res = modeler.fit(conv, embedder=embedder, documents=docs, embed_assign=engine.embed_assign(embedder, s.opening_weight))
    truth = GroundTruth.read(rd)
    if truth is not None:
        evaluate_topics(res, truth.topics())
    k = s.min_cell_users
    art = {
        "topics": write_parquet(res.assignments, rd.topics),
        "topic_info": write_parquet(res.topic_info, rd.topic_info),
        "topics_over_time": write_parquet(res.over_time(), rd.topics_over_time),
        "topics_by_region": write_parquet(res.by_region(k), rd.topics_by_region),
        "topic_model": res.model.save(rd.topic_model),
    }
    res.artifacts = {key: str(v) for key, v in art.items()}
    m = MetricsRecorder(rd, TOPICS)
    for r in res.quality.itertuples():
        m.add(r.metric, r.estimate, group=r.group, n=None if pd.isna(r.n) else int(r.n))
    m.write()
    return res
