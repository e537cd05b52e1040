"""Topic stage: document cleaning, quality metrics, recovery of the simulator's topics,
determinism, the embedding cache across a parameter sweep, and offline save/reload."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.contract.settings import IngestSettings, TopicSettings
from analysis.stages import ingest
from analysis.stages import topics as topics_stage
from analysis.topics.documents import clean_document
from analysis.topics.model import TopicModel
from analysis.topics.modeler import UMAP_UNCACHED_KERNELS, TopicModeler, cache_umap_kernels
from analysis.topics.quality import agreement, npmi_coherence, topic_diversity
from analysis.util.embeddings import STATIC, Embedder
from analysis.validation.truth import evaluate_topics

# The small world has 1,600 conversations; fitting on 1,000 exercises "fit a sample, assign the rest".
SETTINGS = dict(fit_sample=1000, topic_seed=3)


def _fit(conv, truth, emb, **settings):
    """Fit, then the evaluation step the stage runs: ARI / NMI against the simulator's topics."""
    res = TopicModeler(**{**SETTINGS, **settings}).fit(conv, embedder=emb)
    evaluate_topics(res, truth)
    return res


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emb_cache")


@pytest.fixture(scope="session")
def fitted(corpus, shared_cache, static_model_dir):
    conv, truth = corpus
    emb = Embedder(STATIC, cache_dir=shared_cache, model_dir=static_model_dir)
    return _fit(conv, truth, emb)


def _metric(res, name, **group):
    q = res.quality
    row = q[(q["metric"] == name) & q["group"].map(lambda g: g == group)]
    assert len(row) == 1, (name, group)
    return row["estimate"].iloc[0]


def test_cleaning_drops_code_logs_and_boilerplate_but_keeps_the_topic():
    doc = "\n".join(
        [
            "my flask app crashes when I upload a photo, how do I fix it?",
            "```python",
            "def upload(f):",
            "    return save(f)",
            "```",
            "Traceback (most recent call last):",
            '  File "app.py", line 12, in upload',
            "    save(f)",
            "ValueError: bad image",
            "2025-10-01 12:00:01 ERROR worker died",
            "continue",
            "thanks!",
            "also which hiking boots for scotland",
        ]
    )
    text, flags = clean_document(doc)
    assert "flask app crashes" in text and "hiking boots" in text
    for noise in ("def upload", "Traceback", "app.py", "ValueError", "worker died", "continue", "thanks"):
        assert noise not in text
    assert flags["code"] and flags["log"] and flags["boilerplate"] and not flags["empty"]


def test_a_document_of_only_noise_is_empty():
    text, flags = clean_document("go on\n```\nx = 1\n```\nthanks")
    assert text == "" and flags["empty"]


def test_long_pastes_are_truncated():
    text, flags = clean_document("word " * 2000, max_chars=500)
    assert len(text) <= 500 and flags["truncated"]


# ------------------------------------------------------------------------------ metrics


def test_npmi_is_one_for_words_that_always_co_occur_and_minus_one_for_words_that_never_do():
    docs = ["alpha beta"] * 5 + ["gamma delta"] * 5 + ["epsilon"] * 10
    s = npmi_coherence({0: ["alpha", "beta"], 1: ["alpha", "gamma"]}, docs)
    assert s[0] == pytest.approx(1.0, abs=1e-9)
    assert s[1] == pytest.approx(-1.0)


def test_topic_diversity_counts_shared_words():
    assert topic_diversity({0: ["a", "b"], 1: ["b", "c"]}) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- recovery


def test_topics_recover_the_simulated_topics_well_above_chance(fitted, corpus):
    ari = _metric(fitted, "ari", truth="simulator topic")
    nmi = _metric(fitted, "nmi", truth="simulator topic")
    # chance is ARI ~ 0: a shuffled assignment shows it on this very corpus
    rng = np.random.default_rng(0)
    truth = corpus[1].set_index("conversation_id").loc[fitted.assignments["conversation_id"], "topic"].to_numpy()
    shuffled = agreement(rng.permutation(fitted.assignments["topic"].to_numpy()), truth)
    assert abs(shuffled["ari"]) < 0.02
    # 57 true topics in 1,600 conversations (15% mixing two topics): ~0.22-0.29 here, 0.67 at 10k
    assert ari > 0.15 and nmi > 0.4
    assert _metric(fitted, "outlier_share") <= 0.10
    # outliers were reduced, and the rest of the corpus was assigned, not clustered
    assert _metric(fitted, "outlier_share_after_reduction", scope="fit sample") <= _metric(fitted, "outlier_share_before_reduction", scope="fit sample")
    assert set(fitted.assignments["assigned_by"]) >= {"cluster", "knn"}


def test_topic_tables_hold_no_raw_text(fitted, corpus):
    info = fitted.topic_info
    assert {"topic", "label", "keywords", "size", "representative_ids"} <= set(info.columns)
    assert info["size"].sum() == len(corpus[0])
    docs = set(corpus[0]["document"])
    for lab in info["label"]:
        assert lab not in docs and "@" not in lab
    assert fitted.model.bertopic.representative_docs_ == {}


def test_same_seed_same_input_gives_identical_topics(fitted, corpus, tmp_path, static_model_dir):
    conv, truth = corpus
    fresh = Embedder(STATIC, cache_dir=tmp_path, model_dir=static_model_dir)  # recomputes every embedding
    again = _fit(conv, truth, fresh)
    assert fresh.stats.computed > 0
    pd.testing.assert_frame_equal(again.assignments, fitted.assignments)
    pd.testing.assert_frame_equal(again.topic_info, fitted.topic_info)


def test_a_clustering_sweep_embeds_nothing_twice(fitted, corpus, shared_cache, static_model_dir):
    conv, truth = corpus
    emb = Embedder(STATIC, cache_dir=shared_cache, model_dir=static_model_dir)  # a new run, same cache
    res = _fit(conv, truth, emb, min_topic_size=15, n_neighbors=10)
    assert _metric(res, "embeddings_computed") == 0
    assert _metric(res, "embeddings_cached") == _metric(fitted, "embeddings_computed") + _metric(fitted, "embeddings_cached")


def test_saved_model_reloads_offline_and_assigns_the_same_topics(fitted, corpus, tmp_path, shared_cache, no_network):
    path = fitted.model.save(tmp_path / "model")
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.pkl")) and not list(path.glob("*.pickle"))
    meta = json.loads((path / "chat_ad_audit_topics.json").read_text())
    assert meta["embedding_backend"] == STATIC
    loaded = TopicModel.load(path, cache_dir=shared_cache)
    conv = corpus[0]
    again = loaded.assign(conv["document"], openings=conv["opening"])
    a = fitted.assignments
    # documents placed by the saved model's rule (kNN outside the fit sample, empty ones) get the same
    # topic after reload; "outlier" is not among them: inside the fit sample it is what HDBSCAN and
    # BERTopic's outlier reduction left, which the saved kNN rule may place (one document at 0.304 > 0.3)
    placed = a["assigned_by"].isin(["knn", "empty"]).to_numpy()
    np.testing.assert_array_equal(again["topic"].to_numpy()[placed], a["topic"].to_numpy()[placed])
    pd.testing.assert_frame_equal(again, fitted.model.assign(conv["document"], openings=conv["opening"]))
    assert loaded.labels() == fitted.model.labels()
    assert no_network == []


# ---------------------------------------------------------------------------- the stage


def test_stage_writes_its_artifacts_and_metrics(small_world_dir, tmp_path, shared_cache, static_model_dir):
    run = tmp_path / "run"
    ingest.run(run, IngestSettings(input_dir=str(small_world_dir)))
    res = topics_stage.run(run, TopicSettings(**SETTINGS, cache_dir=str(tmp_path / "cache")))
    topics = pd.read_parquet(run / "data" / "topics.parquet")
    assert list(topics.columns[:4]) == ["conversation_id", "topic", "topic_label", "probability"]
    assert len(topics) == 1600
    info = pd.read_parquet(run / "data" / "topic_info.parquet")
    assert len(info) == len(res.topic_info)
    by_region = pd.read_parquet(run / "data" / "topics_by_region.parquet")
    users = by_region["users"].dropna()
    assert (users >= 10).all() and by_region["suppressed"].any()  # small cells suppressed
    assert (run / "model" / "topics" / "topic_embeddings.safetensors").exists() or list((run / "model" / "topics").glob("*.safetensors"))
    m = json.loads((run / "metrics" / "01_topics.json").read_text())
    names = {r["metric"] for r in m}
    assert {"ari", "nmi", "npmi", "topic_diversity", "outlier_share", "outlier_share_before_reduction", "docs_per_second"} <= names


# --------------------------------------------------------------------- the real MiniLM backend


def test_settings_are_validated():
    with pytest.raises(ValueError, match="outlier_strategy"):
        TopicSettings(outlier_strategy="magic")
    with pytest.raises(ValueError, match="unknown topic setting"):
        TopicSettings.from_dict({"n_topics": 3})


def test_tier1_purity_counts_majorities_and_leave_one_out_cannot_be_bought_by_tiny_topics():
    from analysis.topics.quality import tier1_purity

    # topic 0: a, a, b (majority a); topic 1: one label; topic 2: one label; -1 is the outlier topic
    p = tier1_purity([0, 0, 0, 1, 1, -1, 2], ["a", "a", "b", "c", None, "a", "d"])
    assert p["purity"] == 0.8 and p["labeled_in_topics"] == 5
    assert p["purity_loo"] == 0.4  # a, a hit (tie a/b -> a); b misses; the single-label topics predict nothing
    assert abs(p["labeled_outlier_share"] - 1 / 6) < 1e-12
    # one topic per conversation: purity 1, leave-one-out 0
    singles = tier1_purity(list(range(6)), list("aabbcc"))
    assert singles["purity"] == 1.0 and singles["purity_loo"] == 0.0


def test_min_df_is_a_share_of_documents_with_a_floor_of_two():
    from analysis.contract.settings import TopicSettings

    s = TopicSettings()
    assert s.min_document_count(17_545) == 36 and s.min_document_count(200) == 2 and s.min_document_count(30) == 1
    assert TopicSettings(min_df=5).min_document_count(1000) == 5
    with pytest.raises(ValueError, match="min_df"):
        TopicSettings(min_df=2.5)


def test_keyword_vocabulary_counts_documents_not_topics():
    """BERTopic's c-TF-IDF vectorizer sees one concatenation per topic; the keyword floor must count
    documents (a share of 50k documents once exceeded the topic count and crashed the stage)."""
    from analysis.topics.modeler import keyword_vocabulary

    docs = ["mortgage rates question"] * 3 + ["sourdough starter"] * 2 + ["zebra"]
    v = keyword_vocabulary(docs, 3)
    assert "mortgage" in v and "mortgage rates" in v and "sourdough" not in v and "zebra" not in v
    assert keyword_vocabulary(docs, 10) is None  # nothing reaches the floor: no restriction


def test_keyword_floor_also_counts_users():
    """A word many documents of ONE user share (a long chat split into parts: its characters' names)
    never becomes a keyword; a word enough users share does."""
    from analysis.topics.modeler import keyword_vocabulary

    docs = ["jareth asked sarah about the mortgage"] * 6 + ["mortgage rates today"] * 4
    users = ["u1"] * 6 + ["u2", "u3", "u4", "u5"]
    v = keyword_vocabulary(docs, 3, users, 3)
    assert "mortgage" in v and "jareth" not in v and "sarah" not in v
    assert "jareth" in keyword_vocabulary(docs, 3)  # documents alone let the names through
    with pytest.raises(ValueError, match="10 documents but 2 users"):
        keyword_vocabulary(docs, 3, ["u1", "u2"], 3)


def test_umap_kernels_are_cached_on_disk_and_a_missing_one_is_skipped():
    """The pinned umap's uncached kernels get numba's disk cache (later processes skip ~20 s of compiling);
    a kernel another umap version lacks, or a name that is no numba dispatcher, is skipped without an error;
    a second call changes nothing."""
    import umap.utils

    assert cache_umap_kernels() == UMAP_UNCACHED_KERNELS == cache_umap_kernels()
    assert type(umap.utils.fast_knn_indices._cache).__name__ == "FunctionCache"  # numba's NullCache before
    odd = ("umap.utils:no_such_kernel", "umap.no_such_module:f", "umap.utils:np", UMAP_UNCACHED_KERNELS[0])
    assert cache_umap_kernels(odd) == (UMAP_UNCACHED_KERNELS[0],)
