"""Topic quality: NPMI coherence, diversity, agreement with true labels, and the stage's quality table."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.topics.documents import TOKEN_PATTERN

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

def tier1_purity(topics: Sequence, tier1: Sequence) -> dict[str, float | int]:
    """How well topics separate IAB tier-1s, over conversations with a tier-1 label (None/NaN: none).

    `purity`: share of labeled conversations in a topic (not -1) whose label is their topic's
    majority label. `purity_loo`: the same with the majority taken over the *other* labeled
    conversations of the topic (ties: the alphabetically first label; no other label: a miss), so
    splitting the corpus into tiny topics cannot raise it. `labeled_in_topics`: how many labeled
    conversations are in a topic; `labeled_outlier_share`: the share of labeled ones in topic -1.
    """
    t = pd.Series(np.asarray(topics)).astype(int)
    y = pd.Series(np.asarray(tier1, dtype=object))
    lab = y.notna() & (y.astype(str) != "nan")
    if len(t) != len(y):
        raise ValueError(f"{len(t)} topics but {len(y)} tier-1 labels")
    if not lab.any():
        return {"purity": float("nan"), "purity_loo": float("nan"), "labeled_in_topics": 0, "labeled_outlier_share": float("nan")}
    inside = lab & (t != -1)
    d = pd.DataFrame({"t": t[inside], "y": y[inside].astype(str)})
    counts = d.groupby(["t", "y"]).size().rename("n").reset_index()
    top = counts.sort_values(["t", "n", "y"], ascending=[True, False, True]).drop_duplicates("t").set_index("t")
    purity = float((d["y"].to_numpy() == top.loc[d["t"], "y"].to_numpy()).mean()) if len(d) else float("nan")
    # leave-one-out: remove the conversation's own label from its topic's counts
    by_topic = counts.groupby("t")
    labels_of = {k: g[["y", "n"]].to_numpy() for k, g in by_topic}
    hits = 0
    for tt, yy in d.itertuples(index=False):
        best, best_n = None, 0
        for lbl, n in sorted(labels_of[tt], key=lambda r: r[0]):
            n = n - (lbl == yy)
            if n > best_n:
                best, best_n = lbl, n
        hits += best == yy
    return {"purity": purity, "purity_loo": float(hits / len(d)) if len(d) else float("nan"), "labeled_in_topics": int(len(d)),
            "labeled_outlier_share": float(1 - inside.sum() / lab.sum())}


def quality_table(s, conv, docs, topic_all, final, fit_pos, outlier_before, outlier_after, npmi, words, timings, embed_stats) -> pd.DataFrame:
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
    add("embeddings_computed", embed_stats.get("computed"), embed_stats.get("unique"))
    add("embeddings_cached", embed_stats.get("cached"), embed_stats.get("unique"))
    for k, v in timings.items():
        add("seconds", v, step=k)
    add("docs_per_second", n_conv / timings["total"] if timings.get("total") else None, n_conv)
    return pd.DataFrame(rows)
