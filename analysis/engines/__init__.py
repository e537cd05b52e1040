"""Engines: where the heavy steps run. A stage receives an engine and calls the protocol below;
it never asks which engine it has.

- `PandasEngine` (`engines/pandas.py`): in-process, the default;
- `DaskEngine` (`engines/dask.py`): the same steps on a dask.distributed cluster (the `dask_scheduler`
  setting, else $DASK_SCHEDULER_ADDRESS, else a LocalCluster), for logs and corpora larger than memory.

Both give the same results on the same input and seed (tests/integration/test_engines.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import pandas as pd

from analysis.contract.settings import ENGINES
from analysis.engines.dask import DaskEngine
from analysis.engines.pandas import PandasEngine
from analysis.impressions import LiftData
from analysis.topics.documents import Documents
from analysis.util.embeddings import Embedder

# (texts, openings or None, assignment spec) -> (topic, similarity, sum of outlier embeddings, embedding stats)
EmbedAssign = Callable[[list, "list | None", dict], tuple]


@runtime_checkable
class Engine(Protocol):
    name: str

    def read_impressions(self, path: str | Path) -> pd.DataFrame:
        """The compact impression frame of `analysis.impressions.read_impressions` (ids as
        categoricals in first-appearance order, the `chat` flag instead of targeting sources)."""

    def aggregate(self, path: str | Path, users: pd.DataFrame, *, policy_date: str, excluded_regions) -> LiftData:
        """The impression log reduced to `LiftData` (the rules of `analysis.impressions.assemble`)."""

    def clean_documents(self, conversations_path: str | Path, max_chars: int) -> Documents:
        """Cleaned documents (`analysis.topics.documents.build_documents`) of a conversations table, in row order."""

    def embed_assign(self, embedder: Embedder, opening_weight: float) -> EmbedAssign | None:
        """A hook that embeds and assigns the documents outside the topic fit sample elsewhere,
        or None: the topic modeler embeds them in process."""


def check_engine(engine: str | None) -> str:
    engine = (engine or "pandas").lower()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def make_engine(engine: str | None = "pandas", dask_scheduler: str | None = None) -> Engine:
    """The engine a stage's `engine` / `dask_scheduler` settings name."""
    return DaskEngine(dask_scheduler) if check_engine(engine) == "dask" else PandasEngine()
