"""The in-process engine: every heavy step in this Python process with pandas, Arrow and numpy."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from analysis.impressions import LiftData, aggregate, read_impressions
from analysis.topics.documents import Documents, build_documents
from analysis.util.embeddings import Embedder


class PandasEngine:
    name = "pandas"

    def read_impressions(self, path: str | Path) -> pd.DataFrame:
        return read_impressions(path)

    def aggregate(self, path: str | Path, users: pd.DataFrame, *, policy_date: str, excluded_regions) -> LiftData:
        imp = read_impressions(path)
        return aggregate(imp, users, policy_date=policy_date, excluded_regions=excluded_regions)

    def clean_documents(self, conversations_path: str | Path, max_chars: int) -> Documents:
        cols = [c for c in ("document", "opening") if c in pq.ParquetDataset(conversations_path).schema.names]
        conv = pd.read_parquet(conversations_path, columns=cols)
        t0 = time.perf_counter()
        docs = build_documents(conv["document"], openings=conv["opening"] if "opening" in conv else None, max_chars=max_chars)
        docs.seconds = time.perf_counter() - t0
        return docs

    def embed_assign(self, embedder: Embedder, opening_weight: float):
        return None  # the topic modeler embeds every document in process
