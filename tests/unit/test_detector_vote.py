"""The detector's neighbour vote: weighted shares of the nearest labeled conversations, never of the
conversation's own ShareGPT chat, and a saved pool that votes as the fitted one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.detector.model import DetectorParams, SensitiveDetector
from analysis.detector.vote import BLOCKS, VOTE_ART9, VOTE_IAB, NeighbourVote, vote_vectors


def _feats(V: np.ndarray) -> pd.DataFrame:
    """Head, segment-mean and reply blocks that are all `V` (so the vote vector is V, normalized)."""
    cols = {f"emb__{b}_{i}": V[:, i] for b in ("mean", "head", "reply") for i in range(V.shape[1])}
    return pd.DataFrame(cols)


def test_the_vote_weighs_the_nearest_labeled_conversations_and_skips_the_own_chat(tmp_path):
    V = np.array([[1, 0, 0], [0.99, 0.14, 0], [0.96, 0.28, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    pool = NeighbourVote.from_labeled(_feats(V), [["health"], [], ["health", "religion"], ["religion"], []],
                                      ["286", None, "286", "453", "596"], ["a_0", "b_0", "c_0", "d_0", "e_0"], k=2, temperature=20.0)
    assert pool.names[:len(VOTE_ART9)] == tuple(f"art9_{c}" for c in VOTE_ART9) and len(pool.names) == len(VOTE_ART9) + len(VOTE_IAB)
    h, iab_mh = pool.names.index("art9_health"), pool.names.index("iab_medical_health")
    q = _feats(np.array([[1.0, 0.02, 0]]))
    # no ids: the two nearest are rows 0 (health) and 1 (not): a share between, nearer row 0's label
    v = pool.columns(q).iloc[0]
    assert 0.5 < v.iloc[h] < 1.0
    # the same conversation as row 0 (chat "a"): row 0 does not vote, rows 1 and 2 do
    w = pool.columns(q, ["a_3"]).iloc[0]
    u = lambda x: np.asarray(x) / np.linalg.norm(x)  # noqa: E731
    s1, s2 = (np.exp(20 * (u(V[i]) @ u([1, 0.02, 0]) - 1)) for i in (1, 2))
    assert w.iloc[h] == pytest.approx(s2 / (s1 + s2), abs=0.01)
    # the IAB vote reads only rows with a tier-1 (row 1 has none): rows 2 and 3 are the nearest of those
    assert w.iloc[iab_mh] > 0.9
    again = NeighbourVote.load(pool.save(tmp_path / "pool.npz"))
    np.testing.assert_array_equal(again.columns(q, ["a_3"]).to_numpy(), pool.columns(q, ["a_3"]).to_numpy())
    assert again.names == pool.names and (again.k, again.temperature) == (2, 20.0)


def test_one_pool_votes_on_head_and_mean_for_corpora_without_replies(tmp_path):
    """The user-side entry's vote reads the same pool file on [head | mean]: the stored rows without the
    reply block, re-normalized, are the [head | mean] vectors of the features (up to the int8 rounding),
    and vote as a pool built on those blocks does; a query without a reply block can be scored."""
    rng = np.random.default_rng(0)
    n, d = 60, 8
    blocks = {b: rng.normal(size=(n, d)) * s for b, s in (("head", 1.0), ("mean", 3.0), ("reply", 0.2))}
    feats = pd.DataFrame({f"emb__{b}_{i}": X[:, i] for b, X in blocks.items() for i in range(d)})
    art9 = [["health"] if x > 0 else [] for x in blocks["head"][:, 0]]
    tier1 = ["286" if x > 0 else "596" for x in blocks["mean"][:, 0]]
    ids = [f"c{i}_0" for i in range(n)]
    full = NeighbourVote.load(NeighbourVote.from_labeled(feats, art9, tier1, ids, k=5).save(tmp_path / "pool.npz"))
    user = full.restrict(("head", "mean"))
    assert user.blocks == ("head", "mean") and user.vectors.shape == (n, 2 * d) and full.restrict(full.blocks) is full
    exact = vote_vectors(feats, ("head", "mean"))
    assert np.abs(user.vectors - exact).max() < 0.02 and (user.vectors * exact).sum(1).min() > 0.9999
    built = NeighbourVote.from_labeled(feats, art9, tier1, ids, k=5, blocks=("head", "mean"))
    q = feats.drop(columns=[c for c in feats if c.startswith("emb__reply_")]).iloc[:10]
    np.testing.assert_allclose(user.columns(q, ids[:10]).to_numpy(), built.columns(q, ids[:10]).to_numpy(), atol=0.02)
    with pytest.raises(ValueError, match="emb__reply_i"):
        full.columns(q)
    with pytest.raises(ValueError, match="holds"):
        user.restrict(("reply",))


def test_the_shipped_file_scores_a_corpus_without_replies_with_the_user_side_vote():
    """Shipped defaults: a corpus without replies gets the `minilm_user_side` entry, whose heads read a
    neighbour vote on [head | mean] from the main entry's pool file (one file, its rows re-normalized)."""
    main = SensitiveDetector(backend="minilm")
    user, note = main.for_corpus(None)
    assert user is not main and "user-side" in note and not user.params.with_reply
    assert user.params.vote["pool"] == main.params.vote["pool"] and user.params.vote["blocks"] == ["head", "mean"]
    pool, full = user.vote_pool(), main.vote_pool()
    assert pool.blocks == ("head", "mean") and full.blocks == BLOCKS and len(pool.chats) == len(full.chats) == user.params.vote["rows"]
    assert pool.vectors.shape[1] * 3 == full.vectors.shape[1] * 2
    np.testing.assert_allclose(np.linalg.norm(pool.vectors, axis=1), 1.0, atol=1e-5)
    # its heads read the main entry's columns but the reply's (the vote's 11 included)
    width = {d: len(next(iter(d.params.heads.values()))["mean"]) for d in (main, user)}
    assert user.params.vote["names"] == list(pool.names) and width[user] == width[main] - full.vectors.shape[1] // 3


def test_a_pool_file_that_votes_otherwise_than_the_params_were_fitted_with_is_refused():
    """The heads were fitted on one vote (k, temperature, targets, rows in the params): a pool file that
    differs is the wrong file, and the detector says so instead of scoring with it."""
    main = SensitiveDetector(backend="minilm")
    main.vote_pool()  # the shipped params and pool agree
    params = DetectorParams.from_dict(main.params.to_dict())
    params.vote = {**params.vote, "k": params.vote["k"] + 1}
    with pytest.raises(ValueError, match="differs from what the detector params were fitted with"):
        SensitiveDetector(backend="minilm", params=params).vote_pool()
