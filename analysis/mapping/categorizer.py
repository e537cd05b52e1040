"""Conversation -> IAB 3.0 tier-1 (or "none") and tier-2, learned from labeled conversations.

A topic of "writing help" holds cover letters (Careers), essays (Education) and product copy
(Business and Finance): the topic's single node cannot say which ad category each chat feeds.
`ConversationCategorizer` gives every conversation its own tier-1 with a probability:

- **features** (`conversation_features`): the conversation's user side embedded three ways and
  concatenated: the first `HEAD_CHARS` characters with `backend` (MiniLM reads the first ~256
  word pieces of it: what the chat asks), the mean of its segment vectors (`detector.text.segments`
  with `backend`: the whole chat, code and URLs removed; the detector embeds the same segments, so
  the embedding cache serves them), and the same head with the static model (every word, cheap);
  and, for a model fitted `with_reply`, the head of the assistant's first reply with `backend`
  (what the chat turned out to be about: a short "write a blog post about X" is answered by the
  post; zeros where there is no reply);
- **model**: a multinomial logistic regression over the 37 tier-1 ids and `NONE`, fitted on
  labeled conversations plus one prototype per tier-1 (its "use for" line of the gold-set
  guideline, `analysis/data/iab_tier1_guide.yaml`), so a tier-1 without labels is still reachable,
  blended with a similarity-weighted vote of the `knn_k` nearest labeled conversations (on the
  `backend` parts of the features: head, segment mean, reply): the vote keeps small, tight groups of
  labels (law-firm pages, game scripts) that one linear boundary per class blurs; and with a
  vote of the taxonomy's own texts (`prototype_vote`: the tier-1 guide lines and the described IAB
  nodes of `iab_descriptions.yaml`, each for its tier-1, softmax of `proto_temperature` · cosine to
  the conversation's head): alone it is weak (0.24 on the gold train split) but it pulls the
  answer towards what the taxonomy says a tier-1 is for;
- **tier-2**: among the predicted tier-1's children (the tier-1 itself when it has none), zero-shot
  the one whose subtree holds the IAB text most similar to the conversation's head vector; with
  tier-2 labels (`fit(tier2=...)`, `tier2_weight` > 0) blended with a vote of the nearest labeled
  conversations under the same tier-1 (`tier2_proba`). The tier-2 score is the chosen child's cosine.

The shipped model (`analysis/data/categorizer_default.npz`) is fitted on the train split of the
ShareGPT gold set by `data/labels/fit_categorizer.py`; a run with tier-1 labels refits on them
(stage 02, `analysis.mapping.refit.categorize_with_refit`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from analysis.detector.features import HEAD_CHARS, embed_texts, reply_vectors
from analysis.detector.text import segments
from analysis.mapping.labels import id_hash
from analysis.mapping.mapper import node_descriptions, node_texts
from analysis.util.embeddings import STATIC_PCA_DIMS, nearest_neighbours
from analysis.util.taxonomy import load_taxonomy

NONE = "none"
STATIC = "static"


def tier1_guide() -> dict[str, str]:
    """Tier-1 id -> what the category is used for in chats (analysis/data/iab_tier1_guide.yaml)."""
    p = resources.files("analysis") / "data" / "iab_tier1_guide.yaml"
    return {str(k): str(v) for k, v in (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).items()}


def default_model_path() -> Path:
    return Path(str(resources.files("analysis") / "data" / "categorizer_default.npz"))


def segment_means(texts: Sequence[str], backend: str, cache_dir=None) -> np.ndarray:
    """Unit mean of each text's segment vectors (zeros for a text without prose)."""
    segs = [segments(t) for t in texts]
    flat = [s for ss in segs for s in ss]
    owner = np.repeat(np.arange(len(texts)), [len(s) for s in segs])
    V = embed_texts(flat, backend, cache_dir) if flat else np.zeros((0, 1), np.float32)
    M = np.zeros((len(texts), V.shape[1] if len(flat) else 0), np.float32)
    if flat:
        np.add.at(M, owner, V)
    return M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-12)


@dataclass
class Features:
    """The categorizer's input: `X` (one row per conversation) and the head vectors (tier-2 similarity)."""

    X: np.ndarray
    head: np.ndarray
    with_reply: bool = False


def conversation_features(documents: Sequence[str], backend: str = "minilm", cache_dir=None, replies: Sequence[str] | None = None) -> Features:
    """[head with `backend` | segment mean with `backend` | head with the static model], one row per
    document; with `replies` (the assistant's first reply per document), also [reply head with `backend`]."""
    docs = ["" if d is None else str(d) for d in documents]
    head = [d[:HEAD_CHARS] for d in docs]
    hv = embed_texts(head, backend, cache_dir)
    sm = segment_means(docs, backend, cache_dir)
    if sm.shape[1] == 0:
        sm = np.zeros_like(hv)
    st = embed_texts(head, STATIC, cache_dir) if backend != STATIC else hv
    parts = [hv, sm, st]
    if replies is not None:
        if len(replies) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(replies)} replies")
        parts.append(reply_vectors(replies, backend, cache_dir, hv.shape[1]))
    return Features(np.hstack(parts).astype(np.float32), hv, replies is not None)


def prototype_features(backend: str = "minilm", cache_dir=None, with_reply: bool = False) -> tuple[np.ndarray, list[str]]:
    """One feature row per tier-1 from its guide line ("<name>: <use>"), and the tier-1 ids (the
    backend part is repeated for the segment mean, and for the reply: a guide line is one segment)."""
    tax = load_taxonomy()
    names = dict(zip(tax["id"], tax["label"]))
    guide = tier1_guide()
    ids = list(guide)
    texts = [f"{names[i]}: {guide[i]}" for i in ids]
    hv = embed_texts(texts, backend, cache_dir)
    st = embed_texts(texts, STATIC, cache_dir) if backend != STATIC else hv
    return np.hstack([hv, hv, st] + ([hv] if with_reply else [])).astype(np.float32), ids


def vote_prototypes(backend: str = "minilm", cache_dir=None, taxonomy: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and tier-1 ids of the taxonomy texts the prototype vote compares a conversation's
    head with: each tier-1's guide line and each IAB node described in `iab_descriptions.yaml`."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    names = dict(zip(tax["id"], tax["label"]))
    guide = tier1_guide()
    t1 = dict(zip(tax["id"], tax["tier1_id"]))
    nodes = node_texts(tax)
    described = [k for k in node_descriptions() if k in nodes.index]
    texts = [f"{names[i]}: {guide[i]}" for i in guide] + [nodes[k] for k in described]
    return embed_texts(texts, backend, cache_dir).astype(np.float32), np.asarray(list(guide) + [t1[k] for k in described], dtype=str)


def _neighbour_vote(V: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, n_classes: int, k: int, temperature: float) -> np.ndarray:
    """Per unit row of `V`, each class's share of a vote of its `k` nearest `pool` rows (class indices
    `pool_labels`), each weighted exp(`temperature` x cosine)."""
    nn, w = nearest_neighbours(V @ pool.T, k, temperature)
    out = np.zeros((len(V), n_classes))
    np.add.at(out, (np.repeat(np.arange(len(V)), nn.shape[1]), pool_labels[nn].ravel()), w.ravel())
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-300)


def tier2_tree(taxonomy: pd.DataFrame | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(tier-1 id -> its tier-2 children's ids, tier-2 id -> the ids of its subtree: itself and every node below)."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    kids = tax[tax["tier"] == 2].groupby("tier1_id")["id"].apply(list).to_dict()
    path_id = dict(zip(tax["path"], tax["id"]))
    deep = tax[tax["tier"] >= 2]
    subtree: dict[str, list[str]] = {}
    for n, q in zip(deep["id"], deep["path"]):
        subtree.setdefault(path_id[" > ".join(q.split(" > ")[:2])], []).append(n)
    return kids, subtree


def check_tier2(tier1: Sequence[str], tier2: Sequence[str | None], taxonomy: pd.DataFrame | None = None) -> np.ndarray:
    """Tier-2 ids as stored for the vote ("" where there is none); a tier-2 that is not a child of its
    row's tier-1 raises ValueError naming the row."""
    if len(tier2) != len(tier1):
        raise ValueError(f"{len(tier1)} tier-1 labels but {len(tier2)} tier-2 labels")
    kids, _ = tier2_tree(taxonomy)
    out = np.asarray(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in tier2], dtype=object)
    for i, (a, b) in enumerate(zip(tier1, out)):
        if b and b not in kids.get(str(a), []):
            raise ValueError(f"row {i}: tier-2 {b!r} is not a child of tier-1 {a!r}")
    return out.astype(str)


@dataclass
class ConversationCategorizer:
    """Multinomial logistic regression: features -> tier-1 id or NONE (see the module docstring)."""

    backend: str = "minilm"
    C: float = 2.0
    prototype_weight: float = 3.0  # each tier-1 prototype counts as this many labeled conversations
    knn_weight: float = 0.35  # share of the kNN vote in the probabilities (0: logistic regression only)
    knn_k: int = 10
    knn_temperature: float = 20.0  # vote weight exp(temperature * cosine)
    seed: int = 0
    with_reply: bool = False  # features include the assistant's first reply (conversation_features(replies=...))
    proto_weight: float = 0.2  # share of the prototype vote in the probabilities (0: none)
    proto_temperature: float = 40.0
    proto_vectors: np.ndarray | None = None  # unit taxonomy-text vectors (vote_prototypes)
    proto_labels: np.ndarray | None = None
    classes: np.ndarray | None = None
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    knn_vectors: np.ndarray | None = None  # unit [head | segment mean] of the labeled conversations
    knn_labels: np.ndarray | None = None
    tier2_vectors: np.ndarray | None = None  # the tier-2 vote's labeled conversations (as knn_vectors) ...
    tier2_ids: np.ndarray | None = None  # ... and their tier-2 ids
    tier2_rows: np.ndarray | None = None  # where tier2_vectors are rows of knn_vectors (saved as these indices)
    tier2_weight: float = 0.0  # share of the tier-2 kNN vote in the tier-2 probabilities (0: zero-shot alone)
    tier2_k: int = 10
    tier2_temperature: float = 20.0  # tier-2 vote weight exp(temperature * cosine)
    tier2_zs_temperature: float = 40.0  # zero-shot tier-2 probabilities: softmax of this x cosine
    fitted_on: str = ""
    cache_dir: str | None = None
    meta: dict = field(default_factory=dict)

    # ---- fitting
    def fit(self, X: np.ndarray, y: Sequence[str], *, tier2: Sequence[str] | None = None, source: str = "",
            taxonomy: pd.DataFrame | None = None) -> "ConversationCategorizer":
        """Fit on feature rows `X` and their tier-1 ids (or NONE), plus the tier-1 prototypes; `tier2`
        (a tier-2 id per row, "" or None where there is none) feeds the tier-2 vote."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray([str(v) for v in y], dtype=object)
        if len(y) != len(X):
            raise ValueError(f"{len(X)} feature rows but {len(y)} labels")
        t2 = None if tier2 is None else check_tier2(y, tier2, taxonomy)
        P, pid = prototype_features(self.backend, self.cache_dir, self.with_reply)
        if X.shape[1] != P.shape[1]:
            raise ValueError(f"features have {X.shape[1]} columns, {P.shape[1]} expected (backend {self.backend!r}, "
                             f"with_reply={self.with_reply}: embed with the same backend and reply setting)")
        Xa = np.vstack([X, P])
        ya = np.concatenate([y, np.asarray(pid, dtype=object)])
        w = np.concatenate([np.ones(len(y)), np.full(len(pid), self.prototype_weight)])
        m = LogisticRegression(C=self.C, max_iter=3000, random_state=self.seed).fit(Xa, ya, sample_weight=w)
        self.classes, self.coef, self.intercept = m.classes_.astype(str), m.coef_.astype(np.float32), m.intercept_.astype(np.float32)
        # float16-rounded now so that a saved and reloaded model (float16 on disk) predicts the same
        self.knn_vectors = self._knn_part(X).astype(np.float16).astype(np.float32)
        self.knn_labels = y.astype(str)
        self.tier2_rows = None if t2 is None else np.flatnonzero(t2 != "")
        self.tier2_vectors, self.tier2_ids = (None, None) if t2 is None else (self.knn_vectors[self.tier2_rows], t2[self.tier2_rows])
        if self.proto_weight > 0:
            V, lab = vote_prototypes(self.backend, self.cache_dir)
            keep = np.isin(lab, self.classes)
            self.proto_vectors, self.proto_labels = V[keep].astype(np.float16).astype(np.float32), lab[keep]
        self.fitted_on = source or f"{len(y)} labeled conversations"
        return self

    def _knn_part(self, X: np.ndarray) -> np.ndarray:
        """Unit [head | segment mean (| reply)] rows of features laid out [head d | segment mean d |
        static head (| reply d)]: the `backend` parts."""
        n = X.shape[1] - STATIC_PCA_DIMS
        d = n // 3 if self.with_reply else n // 2
        V = np.asarray(X[:, : 2 * d], dtype=np.float32)
        if self.with_reply:
            V = np.hstack([V, np.asarray(X[:, 2 * d + STATIC_PCA_DIMS:], dtype=np.float32)])
        return V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)

    def _knn_proba(self, X: np.ndarray) -> np.ndarray:
        """Similarity-weighted vote of the `knn_k` nearest labeled conversations, over `classes`."""
        col = {c: j for j, c in enumerate(self.classes)}
        return _neighbour_vote(self._knn_part(X), self.knn_vectors, np.array([col[c] for c in self.knn_labels]), len(self.classes),
                               self.knn_k, self.knn_temperature)

    def _proto_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax over the taxonomy prototypes of `proto_temperature` x cosine to the head, summed per class."""
        d = self.proto_vectors.shape[1]
        H = np.asarray(X[:, :d], dtype=np.float32)
        S = (H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-12)) @ self.proto_vectors.T
        w = np.exp(self.proto_temperature * (S - S.max(axis=1, keepdims=True)))
        col = {c: j for j, c in enumerate(self.classes)}
        onehot = np.zeros((len(self.proto_labels), len(self.classes)))
        onehot[np.arange(len(self.proto_labels)), [col[c] for c in self.proto_labels]] = 1.0
        out = w @ onehot
        return out / out.sum(axis=1, keepdims=True)

    def cross_fit(self, X: np.ndarray, y: Sequence[str], folds: np.ndarray) -> pd.DataFrame:
        """Out-of-fold probabilities: each row scored by a model fitted on the other folds (NaN-free,
        columns = the classes of the model fitted on all rows)."""
        y = np.asarray([str(v) for v in y], dtype=object)
        full = self._blank().fit(X, y)
        out = pd.DataFrame(0.0, index=np.arange(len(y)), columns=full.classes)
        for k in np.unique(folds):
            te = folds == k
            m = self._blank().fit(X[~te], y[~te])
            p = m.predict_proba(X[te])
            out.loc[np.flatnonzero(te), p.columns] = p.to_numpy()
        return out

    def with_tier2_vote(self, X: np.ndarray, tier2: Sequence[str], y: Sequence[str], taxonomy: pd.DataFrame | None = None) -> "ConversationCategorizer":
        """A copy whose tier-2 vote reads the labeled rows `X` (tier-1 `y`, tier-2 `tier2`) and nothing
        else: for cross-validating the tier-2 vote without refitting the tier-1 model."""
        m = self._blank()
        t2 = check_tier2(y, tier2, taxonomy)
        m.tier2_vectors, m.tier2_ids = self._knn_part(X[t2 != ""]).astype(np.float16).astype(np.float32), t2[t2 != ""]
        return m

    def take_tier2_vote(self, other: "ConversationCategorizer") -> bool:
        """Use `other`'s tier-2 vote (its labeled conversations and settings), e.g. the shipped model's
        in a model refitted on a run's tier-1 labels; only between models with the same features
        (backend, reply). Returns whether it was taken."""
        if other.tier2_ids is None or other.tier2_weight <= 0 or (other.backend, other.with_reply) != (self.backend, self.with_reply):
            return False
        self.tier2_vectors, self.tier2_ids, self.tier2_rows = other.tier2_vectors, other.tier2_ids, None
        self.tier2_weight, self.tier2_k, self.tier2_temperature, self.tier2_zs_temperature = (
            other.tier2_weight, other.tier2_k, other.tier2_temperature, other.tier2_zs_temperature)
        return True

    def _blank(self) -> "ConversationCategorizer":
        return ConversationCategorizer(self.backend, self.C, self.prototype_weight, self.knn_weight, self.knn_k, self.knn_temperature,
                                       self.seed, self.with_reply, self.proto_weight, self.proto_temperature, tier2_weight=self.tier2_weight,
                                       tier2_k=self.tier2_k, tier2_temperature=self.tier2_temperature,
                                       tier2_zs_temperature=self.tier2_zs_temperature, cache_dir=self.cache_dir)

    # ---- predicting
    def predict_proba(self, X: np.ndarray) -> pd.DataFrame:
        if self.coef is None:
            raise RuntimeError("the categorizer is not fitted: call fit() or load()")
        if X.shape[1] != self.coef.shape[1]:
            raise ValueError(f"features have {X.shape[1]} columns, the model {self.coef.shape[1]} "
                             f"(fitted with backend {self.backend!r}, with_reply={self.with_reply}: embed with the same backend and reply setting)")
        z = X @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        if self.knn_weight > 0 and self.knn_vectors is not None and len(self.knn_vectors):
            p = (1 - self.knn_weight) * p + self.knn_weight * self._knn_proba(X)
        if self.proto_weight > 0 and self.proto_vectors is not None and len(self.proto_vectors):
            p = (1 - self.proto_weight) * p + self.proto_weight * self._proto_proba(X)
        return pd.DataFrame(p, columns=self.classes)

    def categorize(self, feats: Features, proba: pd.DataFrame | None = None, taxonomy: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per row: tier1_id (None for NONE), tier1_label ("none" for NONE), tier1_score (its
        probability), iab_id / path (the tier-2 node, or the tier-1 without children), iab_score (the
        tier-2's cosine, `tier2_proba`)."""
        tax = load_taxonomy() if taxonomy is None else taxonomy
        p = self.predict_proba(feats.X) if proba is None else proba
        best = p.to_numpy().argmax(axis=1)
        t1 = p.columns.to_numpy()[best]
        by_id = tax.set_index("id")
        t2 = self.tier2_proba(feats, t1, tax)
        rows = []
        for i, t in enumerate(t1):
            score = float(p.iat[i, best[i]])
            if t == NONE:
                rows.append((None, NONE, score, None, None, np.nan))
                continue
            ch, cos, prob = t2[i]
            if ch:
                j = int(np.argmax(prob))
                node, ns = ch[j], float(cos[j])
            else:
                node, ns = t, np.nan
            rows.append((t, by_id.at[t, "label"], score, node, by_id.at[node, "path"], ns))
        return pd.DataFrame(rows, columns=["tier1_id", "tier1_label", "tier1_score", "iab_id", "path", "iab_score"])

    def tier2_proba(self, feats: Features, tier1: Sequence[str], taxonomy: pd.DataFrame | None = None) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """Per row, under its tier-1 `tier1[i]`: the tier-1's children, their cosines and probabilities.

        Zero-shot, a child's cosine is that of the node of its subtree (the child and its descendants)
        most similar to the conversation's head: tier-2 texts alone are too terse (code chats went to
        "Robotics" rather than "Computing", whose descendants say what it holds); the zero-shot
        probabilities are a softmax of `tier2_zs_temperature` x cosine. With tier-2 labels and
        `tier2_weight` > 0 they are blended with a vote of the `tier2_k` nearest labeled conversations
        having a tier-2 under the same tier-1 (`tier2_vectors`: the same parts as the tier-1 vote, weight
        exp(`tier2_temperature` x cosine)); a tier-1 without such labels keeps the zero-shot answer.
        No children: ([], [], [])."""
        tax = load_taxonomy() if taxonomy is None else taxonomy
        kids, subtree = tier2_tree(tax)
        t1 = [str(t) for t in tier1]
        need = sorted({n for t in set(t1) for k in kids.get(t, []) for n in subtree[k]})
        nodes = node_texts(tax)
        NV = embed_texts([nodes[k] for k in need], self.backend, self.cache_dir) if need else np.zeros((0, feats.head.shape[1]))
        col = {k: j for j, k in enumerate(need)}
        S = feats.head @ NV.T if need else np.zeros((len(t1), 0))
        vote = self.tier2_weight > 0 and self.tier2_ids is not None and len(self.tier2_ids) > 0
        V = self._knn_part(feats.X) if vote else None
        out: list = [([], np.zeros(0), np.zeros(0))] * len(t1)
        for t in set(t1):
            ch = kids.get(t, [])
            if not ch:
                continue
            rows = np.flatnonzero(np.asarray(t1) == t)
            cos = np.stack([S[rows][:, [col[n] for n in subtree[k]]].max(axis=1) for k in ch], axis=1)
            z = self.tier2_zs_temperature * (cos - cos.max(axis=1, keepdims=True))
            prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            pool = np.flatnonzero(np.isin(self.tier2_ids, ch)) if vote else np.zeros(0, int)
            if len(pool):
                pos = {c: j for j, c in enumerate(ch)}
                q = _neighbour_vote(V[rows], self.tier2_vectors[pool], np.array([pos[c] for c in self.tier2_ids[pool]]), len(ch),
                                    self.tier2_k, self.tier2_temperature)
                prob = (1 - self.tier2_weight) * prob + self.tier2_weight * q
            for r, c, pr in zip(rows, cos, prob):
                out[r] = (list(ch), c, pr)
        return out

    # ---- persistence
    def save(self, path: str | Path) -> Path:
        p = Path(path)
        meta = {"backend": self.backend, "C": self.C, "prototype_weight": self.prototype_weight, "knn_weight": self.knn_weight,
                "knn_k": self.knn_k, "knn_temperature": self.knn_temperature, "seed": self.seed, "with_reply": self.with_reply,
                "proto_weight": self.proto_weight, "proto_temperature": self.proto_temperature, "tier2_weight": self.tier2_weight,
                "tier2_k": self.tier2_k, "tier2_temperature": self.tier2_temperature, "tier2_zs_temperature": self.tier2_zs_temperature,
                "fitted_on": self.fitted_on, **self.meta}
        kv = np.zeros((0, 0), np.float16) if self.knn_vectors is None else self.knn_vectors.astype(np.float16)
        kl = np.zeros(0, dtype=str) if self.knn_labels is None else np.asarray(self.knn_labels, dtype=str)
        pv = np.zeros((0, 0), np.float16) if self.proto_vectors is None else self.proto_vectors.astype(np.float16)
        pl = np.zeros(0, dtype=str) if self.proto_labels is None else np.asarray(self.proto_labels, dtype=str)
        extra = {}
        if self.tier2_ids is not None:  # the vote's rows as indices into knn_vectors where they are theirs (no second copy)
            extra = {"tier2_ids": np.asarray(self.tier2_ids, dtype=str)} | (
                {"tier2_rows": self.tier2_rows} if self.tier2_rows is not None else {"tier2_vectors": self.tier2_vectors.astype(np.float16)})
        np.savez_compressed(p, classes=np.asarray(self.classes, dtype=str), coef=self.coef, intercept=self.intercept,
                            knn_vectors=kv, knn_labels=kl, proto_vectors=pv, proto_labels=pl, meta=np.asarray(json.dumps(meta)), **extra)
        return p if p.suffix == ".npz" else p.with_suffix(p.suffix + ".npz")

    @classmethod
    def load(cls, path: str | Path | None = None, cache_dir=None) -> "ConversationCategorizer":
        p = Path(path) if path else default_model_path()
        if not p.exists():
            raise FileNotFoundError(f"categorizer model {p} does not exist (data/labels/fit_categorizer.py writes the default)")
        z = np.load(p, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        has_knn = "knn_vectors" in z.files and z["knn_vectors"].size > 0
        has_proto = "proto_vectors" in z.files and z["proto_vectors"].size > 0
        m = cls(backend=meta.pop("backend"), C=meta.pop("C"), prototype_weight=meta.pop("prototype_weight"),
                knn_weight=meta.pop("knn_weight", 0.0) if has_knn else 0.0, knn_k=meta.pop("knn_k", 10),
                knn_temperature=meta.pop("knn_temperature", 20.0), seed=meta.pop("seed"), with_reply=bool(meta.pop("with_reply", False)),
                proto_weight=meta.pop("proto_weight", 0.0) if has_proto else 0.0, proto_temperature=meta.pop("proto_temperature", 40.0),
                tier2_weight=meta.pop("tier2_weight", 0.0) if "tier2_ids" in z.files else 0.0, tier2_k=meta.pop("tier2_k", 10),
                tier2_temperature=meta.pop("tier2_temperature", 20.0), tier2_zs_temperature=meta.pop("tier2_zs_temperature", 40.0),
                fitted_on=meta.pop("fitted_on"),
                cache_dir=cache_dir, meta=meta)
        m.classes, m.coef, m.intercept = z["classes"].astype(str), z["coef"], z["intercept"]
        if has_knn:
            m.knn_vectors, m.knn_labels = z["knn_vectors"].astype(np.float32), z["knn_labels"].astype(str)
        if has_proto:
            m.proto_vectors, m.proto_labels = z["proto_vectors"].astype(np.float32), z["proto_labels"].astype(str)
        if "tier2_ids" in z.files:
            m.tier2_ids = z["tier2_ids"].astype(str)
            if "tier2_rows" in z.files:
                m.tier2_rows = z["tier2_rows"]
                m.tier2_vectors = m.knn_vectors[m.tier2_rows]
            else:
                m.tier2_vectors = z["tier2_vectors"].astype(np.float32)
        return m


def topic_mix(categories: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per topic, the distribution of its conversations' tier-1 labels: `category_mix` (the `top`
    largest as "label share%"), `top_tier1_label`, `top_tier1_share`, `none_share`; with a `path`
    column (each conversation's IAB path), also the most frequent tier-2 among the conversations of
    the dominant tier-1 (`top_tier2_label`, `top_tier2_share` of the whole topic)."""
    c = categories.assign(_t=categories["tier1_label"].fillna(NONE))
    if "path" in c:
        c["_t2"] = c["path"].map(lambda p: p.split(" > ")[1] if isinstance(p, str) and " > " in p else None)
    rows = []
    for topic, g in c.groupby(c["topic"].astype(str)):
        sh = g["_t"].value_counts(normalize=True)
        row = {"topic": topic, "category_mix": "; ".join(f"{k} {v:.0%}" for k, v in sh.head(top).items()),
               "top_tier1_label": sh.index[0], "top_tier1_share": round(float(sh.iloc[0]), 4),
               "none_share": round(float(sh.get(NONE, 0.0)), 4), "top_tier2_label": None, "top_tier2_share": np.nan}
        if "_t2" in g:
            t2 = g.loc[g["_t"] == sh.index[0], "_t2"].dropna().value_counts()
            if len(t2):
                row["top_tier2_label"], row["top_tier2_share"] = t2.index[0], round(float(t2.iloc[0]) / len(g), 4)
        rows.append(row)
    return pd.DataFrame(rows, columns=["topic", "category_mix", "top_tier1_label", "top_tier1_share", "none_share",
                                       "top_tier2_label", "top_tier2_share"])


@dataclass
class ConversationCategories:
    """Stage 02's per-conversation categories: `table` (conversation_id, tier1_id, tier1_label,
    tier1_score, iab_id, path, iab_score, source), where the model came from, and the out-of-fold
    rows (conversation ids judged by a model that did not see their label)."""

    table: pd.DataFrame
    model_source: str
    out_of_fold: set = field(default_factory=set)
    notes: list = field(default_factory=list)


def categorize_run(conv: pd.DataFrame, labels: pd.DataFrame | None, *, backend: str = "minilm", model_path: str | None = None,
                   fit: bool | str = "auto", min_labels: int = 200, cv_folds: int = 5, seed: int = 0, cache_dir=None,
                   taxonomy: pd.DataFrame | None = None) -> ConversationCategories:
    """Every conversation's tier-1/tier-2. With at least `min_labels` tier-1 labels (or `fit=True`) the
    categorizer is refitted on them (plus the prototypes; with the assistant's first reply as a
    feature when `conv` has a non-empty `first_reply`): with `cv_folds` > 1 each labeled
    conversation is categorized by a model fitted on the other folds (folds by a seeded hash of the
    user, so a user's conversations never judge each other), the rest by the model fitted on all
    labels. Otherwise the shipped model (or `model_path`) categorizes every conversation."""
    notes: list[str] = []
    replies = conv["first_reply"].tolist() if "first_reply" in conv else None
    has_replies = replies is not None and any(isinstance(r, str) and r.strip() for r in replies)
    lab = None
    if labels is not None and "iab_tier1" in labels:
        lab = labels[labels["iab_tier1"].notna()]
        lab = lab[lab["conversation_id"].isin(conv["conversation_id"])]
    refit = lab is not None and len(lab) > 0 and (fit is True or (fit == "auto" and len(lab) >= min_labels))
    oof_ids: set = set()
    if refit:
        feats = conversation_features(conv["document"].tolist(), backend, cache_dir, replies if has_replies else None)
        pos = pd.Series(np.arange(len(conv)), index=conv["conversation_id"])
        lp = pos[lab["conversation_id"]].to_numpy()
        y = lab["iab_tier1"].astype(str).to_numpy()
        cat = ConversationCategorizer(backend=backend, seed=seed, with_reply=has_replies, cache_dir=cache_dir).fit(
            feats.X[lp], y, source=f"{len(lab)} tier-1 labels of this run")
        proba = cat.predict_proba(feats.X)
        source = f"refitted on this run's {len(lab)} tier-1 labels" + (" (user side and the assistant's first reply)" if has_replies else " (user side)")
        shipped = Path(model_path) if model_path else default_model_path()
        if shipped.exists() and cat.take_tier2_vote(ConversationCategorizer.load(shipped, cache_dir=cache_dir)):
            source += f"; tier-2 voted by the {len(cat.tier2_ids)} tier-2 labels of {shipped.name}"
        if cv_folds and cv_folds > 1:
            users = conv["user_id"].iloc[lp] if "user_id" in conv else lab["conversation_id"]
            folds = (id_hash(users.reset_index(drop=True), seed) * cv_folds).astype(int)
            oof = cat.cross_fit(feats.X[lp], y, folds)
            proba.iloc[lp] = oof.reindex(columns=proba.columns, fill_value=0.0).to_numpy()
            oof_ids = set(lab["conversation_id"])
            source += f"; labeled conversations categorized out of fold ({cv_folds}-fold cross-fitting by user)"
        else:
            notes.append("categorizer refitted on all tier-1 labels without cross-fitting: its accuracy on them is in-sample")
    else:
        cat = ConversationCategorizer.load(model_path, cache_dir=cache_dir)
        if cat.backend != backend:
            notes.append(f"categorizer model fitted with backend {cat.backend!r}: features embedded with it, not {backend!r}")
        if cat.with_reply and not has_replies:
            notes.append("the categorizer reads the assistant's first reply, but these conversations have none (no `first_reply` or all empty): "
                         "it categorizes from the user side alone, less accurately than measured")
        use = (replies if replies is not None else [""] * len(conv)) if cat.with_reply else None
        feats = conversation_features(conv["document"].tolist(), cat.backend, cache_dir, use)
        proba = cat.predict_proba(feats.X)
        source = f"shipped model ({cat.fitted_on})" if not model_path else f"{model_path} ({cat.fitted_on})"
        if lab is not None and len(lab):
            notes.append(f"{len(lab)} tier-1 labels (< {min_labels} or fit_categorizer off): the categorizer was not refitted; "
                         "its accuracy on them is out-of-sample unless they are gold-set train labels")
    table = cat.categorize(feats, proba, taxonomy)
    table.insert(0, "conversation_id", conv["conversation_id"].to_numpy())
    table["source"] = np.where(table["conversation_id"].isin(oof_ids), "out_of_fold", "model")
    return ConversationCategories(table, source, oof_ids, notes)


def apply_overrides(cats: pd.DataFrame, topics: pd.Series, conversations: dict, topic_overrides: dict, *, source: str | None = None,
                    taxonomy: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Analyst overrides at conversation level: a conversation id in `conversations` (id -> IAB id,
    None = no ad category) wins, else its topic's override (`topic_overrides`: topic -> IAB id or
    None, as the topic mapping applied them); `source` says which. Returns the table and the
    conversation overrides applied."""
    tax = (load_taxonomy() if taxonomy is None else taxonomy).set_index("id")
    out = cats.copy()
    applied = []
    topic_of = dict(zip(out["conversation_id"], topics.astype(str)))
    for i, cid in enumerate(out["conversation_id"]):
        hit, iab, src = False, None, ""
        if cid in conversations:
            hit, iab, src = True, conversations[cid], "override_conversation"
        elif topic_of.get(cid) in topic_overrides:
            hit, iab, src = True, topic_overrides[topic_of[cid]], "override_topic"
        if not hit:
            continue
        if iab is None:
            vals = (None, NONE, np.nan, None, None, np.nan)
        else:
            t1 = tax.at[iab, "tier1_id"]
            vals = (t1, tax.at[t1, "label"], np.nan, iab, tax.at[iab, "path"], np.nan)
        out.loc[out.index[i], ["tier1_id", "tier1_label", "tier1_score", "iab_id", "path", "iab_score"]] = list(vals)
        out.loc[out.index[i], "source"] = src
        if src == "override_conversation":
            applied.append({"conversation_id": cid, "to": iab, "file": source})
    return out, applied


# a key phrase that looks like code or an identifier says nothing to a reader ("src", "def", "x_train", "2.0")
_CODE_LIKE = re.compile(r"[_./\\(){}\[\]=<>#@$%^*|~`0-9]|[a-z][A-Z]")
_STEM = re.compile(r"(ies|es|s)$")


def key_phrases(words: Sequence[str], n: int = 3) -> list[str]:
    """Up to `n` distinctive phrases from a topic's ranked words: multi-word terms first (in rank
    order), then single words; code-like tokens and words already covered by a chosen phrase
    (plural or word order aside) are skipped."""
    words = [str(w).strip() for w in words if str(w).strip() and not _CODE_LIKE.search(str(w))]
    chosen: list[str] = []
    covered: set[str] = set()
    for w in [w for w in words if " " in w] + [w for w in words if " " not in w]:
        parts = {_STEM.sub("", p.lower()) for p in w.split()}
        if parts & covered:
            continue
        chosen.append(w)
        covered |= parts
        if len(chosen) == n:
            break
    return chosen


def readable_labels(info: pd.DataFrame, mix: pd.DataFrame, n_phrases: int = 3, min_tier2_share: float = 0.2) -> pd.DataFrame:
    """A topic label a reader recognizes, from aggregates only (the topic's ranked words and its
    conversations' category mix, never a conversation's text): the dominant tier-2 node's name when
    it covers at least `min_tier2_share` of the topic, up to `n_phrases` key phrases
    (`key_phrases` of `representation`, else `keywords`), and the dominant tier-1 with its share:
    "Job Search: cover letter, job description, interview (Careers 62%)"; and the same name without
    the tier-1 tail (`readable_name`: "Job Search: cover letter, job description, interview") for
    readers that show the category elsewhere or not at all (the stakeholder summary)."""
    share = mix.set_index("topic")
    rows = []
    for r in info.itertuples():
        words = getattr(r, "representation", None)
        if words is None or (isinstance(words, float) and np.isnan(words)) or len(words) == 0:
            words = getattr(r, "keywords", None)
        words = [str(w) for w in (list(words) if isinstance(words, (list, tuple, np.ndarray)) else [])]
        phrases = ", ".join(key_phrases(words, n_phrases))
        t = str(r.topic)
        head, cat = "", ""
        if t in share.index:
            m = share.loc[t]
            cat = f" ({m['top_tier1_label']} {m['top_tier1_share']:.0%})"
            t2 = m.get("top_tier2_label")
            if isinstance(t2, str) and m.get("top_tier2_share", 0) >= min_tier2_share:
                head = t2 + (": " if phrases else "")
        text = head + phrases if (head or phrases) else str(getattr(r, "label", t))
        rows.append({"topic": t, "readable_label": text + cat, "readable_name": text})
    return pd.DataFrame(rows, columns=["topic", "readable_label", "readable_name"])
