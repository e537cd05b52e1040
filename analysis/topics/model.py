"""A fitted topic model: representations, centroids and the kNN assignment rule; saved and reloaded offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.contract.settings import TopicSettings
from analysis.topics.documents import build_documents, document_embeddings
from analysis.util.embeddings import Embedder, bertopic_backend, get_embedder
from analysis.util.privacy import scrub_pii

# ---------------------------------------------------------------------------- the model

_META = "chat_ad_audit_topics.json"
_INDEX = "assignment_index.safetensors"


def knn_vote(query: np.ndarray, ref: np.ndarray, ref_topic: np.ndarray, k: int = 5, *, chunk: int = 4096) -> np.ndarray:
    """Majority topic among each query's k most cosine-similar reference vectors (unit norm);
    a tie goes to the topic of the nearest neighbour among the tied. Exact and deterministic."""
    k = max(1, min(k, len(ref)))
    out = np.empty(len(query), dtype=np.int64)
    for i in range(0, len(query), chunk):
        s = query[i : i + chunk] @ ref.T
        rows = np.arange(len(s))
        nn = np.empty((len(s), k), dtype=np.int64)
        for j in range(k):  # k argmax passes: faster than argpartition for small k, and ordered
            nn[:, j] = s.argmax(axis=1)
            s[rows, nn[:, j]] = -np.inf
        t = ref_topic[nn]  # neighbours' topics, nearest first
        votes = (t[:, :, None] == t[:, None, :]).sum(axis=2)
        out[i : i + chunk] = t[np.arange(len(t)), np.argmax(votes, axis=1)]
    return out


def assign_rest(emb: np.ndarray, spec: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The assignment of documents outside the fit sample, shared by every engine: (majority topic
    of the `knn` nearest clustered sample documents, or -1 below the similarity `threshold`;
    cosine similarity to that topic's centroid; float64 sum of the outliers' embeddings)."""
    if len(emb) == 0:
        return np.zeros(0, dtype=int), np.zeros(0), np.zeros(spec["centroids"].shape[1])
    t = knn_vote(emb, spec["index"], spec["index_topics"], spec["knn"])
    pos = np.searchsorted(spec["topic_ids"], t)
    bs = np.einsum("ij,ij->i", emb, spec["centroids"][pos]).astype(np.float64)
    if spec["threshold"] is not None:
        t = np.where(bs >= spec["threshold"], t, -1)
    return t.astype(int), bs, emb[t == -1].sum(axis=0, dtype=np.float64)


class TopicModel:
    """A fitted topic model: BERTopic's representations + topic centroids + the assignment rule.

    `assign(documents)` cleans and embeds documents and puts each in the topic with the most
    similar centroid, or in -1 when no centroid reaches `outlier_threshold`. Saved with
    safetensors (no pickle, no UMAP/HDBSCAN), it reloads offline and assigns identically.
    """

    def __init__(self, bertopic, embedder: Embedder, settings: TopicSettings, meta: dict | None = None, index=None):
        self.bertopic = bertopic
        self.embedder = embedder
        self.settings = settings
        self.meta = dict(meta or {})
        # (unit embeddings, topics) of the fit sample's clustered documents: the kNN assignment index
        self.index: tuple[np.ndarray, np.ndarray] | None = index

    @property
    def topic_ids(self) -> np.ndarray:
        return np.array(sorted(t for t in self.bertopic.topic_representations_ if t != -1), dtype=int)

    def centroids(self) -> np.ndarray:
        te = np.asarray(self.bertopic.topic_embeddings_, dtype=np.float32)[self.bertopic._outliers :]
        n = np.linalg.norm(te, axis=1, keepdims=True)
        return te / np.where(n > 0, n, 1)

    def assign_embeddings(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(topic, cosine similarity to that topic's centroid) for unit-norm document embeddings.
        With the kNN index this is `assign_rest`, the very computation the fit used for documents
        outside its sample (the same float32 dot products: a document at the threshold lands alike)."""
        if len(emb) == 0:
            return np.zeros(0, dtype=int), np.zeros(0)
        threshold = self.settings.outlier_threshold if self.settings.outlier_strategy != "none" else None
        if self.index is not None:
            spec = {"index": self.index[0], "index_topics": self.index[1], "centroids": self.centroids(),
                    "topic_ids": self.topic_ids, "knn": self.settings.knn, "threshold": threshold}
            topic, s, _ = assign_rest(emb, spec)
            return topic, s
        sim = emb @ self.centroids().T
        pos = np.argmax(sim, axis=1)
        topic = self.topic_ids[pos]
        s = sim[np.arange(len(emb)), pos]
        if threshold is not None:
            topic = np.where(s >= threshold, topic, -1)
        return topic.astype(int), s.astype(np.float64)

    def assign(self, documents: Sequence[str], *, openings: Sequence[str] | None = None, clean: bool = True) -> pd.DataFrame:
        """Topic, label and similarity for raw conversation documents (empty ones go to -1);
        `openings`: their first user turns, blended in as at fit time."""
        if clean:
            d = build_documents(documents, openings=openings, max_chars=self.settings.max_chars)
            docs, opened = d.texts, d.openings
        else:
            docs, opened = [x or "" for x in documents], None if openings is None else [x or "" for x in openings]
        nonempty = np.array([bool(d) for d in docs], dtype=bool)
        topic = np.full(len(docs), -1, dtype=int)
        sim = np.zeros(len(docs))
        if nonempty.any():
            keep = np.flatnonzero(nonempty)
            emb = document_embeddings(self.embedder, [docs[i] for i in keep], None if opened is None else [opened[i] for i in keep],
                                      self.settings.opening_weight)
            topic[nonempty], sim[nonempty] = self.assign_embeddings(emb)
        labels = self.labels()
        return pd.DataFrame({"topic": topic, "topic_label": [labels.get(t, "outliers") for t in topic], "similarity": sim})

    def labels(self) -> dict[int, str]:
        custom = self.bertopic.custom_labels_
        keys = sorted(self.bertopic.topic_representations_)
        if custom:
            return {k: lab for k, lab in zip(keys, custom)}
        return {k: make_label(self.keywords(k)) for k in keys}

    def keywords(self, topic: int, aspect: str = "Main") -> list[str]:
        """Top words of a topic: c-TF-IDF ("Main") or a representation aspect ("KeyBERT", "MMR")."""
        if aspect == "Main":
            reps = self.bertopic.topic_representations_.get(topic, [])
        else:
            reps = self.bertopic.topic_aspects_.get(aspect, {}).get(topic, [])
        return [w for w, _ in reps if w]

    def representations(self) -> pd.DataFrame:
        """One row per topic: label, c-TF-IDF keywords and the fine-tuned representation words.

        The ad-mapping stage embeds these (with `analysis.embeddings.embed`) to match IAB paths.
        """
        labels = self.labels()
        aspect = self.meta.get("aspect")
        rows = []
        for t in sorted(self.bertopic.topic_representations_):
            rows.append(
                {
                    "topic": int(t),
                    "label": labels.get(t),
                    "keywords": [scrub_pii(w) for w in self.keywords(t)],
                    "representation": [scrub_pii(w) for w in (self.keywords(t, aspect) if aspect else self.keywords(t))],
                }
            )
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        """Write the model atomically: a temporary sibling folder renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        logging.getLogger("BERTopic").setLevel(logging.ERROR)  # "no embedding model pointer" is intended
        try:
            # No pointer to the embedding model: BERTopic.load would try to build it from the hub.
            self.bertopic.save(str(tmp), serialization="safetensors", save_ctfidf=True, save_embedding_model=False)
            meta = {**self.meta, "settings": asdict(self.settings), "embedding_model_id": self.embedder.model_id, "embedding_backend": self.embedder.backend}
            (tmp / _META).write_text(json.dumps(meta, indent=2, default=str))
            if self.index is not None:
                from safetensors.numpy import save_file

                save_file({"embeddings": self.index[0].astype(np.float32), "topics": self.index[1].astype(np.int64)}, str(tmp / _INDEX))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, *, cache_dir: str | Path | None = None) -> "TopicModel":
        """Reload a saved model offline, with the embedding backend it was fitted with."""
        from bertopic import BERTopic

        path = Path(path)
        meta = json.loads((path / _META).read_text())
        # a model saved before openings were blended in embedded whole documents only
        saved = {"opening_weight": 0.0, **meta["settings"]}
        if "seed" in saved:  # saved before the setting was named like its config key
            saved["topic_seed"] = saved.pop("seed")
        settings = TopicSettings.from_dict({**saved, **({"cache_dir": str(cache_dir)} if cache_dir else {})})
        embedder = get_embedder(meta["embedding_backend"], settings.cache_dir)
        if embedder.model_id != meta["embedding_model_id"]:
            raise ValueError(
                f"{path}: fitted with embedding model {meta['embedding_model_id']}, but backend "
                f"{meta['embedding_backend']!r} now resolves to {embedder.model_id}: topics would not match"
            )
        logging.getLogger("BERTopic").setLevel(logging.ERROR)
        bt = BERTopic.load(str(path), embedding_model=bertopic_backend(embedder))
        index = None
        if (path / _INDEX).exists():
            from safetensors.numpy import load_file

            t = load_file(str(path / _INDEX))
            index = (t["embeddings"], t["topics"])
        return cls(bt, embedder, settings, meta, index)


def make_label(words: Sequence[str], n: int = 3) -> str:
    """A short readable label from ranked words, skipping words already contained in a chosen one."""
    chosen: list[str] = []
    covered: set[str] = set()
    for w in words:
        parts = {p.rstrip("s") for p in w.split()}  # "cats" adds nothing after "cat"
        # "boots hiking" adds nothing after "hiking boots"; nor "hiking" after "hiking boots"
        if not w or parts <= covered or any(w in c for c in chosen):
            continue
        chosen.append(w)
        covered |= parts
        if len(chosen) == n:
            break
    return scrub_pii(" · ".join(chosen)) if chosen else "(no keywords)"


def load_topic_model(run_dir: str | Path, *, cache_dir: str | Path | None = None) -> TopicModel:
    """The topic model a run saved under `run_dir/model/topics/` (for the ad-mapping stage)."""
    return TopicModel.load(Path(run_dir) / "model" / "topics", cache_dir=cache_dir)
