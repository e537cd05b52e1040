"""Detector features: the Art. 9 lexicon and the embedding similarity to category prototypes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.detector.text import clean_text, segments
from analysis.util.embeddings import embed
from analysis.util.taxonomy import Art9Spec, load_art9

HEAD_CHARS = 2000  # a text's head embedded whole (user side or first reply; MiniLM reads its first ~256 word pieces)

# ------------------------------------------------------------------------------ the lexicon


@dataclass
class LexiconHits:
    """Distinct matched terms per category: strong and weak."""
    strong: dict[str, list[str]]
    weak: dict[str, list[str]]


class LexiconDetector:
    """Word-boundary rules per category; false-alarm phrases are blanked out before matching."""

    def __init__(self, spec: Art9Spec | None = None):
        self.spec = spec or load_art9()
        wrap = lambda rx: re.compile(r"(?<![\w-])(?:" + rx + r")(?![\w-])", re.I)  # noqa: E731
        self._neutral = [wrap(rx) for rx in self.spec.neutralize]
        self._strong = {c: [wrap(rx) for rx in k.strong] for c, k in self.spec.categories.items()}
        self._weak = {c: [wrap(rx) for rx in k.weak] for c, k in self.spec.categories.items()}
        # one alternation per list, same boundaries: it matches somewhere iff one of its patterns does, so
        # a text it misses skips that list's patterns (most texts miss most lists; ~2x faster, same hits)
        def alt(rxs):
            try:
                return wrap("|".join(f"(?:{rx})" for rx in rxs)) if rxs else None
            except re.error:  # a pattern that cannot sit in an alternation (a global flag): no shortcut
                return None

        self._any_neutral = alt(self.spec.neutralize)
        self._any = {c: alt([*k.strong, *k.weak]) for c, k in self.spec.categories.items()}

    def neutralize(self, text: str) -> str:
        # no neutral phrase anywhere: every pattern in turn sees the unchanged text and finds none
        if self._any_neutral is not None and not self._any_neutral.search(text):
            return text
        for rx in self._neutral:
            text = rx.sub(lambda m: " " * len(m.group(0)), text)
        return text

    def hits(self, text: str) -> LexiconHits:
        t = self.neutralize(clean_text(text))
        strong, weak = {}, {}
        for c in self.spec.categories:
            if self._any[c] is not None and not self._any[c].search(t):
                strong[c], weak[c] = [], []
                continue
            strong[c] = sorted({m.group(0).lower() for rx in self._strong[c] for m in rx.finditer(t)})
            weak[c] = sorted({m.group(0).lower() for rx in self._weak[c] for m in rx.finditer(t)} - set(strong[c]))
        return LexiconHits(strong, weak)

    def counts(self, texts: Sequence[str]) -> pd.DataFrame:
        """Columns `<category>__strong`, `<category>__weak`: distinct matched terms per text."""
        rows = []
        for t in texts:
            h = self.hits(t)
            row = {}
            for c in self.spec.categories:
                row[f"{c}__strong"] = len(h.strong[c])
                row[f"{c}__weak"] = len(h.weak[c])
            rows.append(row)
        return pd.DataFrame(rows, columns=[f"{c}__{k}" for c in self.spec.categories for k in ("strong", "weak")])

    def flags(self, texts: Sequence[str]) -> pd.DataFrame:
        """The lexicon alone: a category is flagged on any strong hit."""
        n = self.counts(texts)
        return pd.DataFrame({c: n[f"{c}__strong"] > 0 for c in self.spec.categories})


# --------------------------------------------------------------------------- the embeddings


def embed_texts(texts: Sequence[str], backend: str = "minilm", cache_dir: str | Path | None = None) -> np.ndarray:
    """Unit vectors from the project's embedding stage (analysis.embeddings), same backends as topics."""
    return embed(list(texts), backend, cache_dir=cache_dir)


class EmbeddingDetector:
    """Per category: the best segment's similarity to the category's prototypes, and its margin
    over the closest non-category prototype (negatives and the other categories)."""

    def __init__(self, spec: Art9Spec | None = None, *, backend: str = "minilm", cache_dir: str | Path | None = None,
                 max_segments: int = 24):
        self.spec = spec or load_art9()
        self.backend = backend
        self.cache_dir = cache_dir
        self.max_segments = max_segments

    @cached_property
    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """(unit vectors, class index per vector); class len(categories) = non-sensitive."""
        texts, cls = [], []
        for j, (c, k) in enumerate(self.spec.categories.items()):
            for t in (k.description, *k.exemplars):
                texts.append(t)
                cls.append(j)
        for t in self.spec.negatives:
            texts.append(t)
            cls.append(len(self.spec.categories))
        return embed_texts(texts, self.backend, self.cache_dir), np.array(cls)

    def features(self, texts: Sequence[str]) -> pd.DataFrame:
        """Columns `<category>__pos`, `__margin`, `__share` per text (0 for a text with no prose), and
        the mean- and max-pooled segment embeddings (`emb__mean_i`, `emb__max_i`) for a supervised head."""
        cats = list(self.spec.categories)
        segs = [segments(t, max_segments=self.max_segments) for t in texts]
        flat = [s for ss in segs for s in ss]
        owner = np.repeat(np.arange(len(texts)), [len(ss) for ss in segs])
        out = np.zeros((len(texts), len(cats), 3), dtype=np.float64)
        P, cls = self.prototypes
        pooled = np.zeros((len(texts), 2 * P.shape[1]), dtype=np.float32)
        has_max = np.zeros(len(texts), dtype=bool)
        if flat:
            n_cls = len(cats) + 1
            best = np.full((len(flat), n_cls), -1.0)
            # blocks bound the memory of the vectors (16,384 x 384 float32 = 25 MB) while keeping the
            # embedder's calls (a cache lookup and shard each) few
            for start in range(0, len(flat), 16384):
                V = embed_texts(flat[start:start + 16384], self.backend, self.cache_dir)
                o = owner[start:start + len(V)]
                np.add.at(pooled[:, : P.shape[1]], o, V)
                # max-pooling keeps a single sensitive turn visible; owners are sorted, so reduceat works
                starts = np.flatnonzero(np.r_[True, o[1:] != o[:-1]])
                ks, bm = o[starts], np.maximum.reduceat(V, starts, axis=0)
                mx = pooled[ks, P.shape[1]:]
                pooled[ks, P.shape[1]:] = np.where(has_max[ks, None], np.maximum(mx, bm), bm)
                has_max[ks] = True
                S = V @ P.T
                for j in range(n_cls):
                    best[start:start + len(V), j] = S[:, cls == j].max(axis=1)
            nearest = best.argmax(axis=1)
            for j in range(len(cats)):
                others = np.delete(best, j, axis=1).max(axis=1)
                pos, margin = best[:, j], best[:, j] - others
                out[:, j, 0] = _group_max(pos, owner, len(texts))
                out[:, j, 1] = _group_max(margin, owner, len(texts))
                out[:, j, 2] = np.bincount(owner, weights=(nearest == j).astype(float), minlength=len(texts)) / np.maximum(
                    np.bincount(owner, minlength=len(texts)), 1
                )
            counts = np.bincount(owner, minlength=len(texts))
            pooled[:, : P.shape[1]] /= np.maximum(counts, 1)[:, None]
            empty = counts == 0
            out[empty] = 0.0
            out[empty, :, 1] = -1.0
        else:
            out[:, :, 1] = -1.0
        cols = {}
        for j, c in enumerate(cats):
            cols[f"{c}__pos"] = out[:, j, 0]
            cols[f"{c}__margin"] = out[:, j, 1]
            cols[f"{c}__share"] = out[:, j, 2]
        d = P.shape[1]
        for i in range(d):
            cols[f"emb__mean_{i}"] = pooled[:, i]
        for i in range(d):
            cols[f"emb__max_{i}"] = pooled[:, d + i]
        return pd.DataFrame(cols)


def reply_vectors(replies: Sequence[str | None], backend: str, cache_dir=None, dims: int | None = None) -> np.ndarray:
    """Unit vector of each reply's first `HEAD_CHARS` characters; zeros for a missing or empty reply
    (`dims` columns when no reply has text)."""
    txt = ["" if r is None or (isinstance(r, float) and np.isnan(r)) else str(r)[:HEAD_CHARS] for r in replies]
    has = np.array([bool(t.strip()) for t in txt], dtype=bool)
    V = embed_texts([t for t, h in zip(txt, has) if h], backend, cache_dir) if has.any() else None
    if V is None and dims is None:
        dims = embed_texts(["x"], backend, cache_dir).shape[1]
    out = np.zeros((len(txt), V.shape[1] if V is not None else int(dims)), np.float32)
    if V is not None:
        out[has] = V
    return out


def reply_columns(replies: Sequence[str | None], backend: str, cache_dir=None) -> pd.DataFrame:
    """The reply's vector as the detector's head columns `emb__reply_i`."""
    R = reply_vectors(replies, backend, cache_dir)
    return pd.DataFrame(R, columns=[f"emb__reply_{i}" for i in range(R.shape[1])])


def head_columns(texts: Sequence[str], backend: str, cache_dir=None) -> pd.DataFrame:
    """The vector of each text's first `HEAD_CHARS` characters (what the chat asks; the categorizer's
    head vector, so the cache serves both) as the detector's head columns `emb__head_i`."""
    V = embed_texts([("" if t is None else str(t))[:HEAD_CHARS] for t in texts], backend, cache_dir)
    return pd.DataFrame(V, columns=[f"emb__head_{i}" for i in range(V.shape[1])])


def _group_max(x: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    m = np.full(n, -np.inf)
    np.maximum.at(m, owner, x)
    return np.where(np.isfinite(m), m, 0.0)
