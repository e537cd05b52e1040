"""Embedding backends: offline loading, the content-hash cache, semantic sanity."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from analysis.util.embeddings import (
    STATIC,
    Embedder,
    EmbeddingCache,
    project_cache_dir,
)

TEXTS = [
    "which hiking boots are best for wet trails in scotland",
    "recommend trail running shoes for muddy hikes",
    "how do I file my tax return as a freelancer",
    "which hiking boots are best for wet trails in scotland",  # a duplicate
]


def test_static_cache_serves_repeats_without_recomputing(tmp_path, static_model_dir):
    e = Embedder(STATIC, cache_dir=tmp_path, model_dir=static_model_dir)
    x = e.encode(TEXTS)
    assert x.shape == (4, e.dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert e.stats.history[-1]["computed"] == 3  # the duplicate is embedded once
    np.testing.assert_array_equal(x[0], x[3])

    y = e.encode(TEXTS[::-1] + ["a new text about tax deductions"])
    assert e.stats.history[-1]["computed"] == 1 and e.stats.history[-1]["cached"] == 3
    np.testing.assert_array_equal(y[:4], x[::-1])

    # a new process (a fresh Embedder) finds the vectors on disk
    e2 = Embedder(STATIC, cache_dir=tmp_path, model_dir=static_model_dir)
    z = e2.encode(TEXTS)
    assert e2.stats.computed == 0
    np.testing.assert_array_equal(z, x)


def test_cache_keys_separate_models_and_survive_compaction(tmp_path):
    c = EmbeddingCache(tmp_path / "m")
    rng = np.random.default_rng(0)
    keys = [EmbeddingCache.key(f"t{i}") for i in range(200)]
    vecs = rng.normal(size=(200, 8)).astype(np.float32)
    for i in range(0, 200, 2):  # 100 shards -> compacted along the way
        c.put(keys[i : i + 2], vecs[i : i + 2])
    assert len(list((tmp_path / "m").glob("part-*.npz"))) < 64
    found, got = EmbeddingCache(tmp_path / "m").get(keys)
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    found, _ = EmbeddingCache(tmp_path / "other-model").get(keys)
    assert not found.any()


def test_static_embeddings_carry_meaning(tmp_path, static_model_dir):
    x = Embedder(STATIC, cache_dir=tmp_path, model_dir=static_model_dir).encode(TEXTS[:3])
    assert x[0] @ x[1] > x[0] @ x[2] + 0.1


def test_unknown_hub_model_fails_fast_without_network(tmp_path, no_network):
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        Embedder("some-org/not-a-model-here", cache_dir=tmp_path)
    assert no_network == []


def test_cache_dir_is_git_ignored():
    r = subprocess.run(["git", "check-ignore", "-q", "data/cache/embeddings/x.npz"], cwd=project_cache_dir().parents[1], capture_output=True)
    assert r.returncode == 0


def test_a_fresh_cache_reuses_the_set_up_static_model(tmp_path, monkeypatch, static_model_dir):
    """`make setup` distils into the project cache; a run on a fresh $CHAT_AD_AUDIT_CACHE must not distil again."""
    import analysis.util.embeddings as emb

    def refuse(*a, **k):
        raise AssertionError("distilled again")

    monkeypatch.setattr(emb, "project_cache_dir", lambda: static_model_dir)  # where the set-up model is
    monkeypatch.setattr(emb, "distill_static", refuse)
    monkeypatch.setenv("CHAT_AD_AUDIT_CACHE", str(tmp_path / "fresh"))
    e = Embedder(STATIC)
    assert e.cache_dir == tmp_path / "fresh" and e.encode(TEXTS[:2]).shape[0] == 2
    assert not (tmp_path / "fresh" / "static").exists()
    assert e.model_id == Embedder(STATIC, cache_dir=tmp_path / "other", model_dir=static_model_dir).model_id


