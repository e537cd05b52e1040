"""The per-conversation IAB categorizer: fitting, persistence, tier-2, overrides, topic mixes, confusion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.mapping.accuracy import tier1_confusion
from analysis.mapping.categorizer import (
    NONE,
    ConversationCategorizer,
    apply_overrides,
    conversation_features,
    default_model_path,
    readable_labels,
    tier1_guide,
    topic_mix,
)
from analysis.mapping.overrides import Overrides
from analysis.util.taxonomy import TaxonomyError, load_taxonomy

DOCS = {
    "596": ["my python script throws a KeyError when I read the json file", "how do I fix this SQL query join in postgres",
            "write a react component with a dropdown menu", "why does my docker container exit immediately"],
    "210": ["give me a recipe for a vegetarian lasagna", "how long should I bake chocolate chip cookies",
            "what can I cook with chicken, rice and broccoli", "a simple bread recipe without yeast"],
    "123": ["help me write a cover letter for a marketing job", "rewrite my resume summary for a data analyst role",
            "how do I prepare for a job interview at a bank", "what should I say when negotiating my salary offer"],
    NONE: ["hi", "continue", "thanks", "ok"],
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    docs = [d for ds in DOCS.values() for d in ds]
    y = [k for k, ds in DOCS.items() for _ in ds]
    feats = conversation_features(docs, "static")
    cat = ConversationCategorizer(backend="static", C=4.0).fit(feats.X, y, source="unit test")
    return cat, feats, y


def test_guide_covers_every_tier1_and_ships_a_model():
    tax = load_taxonomy()
    assert set(tier1_guide()) == set(tax.loc[tax["tier"] == 1, "id"])
    m = ConversationCategorizer.load(default_model_path())
    assert NONE in set(m.classes) and len(m.classes) == 38 and "gold" in m.fitted_on.lower()
    assert m.with_reply and m.knn_vectors.shape[1] == 3 * 384  # reads the first reply (train CV 0.718 vs 0.701 without)


def test_categorizer_learns_tier1_and_none_and_gives_tier2_inside_it(fitted):
    cat, feats, y = fitted
    new = ["my javascript function returns undefined, can you debug it", "recipe for a quick tomato soup", "help with my CV for a nursing job"]
    out = cat.categorize(conversation_features(new, "static"))
    assert out["tier1_id"].tolist() == ["596", "210", "123"]
    tax = load_taxonomy().set_index("id")
    for t1, node in zip(out["tier1_id"], out["iab_id"]):
        assert tax.at[node, "tier1_id"] == t1  # tier-2 lies inside the predicted tier-1
    # chosen by its subtree (programming languages, software ... lie under Computing), not its terse own text
    assert out.at[0, "path"] == "Technology & Computing > Computing"
    assert out["tier1_score"].between(0, 1).all()
    none = cat.categorize(conversation_features(["thanks", "ok"], "static"))
    assert (none["tier1_label"] == NONE).all() and none["tier1_id"].isna().all() and none["iab_id"].isna().all()


def test_tier2_vote_of_labeled_neighbours_blends_with_zero_shot_and_persists(fitted, tmp_path):
    cat, feats, y = fitted
    # every labeled Technology chat says Artificial Intelligence (597); zero-shot says Computing (599)
    t2 = ["597" if t == "596" else "" for t in y]
    new = conversation_features(["my javascript function returns undefined, can you debug it"], "static")
    zero = cat.categorize(new).at[0, "iab_id"]
    voted = ConversationCategorizer(backend="static", C=4.0, tier2_weight=0.8).fit(feats.X, y, tier2=t2)
    assert zero == "599" and voted.categorize(new).at[0, "iab_id"] == "597"
    assert voted.categorize(new).at[0, "tier1_id"] == "596"  # the tier-1 does not move
    # under a tier-1 without tier-2 labels the zero-shot answer stands
    food = conversation_features(["recipe for a quick tomato soup"], "static")
    assert voted.categorize(food).at[0, "iab_id"] == cat.categorize(food).at[0, "iab_id"]
    back = ConversationCategorizer.load(voted.save(tmp_path / "t2.npz"))
    assert back.tier2_weight == 0.8 and back.categorize(new).at[0, "iab_id"] == "597"
    # a model refitted on a run's tier-1 labels takes the shipped model's tier-2 vote (same features only)
    refit = ConversationCategorizer(backend="static", C=4.0).fit(feats.X, y)
    assert refit.take_tier2_vote(back) and refit.categorize(new).at[0, "iab_id"] == "597"
    assert not ConversationCategorizer(backend="static", with_reply=True).take_tier2_vote(back)
    with pytest.raises(ValueError, match="row 0: tier-2 '127' is not a child of tier-1 '596'"):
        ConversationCategorizer(backend="static").fit(feats.X, y, tier2=["127"] + t2[1:])


def test_prototypes_make_an_unlabeled_tier1_reachable(fitted):
    cat, _, _ = fitted
    assert "422" in set(cat.classes)  # Pets: no labeled example, only its guide prototype


def test_save_load_roundtrip_and_feature_mismatch(fitted, tmp_path):
    cat, feats, _ = fitted
    p = cat.save(tmp_path / "m.npz")
    back = ConversationCategorizer.load(p)
    np.testing.assert_allclose(back.predict_proba(feats.X).to_numpy(), cat.predict_proba(feats.X).to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="columns"):
        back.predict_proba(feats.X[:, :10])
    with pytest.raises(FileNotFoundError):
        ConversationCategorizer.load(tmp_path / "missing.npz")


def test_cross_fit_scores_each_row_without_its_label(fitted):
    cat, feats, y = fitted
    folds = np.arange(len(y)) % 4
    oof = cat.cross_fit(feats.X, y, folds)
    assert oof.shape[0] == len(y) and np.allclose(oof.sum(axis=1), 1.0)
    pred = oof.columns.to_numpy()[oof.to_numpy().argmax(axis=1)]
    assert (pred == np.asarray(y)).mean() >= 0.75


def test_overrides_conversation_beats_topic(tmp_path):
    cats = pd.DataFrame({"conversation_id": ["a", "b", "c"], "tier1_id": ["596"] * 3, "tier1_label": ["Technology & Computing"] * 3,
                         "tier1_score": [0.9] * 3, "iab_id": ["596"] * 3, "path": ["Technology & Computing"] * 3, "iab_score": [0.5] * 3,
                         "source": ["model"] * 3})
    out, applied = apply_overrides(cats, pd.Series(["1", "1", "2"]), {"a": "210", "c": None}, {"1": "123"}, source="x.yaml")
    r = out.set_index("conversation_id")
    assert r.at["a", "tier1_id"] == "210" and r.at["a", "source"] == "override_conversation"
    assert r.at["b", "tier1_id"] == "123" and r.at["b", "source"] == "override_topic"
    assert r.at["c", "tier1_label"] == NONE and pd.isna(r.at["c", "iab_id"]) and pd.isna(r.at["c", "tier1_id"])
    assert [a["conversation_id"] for a in applied] == ["a", "c"]
    bad = tmp_path / "o.yaml"
    bad.write_text("conversations:\n  abc: '99999'\n")
    with pytest.raises(TaxonomyError, match="conversation 'abc'"):
        Overrides.load(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("conversations:\n  abc: '210'\n  def: none\n")
    assert Overrides.load(ok).conversations == {"abc": "210", "def": None}


def test_topic_mix_is_the_distribution_of_its_conversations():
    c = pd.DataFrame({"topic": [1, 1, 1, 1, 2], "tier1_label": ["Careers", "Careers", "Education", None, "Travel"],
                      "path": ["Careers > Job Search > Resume Writing and Advice", "Careers > Career Advice", "Education", None, "Travel"]})
    m = topic_mix(c).set_index("topic")
    assert m.at["1", "category_mix"] == "Careers 50%; Education 25%; none 25%"
    assert m.at["1", "top_tier1_share"] == 0.5 and m.at["1", "none_share"] == 0.25 and m.at["2", "top_tier1_label"] == "Travel"
    # the tier-2 is counted among the dominant tier-1's conversations, its share over the whole topic
    assert m.at["1", "top_tier2_label"] in {"Job Search", "Career Advice"} and m.at["1", "top_tier2_share"] == 0.25
    assert pd.isna(m.at["2", "top_tier2_label"])  # a tier-1 without a tier-2 below it


def test_tier1_confusion_counts_per_label():
    per, table = tier1_confusion(["596", "596", "210", None], ["596", "210", "210", "123"])
    r = per.set_index("tier1")
    assert r.at["Technology & Computing", "labeled"] == 1 and r.at["Technology & Computing", "precision"] == 0.5
    assert r.at["Food & Drink", "recall"] == 0.5 and r.at["Food & Drink", "most_confused_with"] == "Technology & Computing (1)"
    assert r.at["Careers", "most_confused_with"] == "none (1)"
    assert table.loc["Food & Drink"].sum() == 2


def test_readable_label_is_tier2_key_phrases_and_the_dominant_category():
    info = pd.DataFrame({"topic": [1, 2, 3], "label": ["1_line_add", "2_x", "3_y"],
                         "keywords": [["line", "cover letter", "job description", "letters", "interview"], ["src", "flask", "app", "x_train"],
                                      []],
                         "representation": [None, [], None]})
    cats = pd.DataFrame({"topic": [1, 1, 1, 2, 3], "tier1_label": ["Careers", "Careers", "Education", "Technology & Computing", None],
                         "path": ["Careers > Job Search", "Careers > Job Search", "Education", "Technology & Computing", None]})
    r = readable_labels(info, topic_mix(cats)).set_index("topic")["readable_label"]
    # multi-word phrases first; "letters" adds nothing after "cover letter"; "line" comes after the phrases
    assert r["1"] == "Job Search: cover letter, job description, line (Careers 67%)"
    assert r["2"] == "src, flask, app (Technology & Computing 100%)"  # "x_train" (code-like) dropped
    assert r["3"] == "3_y (none 100%)"  # no words: the topic's own label
    # the name alone, without the tier-1 tail (what the stakeholder summary shows)
    n = readable_labels(info, topic_mix(cats)).set_index("topic")["readable_name"]
    assert n.to_dict() == {"1": "Job Search: cover letter, job description, line", "2": "src, flask, app", "3": "3_y"}


def test_readable_labels_are_built_from_aggregates_only():
    """A label holds only the topic's ranked words, taxonomy names and shares: never a conversation's text
    (readable_labels is given no text at all), and a word the topic model did not rank never appears."""
    import inspect
    import re

    assert set(inspect.signature(readable_labels).parameters) == {"info", "mix", "n_phrases", "min_tier2_share"}
    tax = load_taxonomy()
    words = ["cover letter", "job description", "interview", "resume"]
    info = pd.DataFrame({"topic": [7], "label": ["7_cover_letter"], "keywords": [words], "representation": [None]})
    cats = pd.DataFrame({"topic": [7] * 4, "tier1_label": ["Careers"] * 3 + ["Education"],
                         "path": ["Careers > Job Search"] * 3 + ["Education"], "document": ["Dear Ms Jane Roe, jane.roe@example.com"] * 4})
    label = readable_labels(info, topic_mix(cats)).at[0, "readable_label"]
    allowed = {w for p in words for w in p.split()} | {w for n in tax["label"] for w in re.findall(r"[\w&]+", n)}
    used = set(re.findall(r"[A-Za-z&]+", label))
    assert used <= allowed, used - allowed
    assert "Jane" not in label and "example" not in label


def test_knn_and_prototype_votes_blend_into_the_probabilities_and_survive_reload(fitted, tmp_path):
    _, feats, y = fitted
    knn_only = ConversationCategorizer(backend="static", C=4.0, knn_weight=1.0, proto_weight=0.0).fit(feats.X, y)
    p = knn_only.predict_proba(feats.X)
    assert (p.columns.to_numpy()[p.to_numpy().argmax(axis=1)] == np.asarray(y)).all()  # each row's nearest is itself
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    lr_only = ConversationCategorizer(backend="static", C=4.0, knn_weight=0.0, proto_weight=0.0).fit(feats.X, y)
    blend = ConversationCategorizer(backend="static", C=4.0, knn_weight=0.35).fit(feats.X, y)  # proto_weight 0.2 by default
    proto = blend._proto_proba(feats.X)
    np.testing.assert_allclose(proto.sum(axis=1), 1.0, rtol=1e-9)
    # the taxonomy vote alone knows code from recipes from job hunting
    by = dict(zip(blend.classes, proto.T))
    assert by["596"][0] > by["210"][0] and by["210"][4] > by["596"][4] and by["123"][8] > by["210"][8]
    np.testing.assert_allclose(blend.predict_proba(feats.X).to_numpy(),
                               0.8 * (0.65 * lr_only.predict_proba(feats.X).to_numpy() + 0.35 * p.to_numpy()) + 0.2 * proto,
                               rtol=1e-5, atol=1e-7)
    back = ConversationCategorizer.load(blend.save(tmp_path / "b.npz"))
    assert back.knn_weight == 0.35 and back.knn_vectors.shape == blend.knn_vectors.shape
    assert back.proto_weight == 0.2 and len(back.proto_labels) == len(blend.proto_labels) > 37  # guide lines + described nodes
    pd.testing.assert_frame_equal(back.predict_proba(feats.X), blend.predict_proba(feats.X), rtol=1e-5)


def test_topic_tier1_mix_is_an_aggregate_with_small_cells_hidden():
    from analysis.mapping.result import AdMappingResult

    # topic 1: 30 users, 20 Careers + 6 Education + 4 none; topic 2: 5 users (below k = 10); topic 3: 12 Education
    # (three topics: with two, complementary suppression would hide topic 1's counts too)
    t1 = ["Careers"] * 20 + ["Education"] * 6 + [None] * 4 + ["Travel"] * 5 + ["Education"] * 12
    cc = pd.DataFrame({"conversation_id": [f"c{i}" for i in range(47)], "topic": [1] * 30 + [2] * 5 + [3] * 12, "conv_tier1_label": t1})
    conv = pd.DataFrame({"conversation_id": cc["conversation_id"], "user_id": [f"u{i}" for i in range(47)]})
    tc = pd.DataFrame({"topic": [1, 2, 3], "topic_label": ["1_a", "2_b", "3_c"], "readable_label": ["Job Search: cover letter (Careers 67%)", "x", "y"]})
    res = AdMappingResult(tc, cc, None, None, None, "", None, conv, min_cell_users=10)
    m = res.topic_tier1_mix(top=2).set_index("topic")
    assert list(m.columns) == ["readable_label", "conversations", "users", "Careers", "Education", "other", "none"]
    assert m.at["3", "Education"] == 1.0  # (its count is hidden too: complementary suppression of topic 2)
    assert m.at["1", "Careers"] == round(20 / 30, 3) and m.at["1", "conversations"] == 30
    assert pd.isna(m.at["1", "Education"]) and pd.isna(m.at["1", "none"])  # 6 and 4 conversations: fewer than k
    assert m.at["2", "conversations"] == "<10" and m.loc["2", ["Careers", "other"]].isna().all()  # Travel is "other" here
    assert list(m.index) == ["1", "3", "2"]


def test_reply_features_extend_the_row_and_survive_reload(fitted, tmp_path):
    _, base, y = fitted
    docs = [d for ds in DOCS.values() for d in ds]
    replies = [f"Sure, here is an answer about: {d}" for d in docs[:-1]] + [""]
    f = conversation_features(docs, "static", replies=replies)
    assert f.with_reply and f.X.shape[1] == base.X.shape[1] + 256
    np.testing.assert_array_equal(f.X[:, : base.X.shape[1]], base.X)  # the user-side part is unchanged
    assert not f.X[-1, base.X.shape[1]:].any()  # no reply: zeros, not the embedding of ""
    cat = ConversationCategorizer(backend="static", C=4.0, with_reply=True).fit(f.X, y)
    with pytest.raises(ValueError, match="with_reply=True"):
        cat.predict_proba(base.X)
    with pytest.raises(ValueError, match="with_reply=False"):
        ConversationCategorizer(backend="static").fit(f.X, y)
    back = ConversationCategorizer.load(cat.save(tmp_path / "r.npz"))
    assert back.with_reply and back.knn_vectors.shape[1] == 3 * 256  # kNN on head, segment mean and reply
    pd.testing.assert_frame_equal(back.predict_proba(f.X), cat.predict_proba(f.X), rtol=1e-5)
