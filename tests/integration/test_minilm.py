"""The MiniLM backend (a real transformer, slow on 2 cores): offline, precision-independent, thread-count-independent."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.topics.modeler import TopicModeler
from analysis.util import embeddings
from analysis.util.embeddings import (
    MINILM,
    PRECISION_ENV,
    Embedder,
)
from analysis.validation.truth import evaluate_topics

TEXTS = [
    "which hiking boots are best for wet trails in scotland",
    "recommend trail running shoes for muddy hikes",
    "how do I file my tax return as a freelancer",
    "which hiking boots are best for wet trails in scotland",  # a duplicate
]


def _fit(conv, truth, emb, **settings):
    res = TopicModeler(**{"fit_sample": 1000, "topic_seed": 3, **settings}).fit(conv, embedder=emb)
    evaluate_topics(res, truth)
    return res


def _metric(res, name, **group):
    q = res.quality
    row = q[(q["metric"] == name) & q["group"].map(lambda g: g == group)]
    assert len(row) == 1, (name, group)
    return row["estimate"].iloc[0]


def test_minilm_loads_and_embeds_with_the_network_blocked(tmp_path, no_network):
    e = Embedder(MINILM, cache_dir=tmp_path)
    x = e.encode(TEXTS[:3])
    assert x.shape == (3, 384)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2
    assert no_network == []


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


def test_minilm_vectors_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    """MiniLM encodes chunks of `_CHUNK` (512) texts on one torch thread each, as many chunks at once as torch has
    threads: 1 or 2 at once must give the same vectors, bit for bit. The first chunk runs alone, so the pool
    needs three chunks: here of 64 texts (140 texts; the same path as 1,100 texts in chunks of 512, at an eighth
    of the MiniLM time); short ones (1-3 sentences), as the cost is in the tokens."""
    import torch

    monkeypatch.setattr(embeddings, "_CHUNK", 64)
    texts = [f"question {i}: " + " ".join(["how do I plan a trip to the mountains"] * (1 + i % 3)) for i in range(140)]
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
    assert one.shape == (140, 384) and (one[0] @ one[7]) > 0.8  # 1 and 2 sentences


def test_minilm_topics_offline_recover_the_simulated_topics(corpus, tmp_path, no_network):
    conv, truth = corpus
    emb = Embedder(MINILM, cache_dir=tmp_path)
    res = _fit(conv, truth, emb, embedding_backend=MINILM)
    assert _metric(res, "ari", truth="simulator topic") > 0.15
    assert _metric(res, "outlier_share") <= 0.10
    assert no_network == []
