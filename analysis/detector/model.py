"""The sensitive-topic detector: a logistic combiner over lexicon and embedding features with per-category thresholds."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.optimize  # noqa: F401  (threadpoolctl limits only the libraries loaded when it is entered)
from threadpoolctl import threadpool_limits

from analysis.contract.art9 import label_matrix
from analysis.contract.settings import RETIRED_DETECTOR_BACKENDS
from analysis.detector.features import EmbeddingDetector, LexiconDetector, head_columns, reply_columns
from analysis.detector.text import clean_text
from analysis.detector.vote import BLOCKS, NeighbourVote, default_pool_path
from analysis.util.privacy import suppress_small_cells
from analysis.util.storage import write_json
from analysis.util.taxonomy import Art9Spec, load_art9

FEATURES = ("pos", "margin", "share", "strong", "weak")

# ----------------------------------------------------------------------------- the combiner


def default_params_path() -> Path:
    return Path(str(resources.files("analysis") / "data" / "detector_default.json"))


@dataclass
class DetectorParams:
    """Logistic weights over FEATURES (pooled over categories) and one threshold per category."""
    coef: dict[str, float]
    intercept: float
    thresholds: dict[str, float]
    backend: str = "minilm"
    fitted_on: str = ""
    n_train: int | None = None
    notes: dict = field(default_factory=dict)
    # per-category supervised heads (logistic regression on pooled embeddings + the features above),
    # fitted only where labels have enough positives: {category: {"mean", "scale", "coef", "intercept"}}
    heads: dict = field(default_factory=dict)
    # the word n-gram TF-IDF vocabulary the heads' text part uses: {"vocabulary", "idf", "ngram_range"}
    tfidf: dict = field(default_factory=dict)
    # the rule-based fallback of a category too rare for a head: flagged on a strong lexicon hit, its
    # score the labeled positive rate with / without a hit: {category: {"p_hit", "p_miss", "n_hit", "n_miss"}}
    rules: dict = field(default_factory=dict)
    # the heads also read the assistant's first reply (`emb__reply_i` columns: SensitiveDetector.features(replies=...))
    with_reply: bool = False
    # ... and the vector of the user side's head (`emb__head_i`: SensitiveDetector.features(head=True))
    with_head: bool = False
    # ... and the neighbour vote (`emb__vote_<name>`, analysis.detector.vote): {"pool": file name in analysis/data, "names": [...],
    # "blocks": the vectors it compares, default ["head", "mean", "reply"]; the user-side entry's ["head", "mean"]}
    vote: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend, "coef": self.coef, "intercept": self.intercept, "thresholds": self.thresholds,
            "fitted_on": self.fitted_on, "n_train": self.n_train, "features": list(FEATURES), "notes": self.notes,
            "heads": self.heads, "tfidf": self.tfidf, "rules": self.rules, "with_reply": self.with_reply, "with_head": self.with_head,
            "vote": self.vote,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorParams":
        return cls(coef={k: float(v) for k, v in d["coef"].items()}, intercept=float(d["intercept"]),
                   thresholds={k: float(v) for k, v in d["thresholds"].items()}, backend=d.get("backend", "minilm"),
                   fitted_on=d.get("fitted_on", ""), n_train=d.get("n_train"), notes=d.get("notes") or {},
                   heads=d.get("heads") or {}, tfidf=d.get("tfidf") or {}, rules=d.get("rules") or {},
                   with_reply=bool(d.get("with_reply", False)), with_head=bool(d.get("with_head", False)), vote=d.get("vote") or {})

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    @classmethod
    def unfitted(cls, backend: str, cats: Sequence[str]) -> "DetectorParams":
        """Placeholder params for a backend without stored defaults, to compute features and fit from (a fit
        replaces every part)."""
        return cls(coef={f: 0.0 for f in FEATURES}, intercept=0.0, thresholds={c: 0.5 for c in cats}, backend=backend,
                   fitted_on="unfitted")

    @classmethod
    def load(cls, path: str | Path | None = None, backend: str | None = None) -> "DetectorParams":
        """Stored params; the default file holds one set per embedding backend."""
        raw = json.loads(Path(path or default_params_path()).read_text())
        if "coef" not in raw:  # {backend: params}
            if backend not in raw:
                hint = RETIRED_DETECTOR_BACKENDS.get(backend, "fit on labels")
                raise KeyError(f"no default detector params for backend {backend!r} in {path or default_params_path()} (have {sorted(raw)}); {hint}")
            raw = raw[backend]
        return cls.from_dict(raw)


def has_replies(replies: Sequence[str | None] | None) -> bool:
    """Whether a corpus has any assistant reply with text (None: no reply column)."""
    return replies is not None and any(isinstance(r, str) and r.strip() for r in replies)


def _design(feats: pd.DataFrame, cats: Sequence[str]) -> np.ndarray:
    """(n_texts, n_categories, n_features) in FEATURES order; counts enter as log1p."""
    x = np.stack([np.stack([feats[f"{c}__{f}"].to_numpy(dtype=float) for f in FEATURES], axis=1) for c in cats], axis=1)
    x[:, :, 3:] = np.log1p(x[:, :, 3:])
    return x

@dataclass
class Detection:
    """Scores (0-1) and flags per category for each conversation."""
    conversation_id: pd.Series
    scores: pd.DataFrame
    flags: pd.DataFrame
    features: pd.DataFrame
    params: DetectorParams

    def to_frame(self) -> pd.DataFrame:
        out = pd.DataFrame({"conversation_id": self.conversation_id.to_numpy()})
        for c in self.scores:
            out[f"score_{c}"] = self.scores[c].to_numpy()
        for c in self.flags:
            out[f"flag_{c}"] = self.flags[c].to_numpy()
        out["any_sensitive"] = self.flags.any(axis=1).to_numpy()
        cats, f = list(self.flags.columns), self.flags.to_numpy(dtype=bool)
        out["art9"] = [[c for c, on in zip(cats, row) if on] for row in f.tolist()]
        return out

    def prevalence(self, min_cell: int | None = None) -> pd.DataFrame:
        """Flagged conversations and share per category; with `min_cell`, counts below it (and
        their shares, which would reveal them) are suppressed for publication."""
        n = len(self.flags)
        rows = [{"category": c, "conversations": int(self.flags[c].sum()), "n": n, "share": float(self.flags[c].mean()) if n else np.nan} for c in self.flags]
        rows.append({"category": "any", "conversations": int(self.flags.any(axis=1).sum()), "n": n,
                     "share": float(self.flags.any(axis=1).mean()) if n else np.nan})
        out = pd.DataFrame(rows)
        if min_cell:
            out = suppress_small_cells(out, ["conversations"], k=min_cell)
            out["share"] = out["share"].astype(object).where(out["conversations"] != f"<{min_cell}", None)
        return out

    def summary(self) -> pd.DataFrame:
        return self.prevalence()

    def to_markdown(self) -> str:
        p = self.prevalence()
        return "; ".join(f"{r.category} {r.share:.1%}" for r in p.itertuples()) + f" (n={len(self.flags)})"


@dataclass(frozen=True)
class FitOptions:
    """How `fit` and `cross_fit` fit: pooled model, per-category heads and thresholds."""
    min_positives: int = 5  # fewer labeled positives: the category takes the threshold pooled over categories
    C: float = 1.0  # inverse regularization of the pooled logistic model
    supervised: bool = True  # fit per-category heads (pooled segment embeddings + features) where the support allows
    # the refit on a run's labels (stage 02); the shipped real-chat defaults were fitted with
    # `REAL_CHAT_FITTING` below (20 positives, C 0.005, no TF-IDF: docs/detector.md), which on a simulated
    # world with 6,000 labels fell under its recall bar (religion 0.85), so refits keep these
    min_head_positives: int = 40  # fewer positives (or negatives): the category keeps the lexicon rule (`rules`)
    head_C: float = 2.0
    text_model: bool = True  # a word n-gram TF-IDF model averaged into each head
    beta: float = 1.0  # thresholds maximize F-beta (> 1 favours recall)
    min_precision: float = 0.8  # ... among cut-offs whose out-of-fold precision reaches this, where any does
    min_recall: float = 0.0  # ... and that keep this share of the positives (else plain max F-beta)
    lexicon_rule: bool = True  # a category without a head: the lexicon rule (else the pooled model's threshold)
    seed: int = 0  # the heads' out-of-fold splits


# what the shipped defaults were fitted with on the gold train split (data/labels/fit_defaults.py): the strong
# L2 penalty won 5-fold CV there against 0.01-1, the TF-IDF part lowered CV F1 on real chats; the precision
# floor counts only where it keeps a quarter of the positives: without that, ethnicity's floor was met by one
# flag at the top of 2,157 out-of-fold scores and the shipped cut (0.95) flagged nothing on test (nested
# train CV: macro-F1(4) +0.045 [+0.010, +0.116], bench/detector_finetune.py)
REAL_CHAT_FITTING = FitOptions(min_head_positives=20, head_C=0.005, text_model=False, min_recall=0.25)
# the refit presets stage 02 offers (`detector_fitting`; names in analysis.contract.settings.DETECTOR_FITTINGS)
FITTINGS = {"simulated": FitOptions(), "real_chat": REAL_CHAT_FITTING}


class SensitiveDetector:
    """Lexicon + embedding evidence combined by a pooled logistic model; per-category thresholds.

    `params=None` loads the shipped defaults for the backend (fitted on hand-labeled ShareGPT);
    `fit(texts, labels)` refits weights and thresholds on labeled conversations.
    """

    def __init__(self, *, backend: str = "minilm", params: DetectorParams | str | Path | None = None,
                 spec: Art9Spec | None = None, cache_dir: str | Path | None = None, max_segments: int = 24,
                 fitting: FitOptions | None = None):
        self.fitting = fitting or FitOptions()
        self.spec = spec or load_art9()
        self.cats = list(self.spec.categories)
        self.backend = backend
        self.lexicon = LexiconDetector(self.spec)
        self.embedding = EmbeddingDetector(self.spec, backend=backend, cache_dir=cache_dir, max_segments=max_segments)
        self._params_file = None
        self._pool: tuple[tuple, NeighbourVote] | None = None  # the neighbour vote's pool, once loaded
        if params is None or isinstance(params, (str, Path)):
            self._params_file = Path(params) if params is not None else default_params_path()
            params = DetectorParams.load(params, backend)
        self.params = params

    def user_side_params(self) -> DetectorParams | None:
        """For params that read the assistant's first reply: the `<backend>_user_side` entry of the file
        they came from (the same method fitted on the same rows without the reply), which scores a corpus
        without replies better than zeros in the reply's place; None where there is none (params not
        read from a file, or a file of one parameter set, as stage 02 saves them)."""
        if not self.params.with_reply or self._params_file is None:
            return None
        raw = json.loads(self._params_file.read_text())
        entry = raw.get(f"{self.backend}_user_side") if "coef" not in raw else None
        return None if entry is None else DetectorParams.from_dict(entry)

    def for_corpus(self, replies: Sequence[str | None] | None) -> tuple["SensitiveDetector", str | None]:
        """The detector to score a corpus whose first replies are `replies` (None: no such column), and a
        note for the run. Params fitted `with_reply` on a corpus without any reply: a detector on the
        user-side entry of their file (`user_side_params`) where it has one, else this one with zeros in
        the reply's place (much less accurate: docs/detector.md), said in the note. Otherwise this
        detector and no note."""
        if not self.params.with_reply or has_replies(replies):
            return self, None
        alt = self.user_side_params()
        where = f"{self._params_file}" if self._params_file is not None else "params given in memory"
        if alt is None:
            return self, (f"the detector ({where}) reads the assistant's first reply, but these conversations have none (no "
                          f"`first_reply` or all empty) and its params have no `{self.backend}_user_side` entry: zeros stand in for "
                          "the reply, less accurately than measured (add the user-side fit to the file: fit_defaults.py --user-side-only)")
        det = SensitiveDetector(backend=self.backend, params=alt, spec=self.spec, cache_dir=self.embedding.cache_dir,
                                max_segments=self.embedding.max_segments, fitting=self.fitting)
        det._params_file = self._params_file
        return det, (f"these conversations have no assistant reply (no `first_reply` or all empty): the detector's user-side "
                     f"parameters (`{self.backend}_user_side` of {where}: the same fit without the reply) score them")

    def features(self, texts: Sequence[str], replies: Sequence[str | None] | None = None, *, head: bool | None = None,
                 vote: bool | None = None, ids: Sequence | None = None) -> pd.DataFrame:
        """Per text: prototype-similarity and lexicon features and the pooled segment embeddings; with
        `head` (default: as the params were fitted), the vector of the text's head (`emb__head_i`); with
        `replies` (the assistant's first reply per text, None/empty where there is none), also the
        reply's embedding (`emb__reply_i`, zeros without a reply) for heads fitted `with_reply`; with
        `vote` (default: as the params were fitted; needs the head, and the replies where its blocks include
        them), the neighbour vote of the params' pool (`emb__vote_<name>`; `ids`: conversation ids, whose chats' pool rows do not vote)."""
        texts = ["" if t is None else str(t) for t in texts]
        vote = bool(self.params.vote) if vote is None else vote
        parts = [self.embedding.features(texts), self.lexicon.counts(texts)]
        if self.params.with_head if head is None else head:
            parts.append(head_columns(texts, self.backend, self.embedding.cache_dir))
        if replies is not None:
            if len(replies) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(replies)} replies")
            parts.append(reply_columns(replies, self.backend, self.embedding.cache_dir))
        feats = pd.concat(parts, axis=1)
        if vote:
            if not self.params.vote:
                raise ValueError("features(vote=True): these detector params have no neighbour-vote pool")
            if ids is not None and len(ids) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(ids)} conversation ids")
            feats = pd.concat([feats, self.vote_pool().columns(feats, ids)], axis=1)
        return feats

    def vote_pool(self) -> NeighbourVote:
        """The labeled conversations the params' neighbour vote reads (a file in analysis/data, loaded once),
        on the params' vote blocks (`NeighbourVote.restrict`: one pool file serves both entries)."""
        v = self.params.vote
        name, blocks = v["pool"], tuple(v.get("blocks", BLOCKS))
        if self._pool is None or self._pool[0] != (name, blocks):
            pool = NeighbourVote.load(default_pool_path(name)).restrict(blocks)
            # the heads were fitted on the vote these params describe: a pool file that votes otherwise is the wrong file
            fitted = {"names": list(v.get("names", pool.names)), "k": v.get("k", pool.k), "temperature": v.get("temperature", pool.temperature),
                      "rows": v.get("rows", len(pool.chats))}
            found = {"names": list(pool.names), "k": pool.k, "temperature": pool.temperature, "rows": len(pool.chats)}
            if fitted != found:
                raise ValueError(f"neighbour-vote pool {default_pool_path(name)}: {found} differs from what the detector params were "
                                 f"fitted with, {fitted} (refit with data/labels/fit_defaults.py --write)")
            self._pool = ((name, blocks), pool)
        return self._pool[1]

    def _score(self, feats: pd.DataFrame, params: DetectorParams | None = None, texts: Sequence[str] | None = None) -> pd.DataFrame:
        p = params or self.params
        x = _design(feats, self.cats)
        w = np.array([p.coef[f] for f in FEATURES])
        out = pd.DataFrame(1 / (1 + np.exp(-(x @ w + p.intercept))), columns=self.cats)
        if p.heads:
            H = _head_matrix(feats, self.cats)
            width = len(next(iter(p.heads.values()))["mean"])
            if H.shape[1] != width:
                raise ValueError(f"features give {H.shape[1]} head columns, the detector's heads read {width} (with_head={p.with_head}, "
                                 f"with_reply={p.with_reply}, vote={bool(p.vote)}): compute features(texts, replies=..., head=..., vote=...) "
                                 "as the params were fitted")
            T = _tfidf(p.tfidf).transform([clean_text(t) for t in texts]) if p.tfidf and texts is not None else None
            if p.tfidf and texts is None:
                raise ValueError("these detector params have a text (TF-IDF) part: pass the texts")
            z = {}
            for c, h in p.heads.items():
                out[c] = _head_prob(h, H, T, z)
        for c, r in p.rules.items():
            out[c] = np.where(feats[f"{c}__strong"].to_numpy() > 0, r["p_hit"], r["p_miss"])
        return out

    def detect(self, texts: Sequence[str], conversation_id: Sequence | None = None, *, features: pd.DataFrame | None = None,
               replies: Sequence[str | None] | None = None) -> Detection:
        """Scores and flags; params fitted `with_reply` read `replies`; without any, the detector
        `for_corpus` picks scores them (the user-side parameters, else zeros in the replies' place)."""
        if features is None and (det := self.for_corpus(replies)[0]) is not self:
            return det.detect(texts, conversation_id)
        if features is None:
            feats = self.features(texts, (replies if replies is not None else [None] * len(texts)) if self.params.with_reply else None,
                                  head=self.params.with_head, ids=None if conversation_id is None else list(conversation_id))
        else:
            feats = features
        scores = self._score(feats, texts=texts)
        flags = pd.DataFrame({c: scores[c].to_numpy() >= self.params.thresholds[c] for c in self.cats})
        ids = pd.Series(conversation_id if conversation_id is not None else np.arange(len(feats)))
        return Detection(ids.reset_index(drop=True), scores, flags, feats, self.params)

    def predict_proba(self, texts: Sequence[str], *, features: pd.DataFrame | None = None) -> pd.DataFrame:
        """Scores in [0, 1] per category (columns) for each text: what `detect` thresholds."""
        return self.detect(texts, features=features).scores

    def save(self, path: str | Path) -> Path:
        """The fitted parameters as JSON (`load` restores a detector that scores identically)."""
        return self.params.save(path)

    @classmethod
    def load(cls, path: str | Path, *, backend: str | None = None, **kw) -> "SensitiveDetector":
        params = DetectorParams.load(path, backend)
        return cls(backend=backend or params.backend, params=params, **kw)

    def fit(self, texts: Sequence[str] | None, labels, *, features: pd.DataFrame | None = None, source: str = "") -> DetectorParams:
        """Fit the pooled logistic weights and per-category thresholds (max F1) on labeled data.

        A category with fewer than `min_positives` labeled positives gets the threshold pooled over
        categories. With `supervised` and at least `min_head_positives` positives (and negatives),
        a category also gets its own logistic head on the pooled segment embeddings plus the
        prototype and lexicon features; its threshold is chosen on 5-fold out-of-fold scores, so
        it is not tuned on scores the head was fitted to. Thresholds maximize F-beta (`beta` > 1
        favours recall: a missed sensitive chat is the costlier error for the audit). The knobs are
        the constructor's `fitting` (`FitOptions`).
        """
        o = self.fitting
        min_positives, C, supervised, min_head_positives, head_C, beta, seed = (
            o.min_positives, o.C, o.supervised, o.min_head_positives, o.head_C, o.beta, o.seed)
        feats = self.features(texts) if features is None else features
        y = label_matrix(labels, self.cats)
        with _one_thread():
            pooled = self._fit_pooled(feats, y, C=C, min_positives=min_positives, beta=beta, source=source)
            H = clean = fitted = None
            if supervised:
                H = _head_matrix(feats, self.cats)
                clean = None if texts is None or not o.text_model else [clean_text(t) for t in texts]
                fitted = self._fit_heads(H, y, clean, head_C=head_C, min_head_positives=min_head_positives)
            # no shared out-of-fold scores here: every head's threshold comes from its nested 5-fold search
            params = self._with_heads(pooled, fitted, y, np.full(y.shape, np.nan), H, clean, _strong_hits(feats, self.cats),
                                      head_C=head_C, beta=beta, seed=seed)
        params.with_reply, params.with_head = bool(params.heads) and _reads("reply", feats), bool(params.heads) and _reads("head", feats)
        self.params = params
        return params

    def cross_fit(self, texts: Sequence[str] | None, labels, folds: Sequence[int], *, features: pd.DataFrame | None = None,
                  source: str = "", workers: int | None = None) -> "CrossFit":
        """Cross-fitting over `folds` (a fold number per labeled text): each text is scored and flagged
        by a detector fitted as `fit` does on the other folds, then the detector is fitted on all labels
        (it becomes `self.params`).

        The heads' thresholds come from out-of-fold scores the fits share instead of a nested 5-fold
        search per fit: the fold-k detector's from models fitted without folds k and j scoring fold j
        (one model per pair of folds serves two fold detectors), the all-labels detector's from the
        cross-fitted scores themselves. No threshold is chosen on scores of texts its model was fitted
        to, nor on the fold it is judged on; K folds cost K(K-1)/2 + K + 1 head fits per category
        instead of 6(K + 1). A category whose pair or fold models lack a head (too few positives
        there) falls back to the nested 5-fold search. The fits are independent and run on
        `workers` threads (default: the usable cores, at most 4); results do not depend on it.
        """
        o = self.fitting
        min_positives, C, supervised, min_head_positives, head_C, beta, seed = (
            o.min_positives, o.C, o.supervised, o.min_head_positives, o.head_C, o.beta, o.seed)
        feats = (self.features(texts) if features is None else features).reset_index(drop=True)
        y = label_matrix(labels, self.cats)
        folds = np.asarray(folds)
        ks = np.unique(folds)
        if len(folds) != len(y) or len(feats) != len(y):
            raise ValueError(f"cross_fit: {len(y)} labels, {len(folds)} fold numbers and {len(feats)} feature rows must match")
        if len(ks) < 2:
            raise ValueError(f"cross_fit needs at least 2 folds, got {len(ks)}")
        raw = None if texts is None else ["" if t is None else str(t) for t in texts]
        clean = None if raw is None or not o.text_model else np.array([clean_text(t) for t in raw], dtype=object)
        H = _head_matrix(feats, self.cats) if supervised else None
        hit = _strong_hits(feats, self.cats)
        n, m = y.shape
        # training rows of every model: without a pair of folds, without one fold, all
        pairs = list(combinations(ks.tolist(), 2))
        train = {("pair", a, b): ~np.isin(folds, (a, b)) for a, b in pairs}
        train.update({("fold", k): folds != k for k in ks.tolist()})
        train[("all",)] = np.ones(n, dtype=bool)
        detectors = [key for key in train if key[0] != "pair"]

        def heads_on(key):
            r = train[key]
            return self._fit_heads(H[r], y[r], None if clean is None else clean[r], head_C=head_C, min_head_positives=min_head_positives)

        def pooled_on(key):
            r = train[key]
            return self._fit_pooled(feats[r], y[r], C=C, min_positives=min_positives, beta=beta, source=source)

        workers = workers or min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        with _one_thread(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            heads_f = {key: pool.submit(heads_on, key) for key in (train if supervised else [])}
            pooled_f = {key: pool.submit(pooled_on, key) for key in detectors}
            heads = {key: f.result() for key, f in heads_f.items()}
            pooled = {key: f.result() for key, f in pooled_f.items()}

            def tfidf(key, rows):
                vec = heads[key][1]
                return None if vec is None else vec.transform(list(clean[rows]))

            # head scores of fold j by the model fitted without folds k and j
            inner = {}
            for a, b in pairs:
                for k, j in ((a, b), (b, a)):
                    te = folds == j
                    inner[(k, j)] = _head_probs(heads[("pair", a, b)][0], H[te], tfidf(("pair", a, b), te), self.cats)
            oof_s, oof_f = np.zeros((n, m)), np.zeros((n, m), dtype=bool)
            oof_raw = np.full((n, m), np.nan)  # the fold heads' uncalibrated probabilities: what Platt scaling is fitted to
            had_head, fold_params = [], {}
            for k in ks.tolist():
                tr, te = train[("fold", k)], folds == k
                sel = np.full((n, m), np.nan)
                for j in ks[ks != k].tolist():
                    sel[folds == j] = inner[(k, j)]
                p = self._with_heads(pooled[("fold", k)], heads.get(("fold", k)), y[tr], sel[tr], H[tr] if supervised else None,
                                     None if clean is None else clean[tr], hit[tr], head_C=head_C, beta=beta, seed=seed)
                if p.heads:
                    oof_raw[te] = _head_probs(p.heads, H[te], tfidf(("fold", k), te), self.cats, calibrated=False)
                s = self._score(feats[te].reset_index(drop=True), p, None if raw is None else [raw[i] for i in np.flatnonzero(te)])
                oof_s[te] = s.to_numpy()
                oof_f[te] = s.to_numpy() >= np.array([p.thresholds[c] for c in self.cats])
                had_head.append(set(p.heads))
                fold_params[int(k)] = p
            # the all-labels detector: thresholds on the cross-fitted scores where every fold model had that head
            usable = np.full((n, m), np.nan)
            for j, c in enumerate(self.cats):
                if all(c in h for h in had_head):
                    usable[:, j] = oof_raw[:, j]
            params = self._with_heads(pooled[("all",)], heads.get(("all",)), y, usable, H, clean, hit, head_C=head_C, beta=beta, seed=seed)
        params.notes["cross_fit"] = {"folds": int(len(ks)), "fold_sizes": {str(k): int((folds == k).sum()) for k in ks}}
        params.with_reply, params.with_head = bool(params.heads) and _reads("reply", feats), bool(params.heads) and _reads("head", feats)
        self.params = params
        cols = list(self.cats)
        return CrossFit(pd.DataFrame(oof_s, columns=cols), pd.DataFrame(oof_f, columns=cols), params, folds, fold_params)

    def _fit_pooled(self, feats: pd.DataFrame, y: np.ndarray, *, C: float, min_positives: int, beta: float,
                    source: str) -> tuple[DetectorParams, dict]:
        """The pooled logistic model over FEATURES and its per-category thresholds (in-sample: 5 weights)."""
        from sklearn.linear_model import LogisticRegression

        x = _design(feats, self.cats)
        lr = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
        lr.fit(x.reshape(-1, x.shape[2]), y.reshape(-1))
        params = DetectorParams(
            coef={f: float(v) for f, v in zip(FEATURES, lr.coef_[0])}, intercept=float(lr.intercept_[0]),
            thresholds=dict(self.params.thresholds), backend=self.backend, fitted_on=source, n_train=int(len(y)),
        )
        scores = self._score(feats, params)
        # one threshold for all categories pooled: the fallback for a category with few positives
        pooled = choose_threshold(scores.to_numpy().reshape(-1), y.reshape(-1))
        chosen = {}
        for j, c in enumerate(self.cats):
            if y[:, j].sum() >= min_positives:
                params.thresholds[c] = choose_threshold(scores[c].to_numpy(), y[:, j], beta=beta)
                chosen[c] = "fitted"
            else:
                params.thresholds[c] = pooled
                chosen[c] = f"pooled over categories (fewer than {min_positives} positives)"
        return params, chosen

    def _fit_heads(self, H: np.ndarray, y: np.ndarray, clean: Sequence[str] | None, *, head_C: float,
                   min_head_positives: int) -> tuple[dict, object]:
        """Heads (embedding + TF-IDF) on these rows for every category with the support; no thresholds."""
        vec = T = None
        if clean is not None:
            vec = _tfidf_vectorizer()
            T = vec.fit_transform(list(clean))
        std = _standardize(H)
        heads = {}
        for j, c in enumerate(self.cats):
            if _head_support(y[:, j], min_head_positives):
                heads[c] = _fit_head_model(H, y[:, j], C=head_C, std=std)
                if T is not None:
                    heads[c].update(_fit_text_model(T, y[:, j]))
        return heads, vec

    def _with_heads(self, pooled: tuple[DetectorParams, dict], fitted: tuple[dict, object] | None, y: np.ndarray, oof: np.ndarray,
                    H: np.ndarray | None, clean, hit: np.ndarray, *, head_C: float, beta: float, seed: int) -> DetectorParams:
        """A pooled fit completed with its heads, calibrated (Platt scaling) and thresholded on the given
        out-of-fold head probabilities (NaN where none: that category falls back to the nested 5-fold
        search). A supervised fit gives each category without a head the lexicon rule."""
        params, chosen = pooled
        if fitted is not None:
            heads, vec = fitted
            T = None
            for j, c in enumerate(self.cats):
                if c not in heads:
                    continue
                s = oof[:, j]
                if np.isnan(s).any():
                    s = _oof_head(H, y[:, j], C=head_C, seed=seed)
                    if vec is not None:  # a word n-gram model beside the embedding model; their probabilities are averaged
                        T = vec.transform(list(clean)) if T is None else T
                        s = (s + _oof_text(T, y[:, j], seed=seed)) / 2
                    chosen[c] = "supervised head (threshold on nested 5-fold out-of-fold scores)"
                else:
                    chosen[c] = "supervised head (threshold on cross-fitted out-of-fold scores)"
                heads[c]["platt"] = _fit_platt(s, y[:, j])
                params.thresholds[c] = choose_threshold(_platt(heads[c]["platt"], s), y[:, j], beta=beta,
                                                        min_precision=self.fitting.min_precision,
                                                        min_recall=self.fitting.min_recall)
            for j, c in enumerate(self.cats):
                if c not in heads and self.fitting.lexicon_rule:
                    params.rules[c] = _fit_rule(hit[:, j], y[:, j])
                    r = params.rules[c]
                    params.thresholds[c] = float((r["p_hit"] + r["p_miss"]) / 2) if r["p_hit"] > r["p_miss"] else 1.0
                    chosen[c] = f"lexicon rule (fewer than {self.fitting.min_head_positives} positives for a head)"
            params.heads = heads
            if vec is not None:
                params.tfidf = _tfidf_spec(vec)
        params.notes = {"thresholds": chosen, "positives": {c: int(y[:, j].sum()) for j, c in enumerate(self.cats)}}
        return params


@dataclass
class CrossFit:
    """Out-of-fold scores and flags per labeled text (input order), the all-labels parameters, and the
    fold-k detector (fitted without fold k, thresholds included) per fold number."""
    scores: pd.DataFrame
    flags: pd.DataFrame
    params: DetectorParams
    folds: np.ndarray
    fold_params: dict[int, DetectorParams]

    def predict(self, det: SensitiveDetector, features: pd.DataFrame, folds: Sequence[int],
                texts: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Cross-prediction (Zrnic & Candes 2023): scores and flags of each row by the detector fitted
        without its fold `folds[i]`, as the labeled texts of that fold were scored, so labeled and
        unlabeled rows of a fold share one model and one set of thresholds. A fold number no labeled text
        fell in gets the all-labels detector (fitted without that fold, too). `det` computes the scores
        (its categories); `texts` are needed when the params have a TF-IDF part."""
        feats = features.reset_index(drop=True)
        folds = np.asarray(folds)
        if len(folds) != len(feats) or (texts is not None and len(texts) != len(feats)):
            raise ValueError(f"CrossFit.predict: {len(feats)} feature rows, {len(folds)} fold numbers"
                             + ("" if texts is None else f" and {len(texts)} texts") + " must match")
        cats = list(det.cats)
        scores, flags = np.zeros((len(feats), len(cats))), np.zeros((len(feats), len(cats)), dtype=bool)
        for k in np.unique(folds).tolist():
            p = self.fold_params.get(int(k), self.params)
            rows = np.flatnonzero(folds == k)
            s = det._score(feats.iloc[rows].reset_index(drop=True), p, None if texts is None else ["" if texts[i] is None else str(texts[i]) for i in rows])
            scores[rows] = s[cats].to_numpy()
            flags[rows] = scores[rows] >= np.array([p.thresholds[c] for c in cats])
        return pd.DataFrame(scores, columns=cats), pd.DataFrame(flags, columns=cats)


def _one_thread():
    """BLAS and OpenMP at one thread: these fits are many small problems, where 2 threads cost more in
    hand-offs than they gain (one `fit` on 4,800 labels: 57 s with 2 threads on a busy 2-core
    machine, 7 s with 1)."""
    import sklearn.linear_model  # noqa: F401

    return threadpool_limits(1)


def _head_support(y: np.ndarray, min_positives: int) -> bool:
    return bool(y.sum() >= min_positives and (~y).sum() >= min_positives)


def _tfidf_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=30000)


def _tfidf_spec(vec) -> dict:
    return {"vocabulary": {k: int(v) for k, v in vec.vocabulary_.items()}, "idf": vec.idf_.round(6).tolist(), "ngram_range": [1, 2]}


def _head_prob(h: dict, H: np.ndarray, T=None, _z: dict | None = None, *, calibrated: bool = True) -> np.ndarray:
    """A head's probability: the embedding model's, averaged with the TF-IDF model's when it has one,
    then Platt-scaled where the head has a calibration (`calibrated=False`: before it).
    `_z`: a dict that keeps the standardized H between heads with the same mean and scale."""
    mean, scale = np.array(h["mean"]), np.array(h["scale"])
    key = (mean.tobytes(), scale.tobytes())
    Z = None if _z is None else _z.get(key)
    if Z is None:
        Z = (H - mean) / scale
        if _z is not None:
            _z.clear()
            _z[key] = Z
    z = Z @ np.array(h["coef"]) + h["intercept"]
    prob = 1 / (1 + np.exp(-z))
    if T is not None and "tfidf_coef" in h:
        zt = T @ np.array(h["tfidf_coef"]) + h["tfidf_intercept"]
        prob = (prob + 1 / (1 + np.exp(-zt))) / 2
    if calibrated and "platt" in h:
        prob = _platt(h["platt"], prob)
    return prob


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _fit_platt(p: np.ndarray, y: np.ndarray) -> list[float]:
    """Platt scaling [a, b] (calibrated = sigmoid(a logit(p) + b)) fitted on out-of-fold probabilities:
    the class-balanced heads' raw probabilities overstate the rare class; these are P(category | text)
    for conversations drawn like the labeled ones (see docs/detector.md on enriched samples)."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1e4, max_iter=1000).fit(_logit(p)[:, None], np.asarray(y, dtype=bool))
    return [float(m.coef_[0, 0]), float(m.intercept_[0])]


def _platt(ab: Sequence[float], p: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(ab[0] * _logit(p) + ab[1])))


def _strong_hits(feats: pd.DataFrame, cats: Sequence[str]) -> np.ndarray:
    return np.column_stack([feats[f"{c}__strong"].to_numpy() > 0 for c in cats]) if len(cats) else np.zeros((len(feats), 0), bool)


def _fit_rule(hit: np.ndarray, y: np.ndarray) -> dict:
    """The lexicon rule's scores: positive rates with and without a strong hit (add-one smoothed)."""
    hit, y = np.asarray(hit, dtype=bool), np.asarray(y, dtype=bool)
    n_hit, n_miss = int(hit.sum()), int((~hit).sum())
    return {"p_hit": float((y[hit].sum() + 1) / (n_hit + 2)), "p_miss": float((y[~hit].sum() + 1) / (n_miss + 2)),
            "n_hit": n_hit, "n_miss": n_miss}


def _head_probs(heads: dict, H: np.ndarray, T, cats: Sequence[str], *, calibrated: bool = True) -> np.ndarray:
    """(rows, categories) head probabilities; NaN for a category without a head."""
    out, z = np.full((len(H), len(cats)), np.nan), {}
    for j, c in enumerate(cats):
        if c in heads:
            out[:, j] = _head_prob(heads[c], H, T, z, calibrated=calibrated)
    return out


def _reads(block: str, feats: pd.DataFrame) -> bool:
    """Whether the features hold the `emb__<block>_i` columns (block: reply, head)."""
    return any(c.startswith(f"emb__{block}_") for c in feats.columns)


def _head_matrix(feats: pd.DataFrame, cats: Sequence[str]) -> np.ndarray:
    emb = [c for c in feats.columns if c.startswith("emb__")]
    x = _design(feats, cats).reshape(len(feats), -1)
    return np.hstack([feats[emb].to_numpy(dtype=np.float64), x])


def _standardize(H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, standardized H); constant columns keep scale 1."""
    mean, scale = H.mean(axis=0), H.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    return mean, scale, (H - mean) / scale


def _fit_head_model(H: np.ndarray, y: np.ndarray, *, C: float, std: tuple | None = None) -> dict:
    """Standardize (or take `std` = `_standardize(H)`, shared by the categories), fit an L2 logistic
    regression (class-balanced)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale, Z = std if std is not None else _standardize(H)
    m = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(Z, y)
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": m.coef_[0].tolist(), "intercept": float(m.intercept_[0])}


def _oof_head(H: np.ndarray, y: np.ndarray, *, C: float, seed: int) -> np.ndarray:
    """5-fold out-of-fold probabilities of `_fit_head_model`'s model (standardized on all rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    Z = _standardize(H)[2]
    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(Z, y):
        m = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(Z[tr], y[tr])
        oof[te] = m.predict_proba(Z[te])[:, 1]
    return oof


def _tfidf(spec: dict):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=tuple(spec.get("ngram_range", (1, 2))), sublinear_tf=True, vocabulary=spec["vocabulary"])
    vec.idf_ = np.asarray(spec["idf"], dtype=np.float64)
    return vec


def _fit_text_model(T, y: np.ndarray, *, C: float = 10.0) -> dict:
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(T, y)
    return {"tfidf_coef": m.coef_[0].round(6).tolist(), "tfidf_intercept": float(m.intercept_[0])}


def _oof_text(T, y: np.ndarray, *, seed: int, C: float = 10.0) -> np.ndarray:
    """5-fold out-of-fold probabilities of `_fit_text_model`'s model."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        oof[te] = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(T[tr], y[tr]).predict_proba(T[te])[:, 1]
    return oof


def choose_threshold(score: np.ndarray, y: np.ndarray, *, beta: float = 1.0, min_precision: float = 0.0,
                     min_recall: float = 0.0) -> float:
    """The threshold maximizing F-beta; ties go to the midpoint of the widest run of best cut-offs.
    With `min_precision`, only cut-offs reaching that precision compete, where any with a true
    positive does (else all do); with `min_recall`, a cut-off must also keep that share of the
    positives to count as reaching the floor (so one lucky flag at the top does not).

    Placing the cut midway between the scores of neighbouring conversations (not on a score)
    keeps it from hugging the tuning sample.
    """
    s = np.asarray(score, dtype=float)
    y = np.asarray(y, dtype=bool)
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1e-9], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-9]]) if len(u) else np.array([0.5])
    # counts of `s >= t` for every cut at once (sorted scores + binary search), not one pass per cut
    tp = len(s[y]) - np.searchsorted(np.sort(s[y]), cuts, side="left")
    fp = len(s[~y]) - np.searchsorted(np.sort(s[~y]), cuts, side="left")
    fn = int(y.sum()) - tp
    denom = (1 + beta**2) * tp + beta**2 * fn + fp
    f = np.where(denom > 0, (1 + beta**2) * tp / np.where(denom > 0, denom, 1), 0.0)
    ok = (tp > 0) & (tp >= min_precision * np.maximum(tp + fp, 1)) & (tp >= min_recall * y.sum())
    if min_precision > 0 and ok.any():
        f = np.where(ok, f, -1.0)
    best = f.max()
    idx = np.flatnonzero(f >= best - 1e-12)
    # the widest contiguous run of optimal cut-offs; take its middle
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    run = max(runs, key=len)
    best_cut = float(np.median(cuts[run]))
    return float(np.clip(best_cut, 1e-6, 1 - 1e-6))
