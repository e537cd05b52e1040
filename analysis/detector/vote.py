"""The detector's neighbour vote: what the labeled conversations most like this one were labeled.

Per conversation, the exp(`temperature` x cosine)-weighted share of its `k` nearest labeled
conversations (cosine of the unit [head | segment mean | first reply] vectors, each block
unit-normalized: the vectors the heads read) that are positive for an Art. 9 category, or (among
the labeled conversations with an IAB tier-1) carry a related tier-1. The shares enter the heads as
features (`emb__vote_<name>`). A conversation never votes for itself: labeled conversations of its
own ShareGPT chat (the id without its `_<part>` suffix) are left out, in fitting (every labeled row's
vote comes from the others) and in scoring (a corpus that holds the labeled conversations).
The blocks are a property of the params (`vote["blocks"]`): the user-side entry, which scores corpora
without replies, votes from unit [head | segment mean] vectors, read off the same pool file (`blocks`:
the stored rows without the reply block's columns, re-normalized).
Train-split study and figures: `bench/detector_neighbour_vote.py`, docs/detector.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.contract.art9 import label_matrix
from analysis.ingest.importers import chat_of as sharegpt_chat
from analysis.util.embeddings import nearest_neighbours

VOTE_ART9 = ("health", "religion", "politics", "ethnicity", "sexual_orientation")
# IAB 3.0 tier-1 ids whose labels sit next to the Art. 9 categories (health vs fitness copy, politics vs law)
VOTE_IAB = {"286": "medical_health", "223": "healthy_living", "453": "religion_spirituality", "386": "politics",
            "v9i3On": "sensitive_topics", "383": "law"}
BLOCKS = ("head", "mean", "reply")


def chat_of(ids: Sequence) -> np.ndarray:
    """ShareGPT chat ids of conversation ids (`ingest.importers.chat_of`), as an array."""
    return sharegpt_chat(pd.Series(list(ids), dtype=object)).to_numpy(dtype=object)


def vote_vectors(feats: pd.DataFrame, blocks: Sequence[str] = BLOCKS) -> np.ndarray:
    """Unit [head | segment mean | reply] rows (or the `blocks` given, in that order) from the detector's
    feature columns, each block unit-normalized first (a missing reply: a zero block)."""
    parts = []
    for b in blocks:
        cols = [c for c in feats.columns if c.startswith(f"emb__{b}_")]
        if not cols:
            raise ValueError(f"the neighbour vote needs the `emb__{b}_i` feature columns (head, segment mean, reply vectors)")
        parts.append(_unit(feats[cols].to_numpy(np.float32)))
    return _unit(np.hstack(parts))


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def default_pool_path(name: str) -> Path:
    return Path(str(resources.files("analysis") / "data" / name))


@dataclass
class NeighbourVote:
    """The labeled conversations a vote reads: vectors (unit [`blocks`] rows, equal-width blocks), vote
    targets (1/0; NaN where a row has no such label, e.g. no tier-1), chat ids; `k` neighbours weighted
    exp(`temperature` x cosine)."""

    vectors: np.ndarray
    targets: np.ndarray
    names: tuple[str, ...]
    chats: np.ndarray
    k: int = 25
    temperature: float = 20.0
    blocks: tuple[str, ...] = BLOCKS

    def __post_init__(self):
        self.blocks = tuple(self.blocks)
        if set(self.blocks) - set(BLOCKS) or len(set(self.blocks)) != len(self.blocks) or not self.blocks:
            raise ValueError(f"vote blocks {list(self.blocks)}: expected distinct names among {list(BLOCKS)}")
        if self.vectors.shape[1] % len(self.blocks):
            raise ValueError(f"vote pool of width {self.vectors.shape[1]} does not split into {len(self.blocks)} equal blocks {list(self.blocks)}")

    def restrict(self, blocks: Sequence[str]) -> "NeighbourVote":
        """The same pool voting on unit [`blocks`] vectors: the stored rows' columns of those blocks,
        re-normalized. Each block was unit-normalized before the whole row, so this is the vector
        `vote_vectors(feats, blocks)` gives, up to the int8 rounding of the stored rows."""
        blocks = tuple(blocks)
        if blocks == self.blocks:
            return self
        missing = [b for b in blocks if b not in self.blocks]
        if missing:
            raise ValueError(f"vote blocks {list(blocks)}: the pool holds {list(self.blocks)} only")
        w = self.vectors.shape[1] // len(self.blocks)
        cols = np.concatenate([np.arange(w) + w * self.blocks.index(b) for b in blocks])
        return NeighbourVote(_unit(self.vectors[:, cols]), self.targets, self.names, self.chats, self.k, self.temperature, blocks)

    @classmethod
    def from_labeled(cls, feats: pd.DataFrame, art9, tier1: Sequence, ids: Sequence, *, k: int = 25,
                     temperature: float = 20.0, blocks: Sequence[str] = BLOCKS) -> "NeighbourVote":
        """From labeled conversations: their features, Art. 9 labels, IAB tier-1 ids (None: not labeled)
        and conversation ids. The vectors are stored as `save` keeps them, so a reloaded vote is identical."""
        y = label_matrix(art9, list(VOTE_ART9))
        t1 = np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in tier1], dtype=object)
        has = np.array([v is not None for v in t1])
        iab = [np.where(has, (t1 == i).astype(float), np.nan) for i in VOTE_IAB]
        T = np.column_stack([y.astype(float), *iab])
        names = tuple(f"art9_{c}" for c in VOTE_ART9) + tuple(f"iab_{n}" for n in VOTE_IAB.values())
        return cls(_dequantize(_quantize(vote_vectors(feats, blocks))), T, names, chat_of(ids), k, temperature, tuple(blocks))

    def votes(self, V: np.ndarray, chats: np.ndarray | None = None) -> np.ndarray:
        """(rows of unit vectors `V`, targets) vote shares; pool rows of the same chat (`chats`) do not vote."""
        out = np.zeros((len(V), self.targets.shape[1]))
        for start in range(0, len(V), 2048):  # blocks bound the similarity matrix (2,048 x pool)
            S = V[start:start + 2048] @ self.vectors.T
            if chats is not None:
                S[self.same_chat(chats[start:start + 2048])] = -np.inf
            out[start:start + len(S)] = vote_shares(S, self.targets, self.k, self.temperature)
        return out

    def same_chat(self, chats: Sequence) -> np.ndarray:
        """(queries, pool rows): True where the pool row belongs to the query's chat."""
        code = {c: i for i, c in enumerate(pd.unique(self.chats))}
        q = np.array([code.get(c, -1) for c in chats])
        return q[:, None] == np.array([code[c] for c in self.chats])[None, :]

    def columns(self, feats: pd.DataFrame, ids: Sequence | None = None) -> pd.DataFrame:
        """The vote shares as the heads' columns `emb__vote_<name>` (ids: leave out their chats' labeled rows)."""
        v = self.votes(vote_vectors(feats, self.blocks), None if ids is None else chat_of(ids))
        return pd.DataFrame(v, columns=[f"emb__vote_{n}" for n in self.names], index=feats.index)

    def save(self, path: str | Path) -> Path:
        np.savez_compressed(path, vectors=_quantize(self.vectors), targets=self.targets.astype(np.float32), names=np.asarray(self.names, dtype=str),
                            chats=np.asarray(self.chats, dtype=str), k=self.k, temperature=self.temperature,
                            blocks=np.asarray(self.blocks, dtype=str))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "NeighbourVote":
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"neighbour-vote pool {p} does not exist (data/labels/fit_defaults.py --write writes it)")
        z = np.load(p, allow_pickle=False)
        blocks = tuple(z["blocks"].astype(str)) if "blocks" in z else BLOCKS  # pools written before the key: all three
        return cls(_dequantize(z["vectors"]), z["targets"].astype(np.float64), tuple(z["names"].astype(str)),
                   z["chats"].astype(str).astype(object), int(z["k"]), float(z["temperature"]), blocks)


def vote_shares(S: np.ndarray, targets: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Per row of `S` (cosines to the pool rows; -inf: does not vote) and target column, the weighted
    share of its `k` nearest pool rows among those with that target (NaN: not in that target's pool,
    e.g. a row without a tier-1) that carry it."""
    out = np.zeros((len(S), targets.shape[1]))
    near = {}
    for j in range(targets.shape[1]):
        ok = ~np.isnan(targets[:, j])
        key = ok.tobytes()
        if key not in near:  # Art. 9 targets: every row; IAB: rows with a tier-1
            near[key] = nearest_neighbours(S[:, ok], k, temperature)
        nn, w = near[key]
        out[:, j] = (w * targets[ok, j][nn]).sum(1) / np.maximum(w.sum(1), 1e-300)
    return out


def _quantize(V: np.ndarray) -> np.ndarray:
    """int8 rows, each scaled to its largest component (half the size of float16; only directions
    matter, and cosines move by < 1e-3)."""
    return np.round(V * (127.0 / np.maximum(np.abs(V).max(axis=1, keepdims=True), 1e-12))).astype(np.int8)


def _dequantize(q: np.ndarray) -> np.ndarray:
    return _unit(q.astype(np.float32))
