"""Embedding backends: offline loading, the content-hash cache, semantic sanity."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest

from analysis.embeddings import (
    MINILM, PRECISION_ENV, STATIC, EmbeddingCache, Embedder, default_cache_dir, distill_static, project_cache_dir,
)


@pytest.fixture(scope="session")
def static_model_dir():
    """The project cache holding the distilled static model (distilled once per machine, ~20 s)."""
    distill_static(default_cache_dir())
    return default_cache_dir()


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection is recorded and refused."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network blocked in this test: connect to {address!r}")

    def refuse_create(address, *a, **k):
        attempts.append(address)
        raise OSError(f"network blocked in this test: connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    return attempts


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


def test_minilm_loads_and_embeds_with_the_network_blocked(tmp_path, no_network):
    e = Embedder(MINILM, cache_dir=tmp_path)
    x = e.encode(TEXTS[:3])
    assert x.shape == (3, 384)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2
    assert no_network == []


def test_unknown_hub_model_fails_fast_without_network(tmp_path, no_network):
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        Embedder("some-org/not-a-model-here", cache_dir=tmp_path)
    assert no_network == []


def test_cache_dir_is_git_ignored():
    r = subprocess.run(["git", "check-ignore", "-q", "data/cache/embeddings/x.npz"], cwd=project_cache_dir().parents[1], capture_output=True)
    assert r.returncode == 0


def test_minilm_precisions_agree_and_keep_separate_cache_entries(tmp_path, monkeypatch):
    """bf16 (where the CPU multiplies it natively) is the same model: cosine ~1 to fp32, own model id."""
    texts = TEXTS[:3] + ["I was diagnosed with diabetes last month and feel lost", "our union is voting on a strike"]
    out = {}
    for prec in ("fp32", "bf16"):
        monkeypatch.setenv(PRECISION_ENV, prec)
        e = Embedder(MINILM, cache_dir=tmp_path)
        out[prec] = (e.model_id, e.encode(texts))
    (id32, x32), (id16, x16) = out["fp32"], out["bf16"]
    assert id16 == id32 + "-bf16"
    assert {p.name for p in (tmp_path / "embeddings").iterdir()} == {id32, id16}
    cos = (x32 * x16).sum(axis=1)
    assert cos.min() > 0.999 and not np.array_equal(x32, x16)
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="expected auto, fp32 or bf16"):
        Embedder(MINILM, cache_dir=tmp_path / "x")


def test_a_fresh_cache_reuses_the_set_up_static_model(tmp_path, monkeypatch, static_model_dir):
    """`make setup` distils into the project cache; a run on a fresh $CHAT_AD_AUDIT_CACHE must not distil again."""
    import analysis.embeddings as emb

    def refuse(*a, **k):
        raise AssertionError("distilled again")

    monkeypatch.setattr(emb, "project_cache_dir", lambda: static_model_dir)  # where the set-up model is
    monkeypatch.setattr(emb, "distill_static", refuse)
    monkeypatch.setenv("CHAT_AD_AUDIT_CACHE", str(tmp_path / "fresh"))
    e = Embedder(STATIC)
    assert e.cache_dir == tmp_path / "fresh" and e.encode(TEXTS[:2]).shape[0] == 2
    assert not (tmp_path / "fresh" / "static").exists()
    assert e.model_id == Embedder(STATIC, cache_dir=tmp_path / "other", model_dir=static_model_dir).model_id


def test_minilm_vectors_do_not_depend_on_the_thread_count(tmp_path):
    """MiniLM encodes chunks of 512 texts on one torch thread each, as many chunks at once as torch has
    threads: 1 or 2 at once must give the same vectors, bit for bit."""
    import torch

    texts = [f"question {i}: " + " ".join(["how do I plan a trip to the mountains"] * (1 + i % 7)) for i in range(1100)]
    e = Embedder(MINILM, cache_dir=tmp_path, use_cache=False)
    top = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = e.encode(texts)
        torch.set_num_threads(2)
        two = e.encode(texts)
        assert torch.get_num_threads() == 2  # restored after encoding
    finally:
        torch.set_num_threads(top)
    np.testing.assert_array_equal(one, two)
    assert one.shape == (1100, 384) and (one[0] @ one[7]) > 0.8
