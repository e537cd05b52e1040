"""The Dask engine: the heavy steps on dask.distributed, with results equal to the pandas engine's.

- a cluster is found, not built by hand: the `dask_scheduler` setting, else the
  `DASK_SCHEDULER_ADDRESS` environment variable (any scheduler: Kubernetes, YARN, HPC, SSH),
  else a `LocalCluster` on this machine; `client()` returns it and the notebook shows its dashboard;
- inputs are read as partitioned Parquet (`read_parquet`: one file, or a folder of part files);
- topics (stage 01): documents are cleaned by `map_partitions` on the workers; UMAP + HDBSCAN are
  fitted on the seeded sample on the driver exactly as with pandas; the fitted assignment rule
  (kNN index of the sample, centroids, threshold) is broadcast once, and the remaining documents
  are embedded and assigned by `map_partitions` (`embed_assign`); topic representations
  (c-TF-IDF over every document) stay on the driver, as with pandas;
- lift (stage 04): impressions are reduced to the partial sums `analysis.impressions.assemble`
  finishes (per user and week, per user and arm, per category, user and chat flag) by Dask
  groupby -- the impression log never reaches the driver;
- leakage (stage 03): impressions are read and reduced to compact columns (the chat flag instead
  of lists of targeting sources) in parallel (`read_impressions`).

The per-row work is the pandas engine's functions, and user/category codes keep the pandas order
(first appearance). dask and distributed are imported inside functions: they are optional at
import time (a pandas-only run never loads them).
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.impressions import (
    ARMS,
    NS_PER_DAY,
    LiftData,
    assemble,
    chat_flag,
    included_users,
    user_regions,
)
from analysis.topics.documents import (
    Documents,
    build_documents,
    document_embeddings,
    embed_totals,
)
from analysis.topics.model import assign_rest
from analysis.util.embeddings import Embedder
from analysis.util.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE

log = logging.getLogger(__name__)

_CLUSTER = None  # the LocalCluster this process started, reused by later stages in the same kernel
_LOCK = threading.Lock()


def client(dask_scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1,
           processes: bool = True, memory_limit: str | float = "auto", show: bool = True):
    """A dask.distributed Client: `dask_scheduler`, else $DASK_SCHEDULER_ADDRESS, else an existing
    default client, else a LocalCluster (one single-threaded worker per core: the per-row work is
    Python and numpy, and processes sidestep the GIL). Shows the dashboard link when `show`."""
    global _CLUSTER
    from distributed import Client, LocalCluster, default_client

    address = dask_scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    with _LOCK:
        if address:
            c = Client(address)
        else:
            try:
                c = default_client()
            except ValueError:
                if _CLUSTER is None or _CLUSTER.status.name == "closed":
                    _CLUSTER = LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=threads_per_worker,
                                            processes=processes, memory_limit=memory_limit, dashboard_address=":0")
                c = Client(_CLUSTER, set_as_default=True)
    if show:
        show_dashboard(c)
    return c


def dashboard_link(c) -> str:
    """The dashboard URL with a host name instead of an IP address: reports are scanned for IPs
    (analysis.privacy), and a loopback IP is `localhost` anyway."""
    url = c.dashboard_link
    u = urlsplit(url)
    try:
        ip = ipaddress.ip_address(u.hostname or "")
    except ValueError:
        return url  # already a name
    if ip.is_loopback:
        host = "localhost"
    else:
        try:
            host = socket.gethostbyaddr(str(ip))[0]
        except OSError:
            return f"port {u.port} of the scheduler's host, path {u.path}"
    return urlunsplit(u._replace(netloc=f"{host}:{u.port}" if u.port else host))


def show_dashboard(c) -> None:
    """The cluster's size and dashboard link: Markdown in a notebook, a log line elsewhere."""
    info = c.scheduler_info()
    workers = info.get("workers", {})
    n, threads = len(workers), sum(w.get("nthreads", 0) for w in workers.values())
    link = dashboard_link(c)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            # the URL stays in the link target: the report's privacy scan reads visible text for URLs
            shown = f"[open the Dask dashboard]({link})" if link.startswith("http") else f"dashboard on {link}"
            display(Markdown(f"**Dask:** {n} workers, {threads} threads; {shown} (live while this stage runs)"))
            return
    except ImportError:
        pass
    log.info("Dask: %d workers, %d threads; dashboard %s", n, threads, link)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and type(get_ipython()).__name__ != "TerminalInteractiveShell"
    except ImportError:
        return False


def compute(*collections, c=None, label: str = ""):
    """Compute dask collections on the cluster with progress: distributed's progress bar in a
    terminal; in a notebook (whose output becomes the report) one line per tenth of the partitions."""
    import dask
    from distributed import futures_of

    if c is None:
        return dask.compute(*collections)
    if _in_kernel():
        persisted = c.persist(list(collections))  # per-partition futures: progress by partitions done
        _wait(futures_of(persisted), label)
        futures = c.compute(persisted)
    else:
        futures = c.compute(list(collections))
        _wait(futures, label)  # the progress bar follows every task behind these futures
    return tuple(c.gather(futures))


def gather_frame(ddf, c=None, label: str = "") -> pd.DataFrame:
    """A Dask DataFrame as one pandas frame on the driver, in partition order. The partitions come
    to the driver one by one: `compute` would first concatenate them in one task on one worker,
    which then needs the whole table in its memory (50M impressions: far over a worker's limit)."""
    if c is None:
        return ddf.compute()
    from distributed import futures_of

    persisted = c.persist(ddf)
    # one future per partition, keyed (name, i): put them in partition order
    parts = sorted(futures_of(persisted), key=lambda f: f.key[-1] if isinstance(f.key, tuple) else 0)
    _wait(parts, label)
    out = pd.concat([c.gather(f) for f in parts], ignore_index=False)
    del persisted
    return out


def _wait(parts, label: str) -> None:
    from distributed import as_completed, progress

    if not _in_kernel():
        if label:
            print(label, flush=True)
        progress(parts, notebook=False)
        print(flush=True)
        return
    t0, done, step, total = time.perf_counter(), 0, 0.1, max(len(parts), 1)
    for _ in as_completed(parts):
        done += 1
        if done / total >= step or done == total:
            print(f"{label}: {done}/{total} partitions ({done / total:.0%}), {time.perf_counter() - t0:.1f} s", flush=True)
            step = done / total + 0.1


def parquet_files(path: str | Path) -> list[str]:
    """One Parquet file, or the sorted *.parquet part files of a folder (a partitioned dataset)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet files")
        return files
    if not path.exists():
        raise FileNotFoundError(path)
    return [str(path)]


def read_parquet(path: str | Path, columns: Sequence[str] | None = None):
    """A Dask DataFrame over a Parquet file or folder: one partition per row group of each file,
    in file order (so row order is the pandas engine's)."""
    import dask.dataframe as dd

    return dd.read_parquet(parquet_files(path), columns=list(columns) if columns else None, split_row_groups=True)


def parquet_schema_names(path: str | Path) -> list[str]:
    return pq.read_schema(parquet_files(path)[0]).names


# ------------------------------------------------------------------------------- topics

_EMBEDDERS: dict = {}


def _worker_embedder(backend: str, cache_dir: str, use_cache: bool):
    """One embedder per worker process (and a lock: threaded workers share it)."""
    key = (backend, cache_dir, use_cache)
    with _LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = (Embedder(backend, cache_dir=cache_dir, use_cache=use_cache), threading.Lock())
        return _EMBEDDERS[key]


def _drop_embedders() -> None:
    with _LOCK:
        _EMBEDDERS.clear()
    gc.collect()


def _clean_partition(df: pd.DataFrame, max_chars: int) -> pd.DataFrame:
    d = build_documents(df["document"], openings=df["opening"] if "opening" in df else None, max_chars=max_chars)
    opened = pd.Series(d.openings if d.openings is not None else [None] * len(df), dtype=object, index=df.index)
    return pd.concat([pd.DataFrame({"text": pd.Series(d.texts, dtype=object, index=df.index), "opening": opened}), d.flags.set_index(df.index)], axis=1)


def _embed_assign_partition(items: list, spec: Mapping, backend: str, cache_dir: str, use_cache: bool, opening_weight: float) -> list:
    emb, lock = _worker_embedder(backend, cache_dir, use_cache)
    texts = [t for t, _ in items]
    openings = None if all(o is None for _, o in items) else [o or "" for _, o in items]
    with lock:
        n_calls = len(emb.stats.history)
        vecs = document_embeddings(emb, texts, openings, opening_weight)
        stats = embed_totals(emb, n_calls)
    t, bs, out_sum = assign_rest(vecs, spec)
    return [(t, bs, out_sum, stats)]


def _embed_assign(c, embedder, *, opening_weight: float = 0.0, partition_size: int = 20_000):
    """The `embed_assign` hook of `TopicModeler.fit`: the fitted assignment rule is put on the
    cluster once (a single task every partition depends on), and each partition of the texts is
    embedded and assigned by `assign_rest` on a worker, with the fit's embedding backend."""
    import dask
    import dask.bag as db

    backend, cache_dir, use_cache = embedder.backend, str(embedder.cache_dir), bool(embedder.use_cache)

    def run(texts: list[str], openings: list[str] | None, spec: Mapping):
        spec_d = dask.delayed(dict(spec), traverse=False)
        items = list(zip(texts, openings if openings is not None else [None] * len(texts)))
        bag = db.from_sequence(items, partition_size=max(1, partition_size))
        parts = bag.map_partitions(_embed_assign_partition, spec_d, backend, cache_dir, use_cache, opening_weight)
        (out,) = compute(parts, c=c, label=f"embed + assign {len(texts):,} documents ({bag.npartitions} partitions)")
        c.run(_drop_embedders)  # the workers' models and in-memory embedding caches are not needed after this
        if not out:
            return np.zeros(0, dtype=int), np.zeros(0), np.zeros(spec["centroids"].shape[1]), {}
        stats: dict = {}
        for *_, s in out:
            for k, v in s.items():
                stats[k] = stats.get(k, 0) + v
        return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
                np.sum([o[2] for o in out], axis=0), stats)

    return run


def _clean_documents(conversations_path: str | Path, max_chars: int = 2000, c=None) -> Documents:
    """Cleaned documents of a conversations table (map_partitions on the workers), gathered in row order."""
    t0 = time.perf_counter()
    cols = [k for k in ("document", "opening") if k in parquet_schema_names(conversations_path)]
    ddf = read_parquet(conversations_path, columns=cols)
    meta = pd.DataFrame({"text": pd.Series([], dtype=object), "opening": pd.Series([], dtype=object),
                         **{k: pd.Series([], dtype=bool) for k in ("code", "log", "boilerplate", "truncated", "empty")}})
    out = gather_frame(ddf[cols].map_partitions(_clean_partition, max_chars, meta=meta), c=c, label="clean documents")
    openings = out["opening"].tolist() if "opening" in cols else None
    flags = out[["code", "log", "boilerplate", "truncated", "empty"]].reset_index(drop=True).astype(bool)
    return Documents(out["text"].tolist(), flags, openings, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------ impressions

_IMP_COLS = ("user_id", "shown_at", "ad_category", "clicked", "targeting_sources", "arm")


def _compact_partition(df: pd.DataFrame) -> pd.DataFrame:
    """Per impression: the chat flag instead of the list of targeting sources (as `read_impressions`)."""
    out = df.drop(columns=["targeting_sources"], errors="ignore")
    if "targeting_sources" in df:
        lists = pa.array(df["targeting_sources"].tolist(), type=pa.list_(pa.string()), from_pandas=True)
        out = out.assign(chat=chat_flag(lists))
    return out


def _first_appearance(values) -> pd.Index:
    return pd.Index(pd.unique(np.asarray(values, dtype=object)))


def _read_impressions(path: str | Path, c=None) -> pd.DataFrame:
    """`analysis.impressions.read_impressions` with the per-row work on the workers: the same frame
    (ids as categoricals in first-appearance order, `chat` flag), for the leakage stage."""
    cols = [k for k in _IMP_COLS if k in parquet_schema_names(path)]
    ddf = read_parquet(path, columns=cols)
    df = gather_frame(ddf.map_partitions(_compact_partition, meta=_compact_partition(ddf._meta)), c=c, label="read impressions")
    df = df.reset_index(drop=True)
    for k in ("user_id", "ad_category", "arm"):
        if k in df:
            df[k] = pd.Categorical(df[k], categories=_first_appearance(df[k].dropna()))
    order = ["user_id", "shown_at", "ad_category", "clicked", "arm", "chat"]
    return df[[k for k in order if k in df]]


def _codes_partition(df: pd.DataFrame, policy_ns: int, users, known: np.ndarray, included: np.ndarray, cats) -> pd.DataFrame:
    """Per impression, integers only: user code (first-appearance order of the whole log), raw week
    and day since the policy date, click, known region, included region, post period, and the
    category code and chat flag (or -1 / False). Small partitions, fast integer groupbys."""
    t = df["shown_at"]
    t = t.dt.tz_convert("UTC") if getattr(t.dt, "tz", None) is not None else t.dt.tz_localize("UTC")
    day = np.floor_divide(t.to_numpy(dtype="datetime64[ns]").view("int64") - policy_ns, NS_PER_DAY)
    u = _index_in(df["user_id"], users)
    out = pd.DataFrame({"u": u, "day": day, "week": np.floor_divide(day, 7), "n": np.ones(len(df), dtype=np.int64),
                        "clicks": df["clicked"].to_numpy(dtype=bool).astype(np.int64), "known": known[u], "post": day >= 0,
                        "included": included[u]}, index=df.index)
    if "arm" in df:
        a = df["arm"]
        out["arm"] = np.where(a.eq(ARMS[0]).fillna(False).to_numpy(bool), 0, np.where(a.eq(ARMS[1]).fillna(False).to_numpy(bool), 1, -1)).astype(np.int64)
    if cats is not None:
        out["cat"] = _index_in(df["ad_category"], cats)
        out["chat"] = _compact_partition(df[["targeting_sources"]])["chat"].to_numpy(dtype=bool)
    return out


def _index_in(values: pd.Series, lookup) -> np.ndarray:
    """Position of each value in `lookup` (an Arrow array), -1 if absent: Arrow's hash lookup,
    without turning a partition's strings into Python objects."""
    return pc.index_in(pa.array(values, from_pandas=True), value_set=lookup).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _unique_partition(s: pd.Series) -> pd.Series:
    # Arrow's unique keeps the order of first appearance, like pandas' and dictionary encoding
    return pd.Series(pc.unique(pa.array(s, from_pandas=True)).to_pylist(), dtype=object)


def first_appearance(path: str | Path, column: str, c=None) -> pd.Index:
    """The distinct values of a column in order of first appearance in the file(s) (the order
    pandas' / Arrow's dictionary encoding gives): per-partition uniques, then their uniques."""
    col = read_parquet(path, columns=[column])[column]
    (u,) = compute(col.map_partitions(_unique_partition, meta=(column, object)), c=c, label=f"distinct {column}")
    return _first_appearance(pd.Series(u).dropna())


def _aggregate(path: str | Path, users: pd.DataFrame, *, policy_date: str | None = None, excluded_regions=None, c=None, split_out: int | None = None):
    """Stage 04's reduction on Dask: the impression log (Parquet file or folder) is reduced to
    per-user-week and per-user-category-chat counts by Dask groupby on integer codes; only those
    sums, the days with data and the users' first-appearance order come to the driver. Returns the
    same `LiftData` (same user codes, same row order)."""
    import dask


    policy_date = policy_date or DEFAULT_POLICY_DATE
    excluded = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    cols = [k for k in _IMP_COLS if k in parquet_schema_names(path)]
    has_cat = "ad_category" in cols and "targeting_sources" in cols
    # pass 1 (two columns): the pandas engine's codes, users and categories in order of first appearance
    order = first_appearance(path, "user_id", c=c)
    cats = first_appearance(path, "ad_category", c=c) if has_cat else None
    nu = len(order)
    region = user_regions(users, order)
    known = pd.notna(region)
    included = included_users(region, excluded)
    # pass 2: integer columns per partition; the lookups are one graph key each (sent once per worker)
    raw = read_parquet(path, columns=cols)
    order_pa = pa.array(np.asarray(order, dtype=object), type=pa.string())
    cats_pa = pa.array(np.asarray(cats, dtype=object), type=pa.string()) if cats is not None else None
    lookups = [dask.delayed(v, traverse=False) for v in (order_pa, np.append(known, False), np.append(included, False), cats_pa)]
    meta = _codes_partition(raw._meta, 0, order_pa, np.append(known, False), np.append(included, False), cats_pa)
    x = raw.map_partitions(_codes_partition, pd.Timestamp(policy_date, tz="UTC").value, *lookups, meta=meta)
    kept = x[x["known"]]
    so = split_out or max(1, raw.npartitions // 16)
    jobs = {
        "n": x["n"].sum(),
        "n_kept": kept["n"].sum(),
        "days": kept.groupby("day")["n"].sum(),
        "user_week": kept.groupby(["u", "week"])[["n", "clicks"]].sum(split_out=so),
    }
    if "arm" in cols:
        jobs["arm"] = x[x["arm"] >= 0].groupby(["u", "arm"])["n"].sum()
    if has_cat:
        sel = kept[kept["post"] & kept["included"]]
        jobs["cells"] = sel.groupby(["cat", "u", "chat"])[["n", "clicks"]].sum(split_out=so)
    res = dict(zip(jobs, compute(*jobs.values(), c=c, label="aggregate impressions to sufficient statistics")))

    days = np.sort(res["days"].index.to_numpy(np.int64))
    uw = res["user_week"].reset_index()
    user_week = (uw["u"].to_numpy(np.int64), uw["week"].to_numpy(np.int64), uw["n"].to_numpy(np.int64), uw["clicks"].to_numpy(np.int64))
    n_arm = None
    if "arm" in res:
        a = res["arm"].reset_index()
        n_arm = [np.bincount(a["u"].to_numpy(np.int64), weights=(a["arm"].to_numpy() == i) * a["n"].to_numpy(float), minlength=nu) for i in range(len(ARMS))]
    cells = None
    if has_cat:
        cl = res["cells"].reset_index()
        ck = (cl["cat"].to_numpy(np.int64) * nu + cl["u"].to_numpy(np.int64)) * 2 + cl["chat"].to_numpy(bool)
        cells = (ck, cl["n"].to_numpy(np.int64), cl["clicks"].to_numpy(np.int64), np.asarray(cats, dtype=object))
    n = int(res["n"])
    return assemble(np.asarray(order, dtype=object), region, days, user_week, n_arm, cells, policy_date=policy_date,
                    excluded_regions=excluded, n_impressions=n, n_dropped=n - int(res["n_kept"]))


class DaskEngine:
    """The engine protocol (`analysis.engines.Engine`) on a dask.distributed cluster."""

    name = "dask"

    def __init__(self, dask_scheduler: str | None = None, client=None):
        self.dask_scheduler = dask_scheduler
        self._client = client  # a dask.distributed Client to use (else found on first use)

    @property
    def client(self):
        """The cluster's client, found on first use (its dashboard link shown once)."""
        if self._client is None:
            self._client = client(self.dask_scheduler)
        return self._client

    def read_impressions(self, path: str | Path) -> pd.DataFrame:
        return _read_impressions(path, c=self.client)

    def aggregate(self, path: str | Path, users: pd.DataFrame, *, policy_date: str, excluded_regions) -> LiftData:
        return _aggregate(path, users, policy_date=policy_date, excluded_regions=excluded_regions, c=self.client)

    def clean_documents(self, conversations_path: str | Path, max_chars: int) -> Documents:
        return _clean_documents(conversations_path, max_chars, c=self.client)

    def embed_assign(self, embedder: Embedder, opening_weight: float):
        return _embed_assign(self.client, embedder, opening_weight=opening_weight)
