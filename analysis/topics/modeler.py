"""Fit topics: BERTopic (UMAP + HDBSCAN) on a seeded sample, outlier reduction, kNN assignment of the rest."""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from analysis.contract.settings import TopicSettings
from analysis.topics.documents import (
    CHAT_STOP_WORDS,
    TOKEN_PATTERN,
    Documents,
    build_documents,
    document_embeddings,
    embed_totals,
)
from analysis.topics.model import TopicModel, assign_rest, make_label
from analysis.topics.quality import npmi_coherence, quality_table
from analysis.topics.result import TopicsResult
from analysis.util.embeddings import Embedder, bertopic_backend, get_embedder
from analysis.util.privacy import scrub_pii

log = logging.getLogger(__name__)

# UMAP's numba kernels compiled without numba's on-disk cache (umap 0.5): every new process (a papermill kernel, a
# pytest worker) re-compiled them on its first fit, ~20 s of stage 01 on any world. Cached, later processes load the
# compiled code (the same machine code, so the same topics). A name another umap version lacks is skipped.
UMAP_UNCACHED_KERNELS = ("umap.utils:fast_knn_indices", "umap.umap_:smooth_knn_dist", "umap.umap_:compute_membership_strengths",
                         "umap.layouts:_nb_optimize_layout_euclidean_single_epoch", "umap.layouts:_nb_optimize_layout_euclidean_single_epoch_parallel")


@functools.cache
def cache_umap_kernels(names: tuple[str, ...] = UMAP_UNCACHED_KERNELS) -> tuple[str, ...]:
    """Turn on numba's on-disk cache (umap's __pycache__, else numba's user-wide cache dir) for these kernels, once
    per process; returns the ones it covers. Never raises: a kernel missing, not a numba dispatcher or without a
    writable cache location stays uncached."""
    done = []
    for name in names:
        module, _, attr = name.partition(":")
        try:
            getattr(importlib.import_module(module), attr).enable_caching()
        except Exception as e:  # another umap version, or nowhere to write: compile per process as before
            log.debug("UMAP kernel %s left uncached: %s", name, e)
            continue
        done.append(name)
    return tuple(done)


# -------------------------------------------------------------------------------- modeler


class TopicModeler:
    """Fit the topic stage on a conversations table (`fit`), with settings given up front."""

    def __init__(self, settings: TopicSettings | None = None, **kw):
        self.settings = settings or TopicSettings.from_dict(kw)
        if settings is not None and kw:
            self.settings = TopicSettings.from_dict({**asdict(settings), **kw})

    def _bertopic(self, embedder: Embedder, n_fit: int):
        from bertopic import BERTopic
        from bertopic.vectorizers import ClassTfidfTransformer
        from hdbscan import HDBSCAN
        from sklearn.feature_extraction.text import CountVectorizer
        from umap import UMAP

        cache_umap_kernels()
        s = self.settings
        mts, ms = s.cluster_sizes(n_fit)
        umap = UMAP(
            n_neighbors=s.n_neighbors,
            n_components=s.n_components,
            min_dist=0.0,
            metric="cosine",
            random_state=s.topic_seed,  # seeded UMAP runs single-threaded: parallel SGD is its nondeterminism
            n_jobs=1,
            low_memory=True,
            n_epochs=s.umap_epochs,
        )
        hdb = HDBSCAN(min_cluster_size=mts, min_samples=ms, metric="euclidean", cluster_selection_method="eom", prediction_data=False)
        # BERTopic fits this on one concatenated document per topic: min_df here counts topics
        vec = CountVectorizer(stop_words=stop_words(), ngram_range=(1, 2), min_df=min(2, max(1, n_fit // 20)), token_pattern=TOKEN_PATTERN)
        return BERTopic(
            embedding_model=bertopic_backend(embedder),
            umap_model=umap,
            hdbscan_model=hdb,
            vectorizer_model=vec,
            ctfidf_model=ClassTfidfTransformer(reduce_frequent_words=True),
            top_n_words=s.top_n_words,
            min_topic_size=mts,
            calculate_probabilities=False,
            verbose=False,
        )

    def _representation(self):
        s = self.settings
        if s.representation == "keybert":
            from bertopic.representation import KeyBERTInspired

            return {"KeyBERT": KeyBERTInspired(top_n_words=s.top_n_words, nr_repr_docs=5, nr_samples=300, nr_candidate_words=30, random_state=s.topic_seed)}
        if s.representation == "mmr":
            from bertopic.representation import MaximalMarginalRelevance

            return {"MMR": MaximalMarginalRelevance(diversity=0.3, top_n_words=s.top_n_words)}
        return None

    def fit(self, conversations: pd.DataFrame, *, embedder: Embedder | None = None,
            documents: Documents | None = None, embed_assign=None) -> TopicsResult:
        """Fit topics on `conversations` (conversation_id, document, and optionally user_id, region,
        excluded, started_at); `truth` (conversation_id, topic) adds ARI/NMI to the quality table.

        For another engine (`analysis.engine`): `documents` are the already cleaned documents of
        `conversations` (which then need no `document` column), and `embed_assign(texts, spec)`
        embeds and assigns the documents outside the fit sample elsewhere (given their texts and
        openings, or None for openings), returning
        (topic, similarity, sum of the outliers' embeddings, embedding stats) by `assign_rest`.
        Only the fit sample is then embedded here; results equal the in-process ones."""
        s = self.settings
        _silence_bertopic()
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        conv = conversations.reset_index(drop=True)
        if s.max_documents is not None and len(conv) > s.max_documents:
            pick = np.sort(np.random.default_rng(s.topic_seed).choice(len(conv), size=s.max_documents, replace=False))
            conv = conv.iloc[pick].reset_index(drop=True)

        t0 = time.perf_counter()
        if documents is not None and len(documents.texts) != len(conv):
            raise ValueError(f"{len(documents.texts)} documents for {len(conv)} conversations")
        docs = documents if documents is not None else build_documents(
            conv["document"], openings=conv["opening"] if "opening" in conv else None, max_chars=s.max_chars)
        timings["clean"] = documents.seconds if documents is not None else time.perf_counter() - t0
        ok = ~docs.flags["empty"].to_numpy()
        idx = np.flatnonzero(ok)
        texts = [docs.texts[i] for i in idx]
        openings = None if docs.openings is None else [docs.openings[i] for i in idx]
        w = s.opening_weight

        t0 = time.perf_counter()
        embedder = embedder or get_embedder(s.embedding_backend, s.cache_dir)
        timings["load_embedder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_calls = len(embedder.stats.history)
        emb = document_embeddings(embedder, texts, openings, w) if embed_assign is None else None  # else: the fit sample only, below
        embed_stats = embed_totals(embedder, n_calls) if emb is not None else {}
        timings["embed"] = time.perf_counter() - t0

        # ---- fit on a seeded sample
        rng = np.random.default_rng(s.topic_seed)
        n = len(texts)
        fit_pos = np.sort(rng.choice(n, size=min(s.fit_sample, n), replace=False)) if n > s.fit_sample else np.arange(n)
        if len(fit_pos) < 20:
            raise ValueError(f"only {len(fit_pos)} non-empty documents: too few to find topics")
        fit_docs = [texts[i] for i in fit_pos]
        if emb is not None:
            fit_emb = emb[fit_pos]
        else:
            t0 = time.perf_counter()
            n_calls = len(embedder.stats.history)
            fit_emb = document_embeddings(embedder, fit_docs, None if openings is None else [openings[i] for i in fit_pos], w)
            embed_stats = embed_totals(embedder, n_calls)
            timings["embed"] += time.perf_counter() - t0
        bt = self._bertopic(embedder, len(fit_pos))
        t0 = time.perf_counter()
        topics_fit, probs_fit = bt.fit_transform(fit_docs, fit_emb)
        timings["umap_hdbscan_ctfidf"] = time.perf_counter() - t0
        topics_fit = np.asarray(topics_fit, dtype=int)
        if (topics_fit != -1).sum() == 0 or len(set(topics_fit) - {-1}) < 2:
            mts, ms = s.cluster_sizes(len(fit_pos))
            raise ValueError(f"HDBSCAN found fewer than 2 topics in {len(fit_pos)} documents (min_topic_size={mts}): lower min_topic_size")
        probs_fit = np.asarray(probs_fit, dtype=float) if probs_fit is not None else np.zeros(len(fit_pos))
        outlier_before = float((topics_fit == -1).mean())

        # ---- outlier reduction on the sample
        t0 = time.perf_counter()
        reduced = topics_fit.copy()
        if s.outlier_strategy != "none" and (topics_fit == -1).any():
            kw = {"embeddings": fit_emb} if s.outlier_strategy == "embeddings" else {}
            reduced = np.asarray(bt.reduce_outliers(fit_docs, list(topics_fit), strategy=s.outlier_strategy, threshold=s.outlier_threshold, **kw), dtype=int)
        timings["reduce_outliers"] = time.perf_counter() - t0
        outlier_after = float((reduced == -1).mean())

        # ---- centroids of the reduced sample topics; assign every other document to them
        topic_ids = np.array(sorted(set(reduced) - {-1}), dtype=int)
        cent = np.stack([fit_emb[reduced == t].mean(axis=0) for t in topic_ids])
        core = topics_fit != -1
        model = TopicModel(bt, embedder, s, index=(fit_emb[core], topics_fit[core].astype(np.int64)))
        t0 = time.perf_counter()
        final = np.full(n, -1, dtype=int)
        sim = np.zeros(n)
        prob = np.zeros(n)
        how = np.empty(n, dtype=object)
        final[fit_pos] = reduced
        prob[fit_pos] = np.where(topics_fit != -1, probs_fit, 0.0)
        how[fit_pos] = np.where(topics_fit != -1, "cluster", np.where(reduced != -1, "outlier_reduction", "outlier"))
        rest = np.setdiff1d(np.arange(n), fit_pos)
        cn = cent / np.linalg.norm(cent, axis=1, keepdims=True)
        pos_of = {t: i for i, t in enumerate(topic_ids)}
        spec = {"index": fit_emb[core], "index_topics": topics_fit[core].astype(np.int64), "centroids": cn, "topic_ids": topic_ids,
                "knn": s.knn, "threshold": s.outlier_threshold if s.outlier_strategy != "none" else None}
        out_sum = np.zeros(fit_emb.shape[1], dtype=np.float64)
        if len(rest):
            if embed_assign is None:
                t_rest, bs, out_sum = assign_rest(emb[rest], spec)
            else:
                t_rest, bs, out_sum, rest_stats = embed_assign([texts[i] for i in rest], None if openings is None else [openings[i] for i in rest], spec)
                embed_stats = {k: embed_stats.get(k, 0) + rest_stats.get(k, 0) for k in set(embed_stats) | set(rest_stats)}
            final[rest] = t_rest
            how[rest] = np.where(t_rest != -1, "knn", "outlier")
            prob[rest] = np.where(t_rest != -1, bs, 0.0)
            sim[rest] = np.where(t_rest != -1, bs, 0.0)  # the similarity to the assigned centroid
        fit_assigned = np.flatnonzero(final[fit_pos] != -1)
        sim[fit_pos[fit_assigned]] = (fit_emb[fit_assigned] @ cn.T)[np.arange(len(fit_assigned)), [pos_of[t] for t in final[fit_pos[fit_assigned]]]]
        prob[fit_pos[(topics_fit == -1) & (reduced != -1)]] = sim[fit_pos[(topics_fit == -1) & (reduced != -1)]]
        timings["assign"] = time.perf_counter() - t0

        # ---- representations on every document's final topic; centroids are the assignment's
        t0 = time.perf_counter()
        _silence_bertopic()
        vec = bt.vectorizer_model
        users = conv["user_id"].to_numpy(dtype=object)[idx] if "user_id" in conv else None
        n_users = len(set(users)) if users is not None else 0
        # at least min_cell_users users per keyword, capped at a twentieth of them (tiny corpora keep words)
        vec.set_params(min_df=1, vocabulary=keyword_vocabulary(texts, s.min_document_count(n), users, min(s.min_cell_users, max(1, n_users // 20))))
        bt.update_topics(texts, topics=list(final), top_n_words=s.top_n_words, vectorizer_model=vec, ctfidf_model=bt.ctfidf_model, representation_model=self._representation())
        n_out = int((final == -1).sum())
        outl = [((fit_emb[final[fit_pos] == -1].sum(axis=0, dtype=np.float64) + out_sum) / n_out).astype(np.float32)] if n_out else []
        bt.topic_embeddings_ = np.vstack(outl + [cent]).astype(np.float32)
        bt.representative_docs_ = {}  # raw text: never kept in the model
        aspect = {"keybert": "KeyBERT", "mmr": "MMR"}.get(s.representation)
        model.meta["aspect"] = aspect
        labels = {t: make_label(model.keywords(t, aspect) if aspect else model.keywords(t)) for t in topic_ids}
        labels = _dedupe_labels(labels, model)
        labels[-1] = "outliers"
        bt.set_topic_labels({int(t): labels[t] for t in sorted(bt.topic_representations_)})
        timings["represent"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all

        # ---- tables
        cid = conv["conversation_id"].to_numpy()
        topic_all = np.full(len(conv), -1, dtype=int)
        topic_all[idx] = final
        prob_all = np.zeros(len(conv))
        prob_all[idx] = prob
        sim_all = np.zeros(len(conv))
        sim_all[idx] = sim
        how_all = np.full(len(conv), "empty", dtype=object)
        how_all[idx] = how
        assignments = pd.DataFrame(
            {
                "conversation_id": cid,
                "topic": topic_all,
                "topic_label": [labels.get(t, "outliers") for t in topic_all],
                "probability": np.round(prob_all, 6),
                "similarity": np.round(sim_all, 6),
                "assigned_by": how_all,
            }
        )
        ctfidf_words = {int(t): model.keywords(int(t)) for t in topic_ids}
        npmi = npmi_coherence(ctfidf_words, texts, top_n=s.top_n_words)
        sizes = pd.Series(topic_all).value_counts()
        rep_ids = {}
        for t in topic_ids:
            members = np.flatnonzero(final == t)
            top = members[np.argsort(-sim[members], kind="stable")[:3]]
            rep_ids[int(t)] = cid[idx[top]].tolist()
        rows = []
        reps = model.representations().set_index("topic")
        for t in [-1] + topic_ids.tolist():
            if t == -1 and t not in sizes.index:
                continue
            rows.append(
                {
                    "topic": int(t),
                    "label": labels.get(t, "outliers"),
                    "keywords": reps["keywords"].get(t, []) if t != -1 else [],
                    "representation": reps["representation"].get(t, []) if t != -1 else [],
                    "size": int(sizes.get(t, 0)),
                    "share": float(sizes.get(t, 0) / max(len(conv), 1)),
                    "npmi": float(npmi.get(t, np.nan)) if t != -1 else np.nan,
                    "representative_ids": rep_ids.get(t, []),
                }
            )
        topic_info = pd.DataFrame(rows)

        quality = quality_table(
            s, conv, docs, topic_all, final, fit_pos, outlier_before, outlier_after, npmi, ctfidf_words, timings, embed_stats
        )
        keep = [c for c in ("conversation_id", "user_id", "region", "excluded", "started_at") if c in conv]
        model.meta.update({"n_documents": int(n), "n_fit": int(len(fit_pos)), "topics": int(len(topic_ids)), "cluster_sizes": list(s.cluster_sizes(len(fit_pos)))})
        return TopicsResult(assignments, topic_info, quality, model, docs, conv[keep].copy(), timings, s, embed_stats)

def keyword_vocabulary(texts: list[str], min_documents: int, users: Sequence | None = None, min_users: int = 1) -> list[str] | None:
    """Words and bigrams (stop words out) that occur in at least `min_documents` of the documents
    and, given each document's user, in the documents of at least `min_users` users.

    BERTopic's c-TF-IDF vectorizer sees one concatenated document per topic, so its own `min_df`
    counts topics: document frequency has to be counted here. The user floor is for privacy: one
    long chat split into parts is many documents of one user, and its names (a role-play's
    characters, a family's first names) would otherwise reach the document floor and become topic
    labels. None when nothing qualifies."""
    from sklearn.feature_extraction.text import CountVectorizer

    cv = CountVectorizer(stop_words=stop_words(), ngram_range=(1, 2), min_df=min_documents, token_pattern=TOKEN_PATTERN, binary=True)
    try:
        X = cv.fit_transform(texts)
    except ValueError:  # no word reaches min_documents (tiny corpora)
        return None
    vocab = np.array(sorted(cv.vocabulary_, key=cv.vocabulary_.get))
    if users is not None and min_users > 1:
        if len(users) != len(texts):
            raise ValueError(f"{len(texts)} documents but {len(users)} users")
        codes, uniq = pd.factorize(pd.Series(list(users), dtype=object).fillna("__no_user__").astype(str))
        owner = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniq), len(codes)))
        n_users = np.asarray(((owner @ X) > 0).sum(axis=0)).ravel()
        vocab = vocab[n_users >= min_users]
    return sorted(vocab.tolist()) or None


def stop_words() -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return sorted(ENGLISH_STOP_WORDS | CHAT_STOP_WORDS)


class _DropExpected(logging.Filter):
    # update_topics warns whenever topics are given explicitly, which is exactly what this stage
    # does after outlier reduction and assignment; the warning would only confuse report readers
    def filter(self, record: logging.LogRecord) -> bool:
        return "custom list of topic assignments" not in record.getMessage()


def _silence_bertopic() -> None:
    lg = logging.getLogger("BERTopic")
    if not any(isinstance(f, _DropExpected) for f in lg.filters):
        lg.addFilter(_DropExpected())
    for h in lg.handlers:
        if not any(isinstance(f, _DropExpected) for f in h.filters):
            h.addFilter(_DropExpected())

def _dedupe_labels(labels: dict[int, str], model: TopicModel) -> dict[int, str]:
    """Two topics with the same label get their next distinct keyword appended."""
    seen = Counter(labels.values())
    out = dict(labels)
    for t, lab in labels.items():
        if seen[lab] > 1:
            extra = [w for w in model.keywords(t) if w not in lab]
            out[t] = scrub_pii(f"{lab} ({extra[0]})") if extra else f"{lab} ({t})"
    return out
