"""Benchmark: the pipeline's heavy steps at growing sizes, pandas vs dask engine.

    .venv/bin/python bench/pipeline.py [--sizes 10k 100k 1m] [--engines pandas dask] [--workers 2]
    .venv/bin/python bench/pipeline.py --table            # the table of the results file only
    .venv/bin/python bench/pipeline.py --topics-comparison  # runs bench/topics.py (ours vs default BERTopic)

Sizes: 10k / 100k / 1M conversations with 50 impressions each (0.5M / 5M / 50M) and 4
conversations per user. Worlds that large do not fit the simulator's in-memory generation (its
peak is ~1 GiB per million impressions), so a size is simulated in shards of at most 50k
conversations / 2.5M impressions: each shard is a world of the same generative model with its own
seed (`seed + shard`), its ids prefixed by the shard, and is written as one part file of the
partitioned stage-00 tables `conversations/`, `impressions/` (row groups of 500k) and `users/`
under data/cache/bench/pipeline/<size>/. Stage 00 (validation) is not timed: it reads the input
tables with pandas either way.

Each (size, engine) runs in a fresh child process; timed steps, from those Parquet folders:

- topics: clean + embed + UMAP/HDBSCAN on the 10k fit sample + assign the rest + representations
  (`TopicModeler.fit` with the engine's `clean_documents` / `embed_assign`, as stage 01 does), from a cold embedding cache;
  `assign` = clean + embed + kNN assignment (the per-document work), `fit` = UMAP + HDBSCAN +
  outlier reduction (fixed size), `represent` = c-TF-IDF/MMR labels, NPMI (driver, all documents);
- aggregate: impressions -> per-user-week / per-user-category sufficient statistics
  (the engine's `aggregate`);
- lift: every stage-04 estimator on those statistics (`analysis.lift.report.analyse`, 999 permutations);
- leak_read: stage 03's impression reader (the engine's `read_impressions`).

`seconds` per step are wall-clock; `total` includes starting the LocalCluster (dask). Peak memory
is the peak summed RSS of the child and all its descendants (the dask workers), sampled every
0.2 s. The scaling exponent between two sizes is log(t2/t1) / log(n2/n1) (1 = linear).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIR = ROOT / "data" / "cache" / "bench" / "pipeline"
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
IMP_PER_CONV = 50
CONV_PER_USER = 4
SHARD = 50_000  # conversations per simulated shard
STEPS = ("assign", "fit", "represent", "topics", "aggregate", "lift", "leak_read")


def prepare(size: str, seed: int = 20251216) -> Path:
    """Simulate the size's shards once and write the partitioned stage-00 tables (see the docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.ingest.conversations import build_conversations
    from analysis.simulate import simulate

    out = BENCH_DIR / size
    if (out / "DONE").exists():
        return out
    n = SIZES[size]
    for sub in ("conversations", "impressions", "users"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(n / SHARD))
    for i in range(n_shards):
        if (out / "users" / f"part-{i:04d}.parquet").exists():
            continue  # resumable: users are written last
        nc = min(SHARD, n - i * SHARD)
        t0 = time.perf_counter()
        w = simulate({"seed": seed + i, "n_users": nc // CONV_PER_USER, "n_conversations": nc, "n_impressions": nc * IMP_PER_CONV})
        p = f"s{i:03d}_"
        conv = build_conversations(w.messages, w.users)
        conv["conversation_id"] = p + conv["conversation_id"].astype(str)
        conv["user_id"] = p + conv["user_id"].astype(str)
        conv.drop(columns=["document_display"]).to_parquet(out / "conversations" / f"part-{i:04d}.parquet", index=False)
        imp = w.impressions
        imp = imp.assign(user_id=p + imp["user_id"].astype(str), impression_id=p + imp["impression_id"].astype(str))
        pq.write_table(pa.Table.from_pandas(imp, preserve_index=False), out / "impressions" / f"part-{i:04d}.parquet", row_group_size=500_000)
        w.users.assign(user_id=p + w.users["user_id"].astype(str)).to_parquet(out / "users" / f"part-{i:04d}.parquet", index=False)
        print(f"  {size} shard {i + 1}/{n_shards}: {nc:,} conversations, {len(imp):,} impressions in {time.perf_counter() - t0:.0f} s", flush=True)
        del w, conv, imp
    (out / "DONE").write_text("ok")
    return out


class PeakRSS:
    """Peak summed RSS (MiB) of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def child(size: str, engine: str, workers: int) -> dict:
    import pandas as pd

    from analysis.contract.settings import LiftSettings, TopicSettings
    from analysis.engines import dask as eng
    from analysis.engines.dask import DaskEngine
    from analysis.engines.pandas import PandasEngine
    from analysis.lift.report import analyse
    from analysis.stages.topics import META_COLUMNS
    from analysis.topics.modeler import TopicModeler
    from analysis.util.embeddings import STATIC, Embedder, default_cache_dir
    from bench.topics import _warm_numba  # compiling UMAP's kernels is paid outside the clock, as in bench/topics.py

    d = BENCH_DIR / size
    secs: dict[str, float] = {"numba_warmup": _warm_numba()}
    with PeakRSS() as mem, tempfile.TemporaryDirectory() as cold:
        t_all = time.perf_counter()
        c = None
        if engine == "dask":
            t0 = time.perf_counter()
            c = eng.client(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="8GiB", show=False)
            c.wait_for_workers(workers)
            secs["cluster"] = time.perf_counter() - t0
        users = pd.concat([pd.read_parquet(f, columns=["user_id", "region"]) for f in eng.parquet_files(d / "users")], ignore_index=True)
        s = TopicSettings(cache_dir=cold)
        emb = Embedder(STATIC, cache_dir=cold, model_dir=default_cache_dir())
        t0 = time.perf_counter()
        runner = DaskEngine(client=c) if engine == "dask" else PandasEngine()
        files = eng.parquet_files(d / "conversations")
        meta = pd.concat([pd.read_parquet(f, columns=list(META_COLUMNS)) for f in files], ignore_index=True)
        res = TopicModeler(s).fit(meta, embedder=emb, documents=runner.clean_documents(d / "conversations", s.max_chars),
                                  embed_assign=runner.embed_assign(emb, s.opening_weight))
        secs["topics"] = time.perf_counter() - t0
        tm = res.timings
        secs["assign"] = tm["clean"] + tm["embed"] + tm["assign"]
        secs["fit"] = tm["umap_hdbscan_ctfidf"] + tm["reduce_outliers"]
        secs["represent"] = tm["represent"]
        n_topics = int((res.topic_info["topic"] != -1).sum())
        outliers = float((res.assignments["topic"] == -1).mean())
        del res
        t0 = time.perf_counter()
        data = runner.aggregate(d / "impressions", users, policy_date="2025-12-16", excluded_regions=None)
        secs["aggregate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = analyse(data, LiftSettings(lift_permutations=999, seed=1))
        secs["lift"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        imp = runner.read_impressions(d / "impressions")
        n_imp = len(imp)
        del imp
        secs["leak_read"] = time.perf_counter() - t0
        secs["total"] = time.perf_counter() - t_all
        if c is not None:
            c.close()
    return {"size": size, "engine": engine, "workers": workers if engine == "dask" else 1, "conversations": SIZES[size],
            "impressions": n_imp, "user_weeks": len(data.user_week), "topics": n_topics, "outlier_share": round(outliers, 4),
            "did_rel_lift": round(float(rep.did.rel_lift), 5) if rep.did is not None else None,
            "seconds": {k: round(v, 2) for k, v in secs.items()}, "peak_rss_mb": round(mem.peak)}


def table(rows: list[dict]) -> str:
    """Markdown: seconds per step and peak memory per (size, engine), then scaling exponents."""
    cols = ["cluster", "assign", "fit", "represent", "topics", "aggregate", "lift", "leak_read", "total"]
    out = ["| size | engine | conversations | impressions | " + " | ".join(f"{c} (s)" for c in cols) + " | peak RSS (GiB) |",
           "|" + "---|" * (len(cols) + 5)]
    rows = sorted(rows, key=lambda r: (r["engine"], r["conversations"]))
    for r in rows:
        s = r["seconds"]
        out.append(f"| {r['size']} | {r['engine']} | {r['conversations']:,} | {r['impressions']:,} | "
                   + " | ".join(f"{s[c]:.1f}" if c in s else "–" for c in cols) + f" | {r['peak_rss_mb'] / 1024:.2f} |")
    out += ["", "| engine | sizes | exponent: assign | exponent: aggregate | exponent: topics | exponent: total |", "|---|---|---|---|---|---|"]
    for e in dict.fromkeys(r["engine"] for r in rows):
        er = [r for r in rows if r["engine"] == e]
        for a, b in zip(er, er[1:]):
            k = math.log(b["conversations"] / a["conversations"])
            ex = [f"{math.log(b['seconds'][c] / a['seconds'][c]) / k:.2f}" for c in ("assign", "aggregate", "topics", "total")]
            out.append(f"| {e} | {a['size']} → {b['size']} | " + " | ".join(ex) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--engines", nargs="+", default=["pandas", "dask"], choices=["pandas", "dask"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--results", default=str(BENCH_DIR / "results.jsonl"))
    ap.add_argument("--table", action="store_true", help="only print the table of the results file")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--topics-comparison", action="store_true", help="run bench/topics.py on sim10k (ours vs default BERTopic)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], int(a.child[2]))), flush=True)
        return 0
    if a.table:
        print(table([json.loads(x) for x in Path(a.results).read_text().splitlines() if x.strip()]))
        return 0
    if a.topics_comparison:  # the topic-stage comparison lives in bench/topics.py: reuse it
        return subprocess.call([sys.executable, str(ROOT / "bench" / "topics.py"), "--corpora", "sim10k"], cwd=ROOT)
    print(f"cores: {os.cpu_count()}", flush=True)
    rows = []
    for size in a.sizes:
        t0 = time.perf_counter()
        prepare(size)
        print(f"{size}: data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        if a.prepare_only:
            continue
        for engine in a.engines:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--child", size, engine, str(a.workers)], capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode or line is None:
                print(f"{engine} at {size} failed after {time.perf_counter() - t0:.0f} s (exit {r.returncode}):\n{r.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            rows.append(res)
            print(json.dumps(res), flush=True)
            Path(a.results).parent.mkdir(parents=True, exist_ok=True)
            with open(a.results, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
