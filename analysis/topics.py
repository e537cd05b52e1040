"""Stage 01, topics: what do people talk about with the AI?

BERTopic over one document per conversation (the user side), built to be offline, fast,
reproducible and measured:

- documents are cleaned first: fenced/indented code, pasted logs and stack traces,
  boilerplate turns ("continue", "go on", "thanks") and personal data (emails, phone numbers,
  card numbers, handles: `analysis.privacy.scrub_pii`) are dropped so they do not form topics;
- a conversation is embedded as a blend of its whole user side and its opening turn
  (`opening_weight`): the opening states what the chat is for, while later turns are often
  generic ("can you make it shorter", "what about on a budget") or drift to a side subject.
  On the default simulated world this raises the share of a conversation's 10 nearest
  neighbours that share its true topic from 0.85 to 0.95;
- embeddings come from `analysis.embeddings` (packaged MiniLM, or a static Model2Vec model
  distilled from it), cached on disk by content hash, so sweeps never re-embed a text;
- UMAP + HDBSCAN are fitted on a seeded sample (`fit_sample`); outliers of the sample are
  reassigned with BERTopic's `reduce_outliers`; every other document takes the majority topic
  of its `knn` nearest clustered sample documents (cosine similarity of embeddings), and is an
  outlier if its similarity to that topic's centroid is below `outlier_threshold` (the rule of
  `reduce_outliers(strategy="embeddings")`). Nearest neighbours follow the shape of HDBSCAN's
  clusters, which single centroids do not (on the simulated world: ARI 0.68 vs 0.50 for the
  assigned documents). The saved model keeps this index and applies the same rule after reload;
- determinism: UMAP gets `random_state` (which makes it single-threaded: its parallel SGD is
  the nondeterministic part), pynndescent is seeded through it, HDBSCAN is deterministic, the
  sample is drawn from `seed`, and the static backend encodes in-process; same seed and input
  give identical assignments;
- quality is measured: NPMI coherence, topic diversity, outlier shares, and ARI/NMI against the
  simulator's true topics when `input_dir/truth/conversations.parquet` exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.embeddings import STATIC, Embedder, bertopic_backend, get_embedder
from analysis.privacy import scrub_pii

STAGE = "01_topics"
OUTLIER_STRATEGIES = ("embeddings", "c-tf-idf", "distributions", "none")
REPRESENTATIONS = ("keybert", "mmr", "ctfidf")
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"  # words of 2+ letters: numbers (ids, phones) never become keywords
# Chat filler and contraction stubs ("don't" -> "don") on top of sklearn's English stop words: in
# chats they are frequent in every topic and would otherwise crowd topic labels.
CHAT_STOP_WORDS = frozenset(
    """ok okay lol hmm hm haha yeah yep yes nope sure thanks thank thx ty pls please hi hello hey oh wow btw
    cool great nice awesome really actually maybe just like want need help know tell make does did doing
    think thing things way say says said got get gets getting good best better use using used question
    questions answer write explain give let lets also wait kind sort stuff right wrong work works
    don doesn didn isn wasn aren weren won wouldn couldn shouldn haven hasn ll ve re im ive id youre
    thats whats dont cant wont didnt doesnt isnt com www http https gmail html org""".split()
)


# -------------------------------------------------------------------------- documents

_FENCE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)", re.S)  # an unclosed fence runs to the end
_INLINE_CODE = re.compile(r"`[^`\n]{1,200}`")
_BOILERPLATE = re.compile(
    r"^\W*(?:please\s+)?(?:continue|go on|keep going|carry on|more|next|again|regenerate|go ahead|proceed|"
    r"ok(?:ay)?|ok thx|k|thx|ty|thanks?(?: you)?(?: so much| a lot| very much)?(?: again)?|thank u|cool|great|nice|"
    r"perfect|yes|yep|no|nope|sure|done|got it|right|correct|wow|lol|hi|hello|hey|"
    r"can you make it shorter|make it shorter|shorter|longer|rewrite|rewrite it|try again|"
    r"continue writing|continue please|please continue|go on please)\W*$",
    re.I,
)
_LOG_LINE = re.compile(
    r"^\s*(?:"
    r"\[?\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}"  # timestamped log line
    r"|\[?(?:TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|FATAL|CRITICAL|SEVERE)\]?[:\s]"  # level-prefixed
    r"|Traceback \(most recent call last\)"
    r"|File \"[^\"]+\", line \d+"
    r"|at [\w$.<>/]+\([^)]*\)\s*$"  # Java/JS stack frame
    r"|\w+(?:\.\w+)*(?:Error|Exception|Warning)(?::|\s*$)"  # exception line
    r"|(?:\$|>>>|\.\.\.|PS [A-Z]:\\|C:\\>)\s"  # shell / REPL prompts
    r"|[\w.-]+@[\w.-]+:[~/][^\s]*\$\s"
    r")"
)
_CODE_LINE = re.compile(
    r"^\s*(?:"
    r"(?:def|class)\s+\w+\s*[(:]"
    r"|(?:import\s+[\w.]+(?:\s+as\s+\w+)?|from\s+[\w.]+\s+import\s+[\w*, ]+)\s*$"
    r"|#include\b|#!/"
    r"|(?:public|private|protected|static|final|void|func|fn|package)\s.*[;{)]\s*$"
    r"|(?:const|let|var)\s+\w+\s*=.*"
    r"|(?:SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\s.*\b(?:FROM|INTO|SET|TABLE|WHERE)\b.*"
    r"|<\/?[a-zA-Z][\w-]*(?:\s[^<>]*)?>.*"
    r"|[{}\[\]();]+,?\s*$"
    r"|.*[;{]\s*$"
    r"|.*(?:=>|->|::|==|!=|\+=|&&|\|\|).*[;{})]\s*$"
    r")"
)
_SYMBOLS = set("{}[]()<>=;:/\\_$#*|&^%~`@+")
_PII_PLACEHOLDER = re.compile(r"\[(?:EMAIL|URL|IBAN|CARD|ID|IP|PHONE|HANDLE)\]")


@dataclass
class Documents:
    """Cleaned documents and what cleaning removed from each; `openings`: the cleaned first
    user turns (None when the conversations table has no `opening` column)."""

    texts: list[str]
    flags: pd.DataFrame  # code, log, boilerplate (lines removed), truncated, empty (bools)
    openings: list[str] | None = None

    def summary(self) -> pd.DataFrame:
        f = self.flags
        return pd.DataFrame(
            {"documents": [len(f)], **{f"with_{c}_removed" if c not in ("truncated", "empty") else c: [int(f[c].sum())] for c in f.columns}}
        )


def _symbol_share(line: str) -> float:
    s = line.strip()
    return sum(ch in _SYMBOLS for ch in s) / max(len(s), 1)


def clean_document(text: str | None, *, max_chars: int = 2000) -> tuple[str, dict[str, bool]]:
    """The topical text of one conversation's user side, and which kinds of noise were removed.

    Drops fenced code, inline code, pasted logs/stack traces, code-looking lines (keywords,
    statement endings, symbol-dense lines, indented blocks) and boilerplate turns; keeps at most
    `max_chars` characters (long pastes would otherwise dominate c-TF-IDF counts).
    """
    flags = {"code": False, "log": False, "boilerplate": False, "truncated": False}
    if not isinstance(text, str) or not text.strip():
        return "", {**flags, "empty": True}
    t, n = _FENCE.subn(" ", text)
    flags["code"] |= n > 0
    t, n = _INLINE_CODE.subn(" ", t)
    flags["code"] |= n > 0
    keep: list[str] = []
    in_trace = False
    for line in t.split("\n"):
        s = line.strip()
        if not s:
            in_trace = False
            continue
        if s.startswith("Traceback (most recent call last)"):
            in_trace = True
        if in_trace or _LOG_LINE.match(line):
            flags["log"] = True
            # a traceback continues through its indented frames; its exception line ends it
            if in_trace and not line[:1].isspace() and not s.startswith("Traceback"):
                in_trace = False
            continue
        if _BOILERPLATE.match(s):
            flags["boilerplate"] = True
            continue
        if (line[:4] == "    " or line[:1] == "\t") and _symbol_share(s) > 0.04 or _CODE_LINE.match(line) or (len(s) >= 12 and _symbol_share(s) > 0.2):
            flags["code"] = True
            continue
        keep.append(s)
    # personal data is never a topic, nor a keyword ("email maria" was one); scrubbed after the
    # line filters, which need the timestamps a phone-number pattern would eat
    out = re.sub(r"\s+", " ", _PII_PLACEHOLDER.sub(" ", scrub_pii("\n".join(keep)))).strip()
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0]
        flags["truncated"] = True
    flags["empty"] = not any(ch.isalpha() for ch in out)
    return ("" if flags["empty"] else out), flags


def build_documents(texts: Iterable[str | None], *, openings: Iterable[str | None] | None = None, max_chars: int = 2000) -> Documents:
    """Clean every conversation document and, if given, every opening turn (see `clean_document`)."""
    out, rows = [], []
    for t in texts:
        c, f = clean_document(t, max_chars=max_chars)
        out.append(c)
        rows.append(f)
    flags = pd.DataFrame(rows, columns=["code", "log", "boilerplate", "truncated", "empty"]).astype(bool)
    opened = None if openings is None else [clean_document(t, max_chars=max_chars)[0] for t in openings]
    if opened is not None and len(opened) != len(out):
        raise ValueError(f"{len(opened)} openings for {len(out)} documents")
    return Documents(out, flags, opened)


def document_embeddings(embedder: Embedder, texts: Sequence[str], openings: Sequence[str] | None, weight: float) -> np.ndarray:
    """Unit vectors for documents: `weight` x opening + (1 - weight) x whole document, renormalized.

    A document without an opening (or `weight` 0) keeps its own embedding. Shared by every engine
    and by `TopicModel.assign`, so fitted and reloaded models embed alike."""
    emb = embedder.encode(list(texts))
    if openings is None or weight <= 0 or not len(texts):
        return emb
    has = np.array([bool(o) for o in openings], dtype=bool)
    if not has.any():
        return emb
    mixed = emb.astype(np.float32, copy=True)
    mixed[has] = (1 - weight) * emb[has] + weight * embedder.encode([o for o, h in zip(openings, has) if h])
    return (mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------ quality


def _reference_matrix(words: list[str], documents: Sequence[str]):
    from sklearn.feature_extraction.text import CountVectorizer

    max_n = max((len(w.split()) for w in words), default=1)
    cv = CountVectorizer(vocabulary=sorted(set(words)), ngram_range=(1, max_n), token_pattern=TOKEN_PATTERN, lowercase=True, binary=True)
    return cv.transform(documents).tocsc().astype(np.float64), cv.vocabulary_


def npmi_coherence(topic_words: Mapping[int, Sequence[str]], documents: Sequence[str], *, top_n: int = 10) -> pd.Series:
    """Mean NPMI over pairs of each topic's top words, from document co-occurrence in `documents`.

    NPMI(a, b) = log(p(a,b) / (p(a) p(b))) / -log p(a,b), with p the share of documents holding
    the word(s); a pair that never co-occurs scores -1. Words absent from the reference corpus
    are skipped. Document-level co-occurrence suits short chat documents (gensim's c_npmi uses
    10-word sliding windows instead; it is not installed here).
    """
    topics = {t: [w for w in ws[:top_n] if w] for t, ws in topic_words.items()}
    vocab_words = sorted({w for ws in topics.values() for w in ws})
    if not vocab_words or not len(documents):
        return pd.Series({t: np.nan for t in topics}, dtype=float, name="npmi")
    X, vocab = _reference_matrix(vocab_words, documents)
    n = X.shape[0]
    co = (X.T @ X).toarray() / n
    p = np.diag(co).copy()
    out = {}
    for t, ws in topics.items():
        idx = np.array([vocab[w] for w in ws if p[vocab[w]] > 0], dtype=int)
        if len(idx) < 2:
            out[t] = np.nan
            continue
        pij = co[np.ix_(idx, idx)]
        pi = p[idx]
        iu = np.triu_indices(len(idx), 1)
        pj_ = pij[iu]
        denom = np.outer(pi, pi)[iu]
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log(pj_ / denom)
            val = np.where(pj_ <= 0, -1.0, np.where(pj_ >= 1, 1.0, pmi / -np.log(pj_)))
        out[t] = float(np.mean(val))
    return pd.Series(out, dtype=float, name="npmi")


def topic_diversity(topic_words: Mapping[int, Sequence[str]], *, top_n: int = 10) -> float:
    """Share of unique words among all topics' top-n words (1 = no word shared between topics)."""
    ws = [w for words in topic_words.values() for w in list(words)[:top_n] if w]
    return len(set(ws)) / len(ws) if ws else float("nan")


def agreement(pred: Sequence, truth: Sequence) -> dict[str, float]:
    """ARI and NMI of predicted vs true labels (outliers count as one cluster)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pred, truth = np.asarray(pred), np.asarray(truth).astype(str)
    return {"ari": float(adjusted_rand_score(truth, pred)), "nmi": float(normalized_mutual_info_score(truth, pred))}


# ---------------------------------------------------------------------------- settings


@dataclass
class TopicSettings:
    """Every knob of the topic stage (the notebook's parameters map onto these)."""

    embedding_backend: str = STATIC  # minilm | static | a sentence-transformers name or local folder
    min_topic_size: int | None = None  # HDBSCAN min_cluster_size; None: 0.25% of the fit sample, at least 10
    min_samples: int | None = None  # HDBSCAN min_samples; None: a fifth of min_topic_size (fewer outliers)
    n_neighbors: int = 15
    n_components: int = 5
    umap_epochs: int = 200  # UMAP's own default above 10k points; 500 (its default below) costs ~3x for ~0.01 ARI
    outlier_strategy: str = "embeddings"  # embeddings | c-tf-idf | distributions | none
    outlier_threshold: float = 0.3  # min cosine similarity to a topic centroid to leave the outlier topic
    knn: int = 5  # documents outside the fit sample take the majority topic of this many nearest clustered ones
    opening_weight: float = 0.15  # share of the opening turn in a document's embedding (0: the whole user side only)
    seed: int = 20251216
    fit_sample: int = 10000  # UMAP + HDBSCAN run on at most this many documents; the rest are assigned
    max_documents: int | None = None  # a seeded sample of at most this many conversations (None: all)
    representation: str = "mmr"  # mmr | keybert | ctfidf: the words topic labels are made of
    top_n_words: int = 10
    min_df: int = 2  # a keyword must occur in at least this many documents (drops names, typos, ids)
    max_chars: int = 2000
    cache_dir: str | None = None  # embeddings + static model cache (None: data/cache of the checkout)

    def __post_init__(self):
        if self.outlier_strategy not in OUTLIER_STRATEGIES:
            raise ValueError(f"outlier_strategy must be one of {OUTLIER_STRATEGIES}, got {self.outlier_strategy!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.fit_sample < 50:
            raise ValueError("fit_sample must be at least 50")
        if self.n_components < 2 or self.n_neighbors < 2:
            raise ValueError("n_components and n_neighbors must be at least 2")
        if not -1 <= self.outlier_threshold <= 1:
            raise ValueError("outlier_threshold is a cosine similarity in [-1, 1]")
        if not 0 <= self.opening_weight <= 1:
            raise ValueError(f"opening_weight is a share in [0, 1], got {self.opening_weight}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "TopicSettings":
        d = {k: v for k, v in (d or {}).items() if v is not None or k in ("min_topic_size", "min_samples", "max_documents", "cache_dir")}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown topic setting(s): {sorted(unknown)}")
        return cls(**d)

    def cluster_sizes(self, n_fit: int) -> tuple[int, int]:
        mts = self.min_topic_size or max(10, int(round(0.0025 * n_fit)))
        ms = self.min_samples or max(2, mts // 5)
        return int(mts), int(ms)


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
        """(topic, cosine similarity to that topic's centroid) for unit-norm document embeddings."""
        if len(emb) == 0:
            return np.zeros(0, dtype=int), np.zeros(0)
        sim = emb @ self.centroids().T
        if self.index is not None:
            topic = knn_vote(emb, self.index[0], self.index[1], self.settings.knn)
            pos = np.searchsorted(self.topic_ids, topic)
        else:
            pos = np.argmax(sim, axis=1)
            topic = self.topic_ids[pos]
        s = sim[np.arange(len(emb)), pos]
        if self.settings.outlier_strategy != "none":
            topic = np.where(s >= self.settings.outlier_threshold, topic, -1)
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


# ------------------------------------------------------------------------------- result


@dataclass
class TopicsResult:
    """What the topic stage produced."""

    assignments: pd.DataFrame  # conversation_id, topic, topic_label, probability, similarity, assigned_by
    topic_info: pd.DataFrame  # topic, label, keywords, representation, size, share, npmi, representative_ids
    quality: pd.DataFrame  # tidy: metric, estimate, n, group
    model: TopicModel
    documents: Documents
    conversations: pd.DataFrame  # conversation_id, user_id, region, excluded, started_at (no text)
    timings: dict[str, float]
    settings: TopicSettings
    embed_stats: dict
    artifacts: dict[str, str] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """The headline numbers, one row each."""
        q = self.quality[self.quality["group"].map(lambda g: not ({"step", "removed"} & set(g)) or g.get("step") == "total")]
        return pd.DataFrame(
            {
                "metric": q["metric"].to_numpy(),
                "group": q["group"].map(lambda g: ", ".join(f"{k}={v}" for k, v in g.items())).to_numpy(),
                # counts as "1,600", rates to 3 decimals: long digit runs read like phone numbers to the report scan
                "estimate": [_fmt(v) for v in q["estimate"]],
                "n": pd.array([None if pd.isna(v) else int(v) for v in q["n"]], dtype="Int64"),
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return self.assignments

    def topic_table(self, k: int = 10) -> pd.DataFrame:
        """Topics for stakeholders: label, keywords, size and share; sizes below k suppressed."""
        from analysis.privacy import suppress_small_cells

        t = self.topic_info[["topic", "label", "keywords", "size", "share", "npmi"]].copy()
        t["keywords"] = t["keywords"].map(lambda ws: ", ".join(ws[:8]))
        t["npmi"] = t["npmi"].round(3)
        small = t["size"] < k
        t["share"] = t["share"].round(4).astype(object).where(~small, f"<{k}")
        return suppress_small_cells(t, ["size"], k=k)

    def over_time(self, freq: str = "W") -> pd.DataFrame:
        """Conversations per period and topic, and the topic's share of the period."""
        a = self.assignments.merge(self.conversations[["conversation_id", "started_at"]], on="conversation_id")
        a = a.dropna(subset=["started_at"])
        if not len(a):
            return pd.DataFrame(columns=["period", "topic", "topic_label", "conversations", "share"])
        period = a["started_at"].dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period(freq).dt.start_time
        g = a.assign(period=period).groupby(["period", "topic", "topic_label"]).size().rename("conversations").reset_index()
        g["share"] = g["conversations"] / g.groupby("period")["conversations"].transform("sum")
        return g

    def by_region(self, k: int = 10) -> pd.DataFrame:
        """Conversations and users per region and topic with the topic's share of the region;
        rows describing fewer than k users are suppressed (counts and share missing, `suppressed`)."""
        a = self.assignments.merge(self.conversations[["conversation_id", "user_id", "region", "excluded"]], on="conversation_id")
        g = (
            a.groupby(["region", "excluded", "topic", "topic_label"], dropna=False)
            .agg(conversations=("conversation_id", "size"), users=("user_id", "nunique"))
            .reset_index()
        )
        g["share"] = g["conversations"] / g.groupby("region")["conversations"].transform("sum")
        g["suppressed"] = g["users"] < k
        for c in ("conversations", "users"):
            g[c] = g[c].astype("Int64").mask(g["suppressed"])
        g["share"] = g["share"].mask(g["suppressed"])
        return g

    def by_region_group(self) -> pd.DataFrame:
        """Topic shares in included vs excluded regions (the policy's two populations)."""
        a = self.assignments.merge(self.conversations[["conversation_id", "excluded"]], on="conversation_id")
        a["region_group"] = np.where(a["excluded"].fillna(False).astype(bool), "excluded", "included")
        g = a.groupby(["region_group", "topic", "topic_label"]).size().rename("conversations").reset_index()
        g["share"] = g["conversations"] / g.groupby("region_group")["conversations"].transform("sum")
        return g

    # ---- figures
    def fig_sizes(self, top: int = 30):
        import matplotlib.pyplot as plt

        t = self.topic_info[self.topic_info["topic"] != -1].sort_values("size", ascending=False).head(top)
        fig, ax = plt.subplots(figsize=(8, max(3, 0.26 * len(t) + 1)))
        ax.barh([f"{r.topic}: {r.label}" for r in t.itertuples()][::-1], t["share"].to_numpy()[::-1])
        ax.set_xlabel("share of conversations")
        out = self.topic_info.loc[self.topic_info["topic"] == -1, "share"]
        ax.set_title(f"Topic sizes (top {len(t)}; outliers {float(out.iloc[0]) if len(out) else 0:.1%})", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_over_time(self, top: int = 8, freq: str = "W", policy_date: str | None = None):
        import matplotlib.pyplot as plt

        ot = self.over_time(freq)
        fig, ax = plt.subplots(figsize=(9, 3.6))
        if not len(ot):
            ax.text(0.5, 0.5, "no timestamps in this corpus", ha="center", va="center", transform=ax.transAxes)
            return fig
        keep = self.topic_info[self.topic_info["topic"] != -1].nlargest(top, "size")["topic"]
        wide = ot[ot["topic"].isin(keep)].pivot_table(index="period", columns="topic_label", values="share", fill_value=0)
        wide.plot(ax=ax, lw=1.3)
        if policy_date:
            ax.axvline(pd.Timestamp(policy_date), color="k", ls="--", lw=1)
        ax.set_ylabel("share of the week's conversations")
        ax.set_xlabel("")
        ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        return fig

    def fig_intertopic(self, annotate: int = 15):
        """Intertopic distance map: topic centroids placed by metric MDS of their cosine distances
        (seeded), circle area = topic size; the largest topics are labeled."""
        import matplotlib.pyplot as plt
        from sklearn.manifold import MDS

        ids, cent = self.model.topic_ids, self.model.centroids()
        d = np.clip(1 - cent @ cent.T, 0, 2)
        np.fill_diagonal(d, 0)
        xy = MDS(n_components=2, metric="precomputed", random_state=self.settings.seed, n_init=1, init="classical_mds").fit_transform(d) if len(ids) > 2 else np.zeros((len(ids), 2))
        info = self.topic_info.set_index("topic")
        size = info["size"].reindex(ids).fillna(0).to_numpy()
        fig, ax = plt.subplots(figsize=(8, 6.5))
        ax.scatter(xy[:, 0], xy[:, 1], s=20 + 1200 * size / max(size.max(), 1), alpha=0.45, edgecolor="k", lw=0.5)
        for i in np.argsort(-size)[:annotate]:
            ax.annotate(f"{ids[i]}: {info.loc[ids[i], 'label']}", xy[i], fontsize=6.5, ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("Intertopic distance map (closer = more similar; area = size)", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_hierarchy(self):
        """Topic hierarchy: average-linkage clustering of the topic centroids (cosine distance)."""
        import matplotlib.pyplot as plt
        from scipy.cluster.hierarchy import dendrogram, linkage

        ids, cent = self.model.topic_ids, self.model.centroids()
        info = self.topic_info.set_index("topic")
        fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(ids) + 1)))
        if len(ids) > 1:
            z = linkage(cent.astype(np.float64), method="average", metric="cosine")
            dendrogram(z, labels=[f"{t}: {info.loc[t, 'label']}" for t in ids], orientation="left", ax=ax, leaf_font_size=6.5, color_threshold=0.7 * z[:, 2].max())
        ax.set_xlabel("cosine distance at which topics merge")
        ax.set_title("Topic hierarchy", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_intertopic_interactive(self):
        """BERTopic's plotly intertopic map (for JupyterLab; plotly.js is large in HTML reports)."""
        return self.model.bertopic.visualize_topics(custom_labels=True)

    def fig_hierarchy_interactive(self):
        return self.model.bertopic.visualize_hierarchy(custom_labels=True, use_ctfidf=False)

    def fig_barchart(self, top: int = 12):
        return self.model.bertopic.visualize_barchart(top_n_topics=top, custom_labels=True)


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

        s = self.settings
        mts, ms = s.cluster_sizes(n_fit)
        umap = UMAP(
            n_neighbors=s.n_neighbors,
            n_components=s.n_components,
            min_dist=0.0,
            metric="cosine",
            random_state=s.seed,  # seeded UMAP runs single-threaded: parallel SGD is its nondeterminism
            n_jobs=1,
            low_memory=True,
            n_epochs=s.umap_epochs,
        )
        hdb = HDBSCAN(min_cluster_size=mts, min_samples=ms, metric="euclidean", cluster_selection_method="eom", prediction_data=False)
        vec = CountVectorizer(stop_words=stop_words(), ngram_range=(1, 2), min_df=min(s.min_df, max(1, n_fit // 20)), token_pattern=TOKEN_PATTERN)
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

            return {"KeyBERT": KeyBERTInspired(top_n_words=s.top_n_words, nr_repr_docs=5, nr_samples=300, nr_candidate_words=30, random_state=s.seed)}
        if s.representation == "mmr":
            from bertopic.representation import MaximalMarginalRelevance

            return {"MMR": MaximalMarginalRelevance(diversity=0.3, top_n_words=s.top_n_words)}
        return None

    def fit(self, conversations: pd.DataFrame, truth: pd.DataFrame | None = None, *, embedder: Embedder | None = None,
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
            pick = np.sort(np.random.default_rng(s.seed).choice(len(conv), size=s.max_documents, replace=False))
            conv = conv.iloc[pick].reset_index(drop=True)

        t0 = time.perf_counter()
        if documents is not None and len(documents.texts) != len(conv):
            raise ValueError(f"{len(documents.texts)} documents for {len(conv)} conversations")
        docs = documents if documents is not None else build_documents(
            conv["document"], openings=conv["opening"] if "opening" in conv else None, max_chars=s.max_chars)
        timings["clean"] = time.perf_counter() - t0
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
        rng = np.random.default_rng(s.seed)
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
        vec.set_params(min_df=min(s.min_df, max(1, n // 20)))
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

        quality = _quality(
            s, conv, docs, topic_all, final, fit_pos, outlier_before, outlier_after, npmi, ctfidf_words, truth, timings, embed_stats
        )
        keep = [c for c in ("conversation_id", "user_id", "region", "excluded", "started_at") if c in conv]
        model.meta.update({"n_documents": int(n), "n_fit": int(len(fit_pos)), "topics": int(len(topic_ids)), "cluster_sizes": list(s.cluster_sizes(len(fit_pos)))})
        return TopicsResult(assignments, topic_info, quality, model, docs, conv[keep].copy(), timings, s, embed_stats)


def embed_totals(embedder: Embedder, since: int) -> dict:
    """The embedder's counts summed over its encode calls from number `since` on."""
    out: dict = {}
    for h in embedder.stats.history[since:]:
        for k, v in h.items():
            out[k] = out.get(k, 0) + v
    return out


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


def _fmt(v) -> str:
    if v is None or pd.isna(v):
        return ""
    v = float(v)
    if v.is_integer():
        return f"{int(v):,}"
    return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"


def _dedupe_labels(labels: dict[int, str], model: TopicModel) -> dict[int, str]:
    """Two topics with the same label get their next distinct keyword appended."""
    seen = Counter(labels.values())
    out = dict(labels)
    for t, lab in labels.items():
        if seen[lab] > 1:
            extra = [w for w in model.keywords(t) if w not in lab]
            out[t] = scrub_pii(f"{lab} ({extra[0]})") if extra else f"{lab} ({t})"
    return out


def _quality(s, conv, docs, topic_all, final, fit_pos, outlier_before, outlier_after, npmi, words, truth, timings, embed_stats) -> pd.DataFrame:
    rows = []

    def add(metric, estimate, n=None, **group):
        rows.append({"metric": metric, "estimate": None if estimate is None else float(estimate), "n": n, "group": group})

    n_conv = len(conv)
    add("documents", n_conv)
    add("documents_empty_after_cleaning", int(docs.flags["empty"].sum()), n_conv)
    for c in ("code", "log", "boilerplate", "truncated"):
        add("documents_cleaned", int(docs.flags[c].sum()), n_conv, removed=c)
    add("topics", len(words))
    add("outlier_share_before_reduction", outlier_before, len(fit_pos), scope="fit sample")
    add("outlier_share_after_reduction", outlier_after, len(fit_pos), scope="fit sample")
    add("outlier_share", float((topic_all == -1).mean()), n_conv)
    add("npmi", float(np.nanmean(npmi.to_numpy())) if npmi.notna().any() else None, int(npmi.notna().sum()))
    add("topic_diversity", topic_diversity(words, top_n=s.top_n_words), len(words))
    if truth is not None and len(truth):
        tr = conv[["conversation_id"]].merge(truth[["conversation_id", "topic"]], on="conversation_id", how="left")
        have = tr["topic"].notna().to_numpy()
        if have.any():
            ag = agreement(topic_all[have], tr["topic"].to_numpy()[have])
            add("ari", ag["ari"], int(have.sum()), truth="simulator topic")
            add("nmi", ag["nmi"], int(have.sum()), truth="simulator topic")
            non_out = have & (topic_all != -1)
            if non_out.sum() > 1:
                ag2 = agreement(topic_all[non_out], tr["topic"].to_numpy()[non_out])
                add("ari", ag2["ari"], int(non_out.sum()), truth="simulator topic", scope="non-outliers")
            add("true_topics", int(pd.Series(tr["topic"].to_numpy()[have]).nunique()))
    add("embeddings_computed", embed_stats.get("computed"), embed_stats.get("unique"))
    add("embeddings_cached", embed_stats.get("cached"), embed_stats.get("unique"))
    for k, v in timings.items():
        add("seconds", v, step=k)
    add("docs_per_second", n_conv / timings["total"] if timings.get("total") else None, n_conv)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the stage


def read_truth(input_dir: str | Path | None) -> pd.DataFrame | None:
    """The simulator's per-conversation topics (`truth/conversations.parquet`), if any."""
    if not input_dir:
        return None
    p = Path(input_dir) / "truth" / "conversations.parquet"
    return pd.read_parquet(p, columns=["conversation_id", "topic"]) if p.exists() else None


def run_topics(run_dir: str | Path, input_dir: str | Path | None = None, *, min_cell_users: int = 10, engine: str = "pandas",
               dask_scheduler: str | None = None, **settings) -> TopicsResult:
    """Stage 01: fit topics on `run_dir/data/conversations.parquet`, write the artifacts and metrics.

    Writes `data/topics.parquet` (per conversation), `data/topic_info.parquet` (per topic, PII-
    scrubbed labels, no raw text), `data/topics_over_time.parquet`, `data/topics_by_region.parquet`
    (small cells suppressed), the model under `model/topics/`, and `metrics/01_topics.json`.
    `engine="dask"` cleans, embeds and assigns on a Dask cluster (`analysis.engine`), same results.
    """
    from analysis.metrics import MetricsRecorder
    from analysis.storage import write_parquet

    run_dir = Path(run_dir)
    from analysis import engine as eng

    if eng.check_engine(engine) == "dask":
        res = eng.fit_topics(run_dir / "data" / "conversations.parquet", read_truth(input_dir), settings=TopicSettings.from_dict(settings),
                             c=eng.client(dask_scheduler))
    else:
        conv = pd.read_parquet(run_dir / "data" / "conversations.parquet")
        res = TopicModeler(TopicSettings.from_dict(settings)).fit(conv, read_truth(input_dir))
    out = run_dir / "data"
    art = {
        "topics": write_parquet(res.assignments, out / "topics.parquet"),
        "topic_info": write_parquet(res.topic_info, out / "topic_info.parquet"),
        "topics_over_time": write_parquet(res.over_time(), out / "topics_over_time.parquet"),
        "topics_by_region": write_parquet(res.by_region(min_cell_users), out / "topics_by_region.parquet"),
        "model": res.model.save(run_dir / "model" / "topics"),
    }
    res.artifacts = {k: str(v) for k, v in art.items()}
    m = MetricsRecorder(run_dir, STAGE)
    for r in res.quality.itertuples():
        m.add(r.metric, r.estimate, group=r.group, n=None if pd.isna(r.n) else int(r.n))
    m.write()
    return res
