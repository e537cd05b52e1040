"""The sensitive-topic detector: lexicon false alarms, text handling, validation statistics, and the
done-criterion on a simulated world (precision and recall >= 0.90 for every category)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from analysis.contract.art9 import ART9, label_matrix
from analysis.contract.settings import MappingSettings
from analysis.detector.evaluation import evaluate_detector
from analysis.detector.features import LexiconDetector, head_columns, reply_columns
from analysis.detector.model import DetectorParams, FitOptions, SensitiveDetector, choose_threshold
from analysis.detector.text import clean_text, segments
from analysis.ingest.conversations import build_conversations
from analysis.mapping.refit import detect_with_refit
from analysis.util.embeddings import STUDENT, embed


@pytest.fixture(scope="module")
def lex():
    return LexiconDetector()


# Everyday text that keyword filters classically flag: none of it may produce a strong hit.
FALSE_ALARMS = [
    "I think I have a race condition between two threads, how do I debug it",
    "write a SQL UNION query that combines customers and suppliers",
    "SELECT id FROM a UNION ALL SELECT id FROM b",
    "how do I add a health check endpoint to my flask app",
    "the /healthz liveness probe keeps failing in kubernetes",
    "I added god mode in my game engine for testing, how do I disable it in release builds",
    "how do I set up master/slave replication in postgres",
    "how do I kill the child process when the parent exits",
    "plan a birthday party for my 8 year old with party games",
    "we want a Christmas trip to Vienna, any Christmas market tips",
    "write an essay on the Great Depression and the New Deal economy",
    "explain a bipolar junction transistor amplifier",
    "the library is platform agnostic and operating system agnostic",
    "what is the union of two sets in python? use set.union",
    "explain unions and anonymous unions in C++",
    "compare a credit union and a bank for my savings",
    "summarize the European Union customs rules for cars",
    "the Union army won at Gettysburg",
    "oh my god this bug is driving me crazy, thank god for git",
    "diagnose the error in this network connection",
    "the symptoms of a bad database design",
    "my horoscope says Cancer season is lucky",
    "at the consumer's election the award may be doubled",
    "our party size is 6 for the restaurant booking, third party cookies too",
    "the button is disabled until the form is valid",
    "this is the holy grail of productivity apps",
    "play devil's advocate on my startup idea",
    "what is sin(x) and cos(x) for x = pi",
]

# Clear statements that the lexicon must catch (category, text).
TRUE_HITS = [
    ("health", "I was diagnosed with type 2 diabetes last month"),
    ("health", "my therapist thinks I have ADHD"),
    ("health", "I'm 8 weeks pregnant and nauseous"),
    ("religion", "I pray five times a day and fast during Ramadan"),
    ("religion", "what does the Bible say about forgiveness"),
    ("politics", "who should I vote for in the presidential election"),
    ("politics", "write a speech against abortion restrictions"),
    ("sexual_orientation", "I'm gay and want to come out to my parents"),
    ("sexual_orientation", "we are a same-sex couple looking to adopt"),
    ("ethnicity", "a coworker made a racist joke about me"),
    ("ethnicity", "I'm biracial and feel caught between cultures"),
    ("philosophical_beliefs", "I'm an atheist and my family doesn't know"),
    ("philosophical_beliefs", "I'm a pacifist applying as a conscientious objector"),
    ("trade_union", "our union is voting on a strike next week"),
    ("trade_union", "I'm a shop steward handling a grievance, how does collective bargaining work"),
]


@pytest.mark.parametrize("text", FALSE_ALARMS)
def test_lexicon_does_not_fire_on_classic_false_alarms(lex, text):
    hits = lex.hits(text)
    assert not any(hits.strong.values()), {c: v for c, v in hits.strong.items() if v}


@pytest.mark.parametrize("category, text", TRUE_HITS)
def test_lexicon_catches_clear_statements(lex, category, text):
    hits = lex.hits(text)
    assert hits.strong[category], hits.strong
    assert [c for c, v in hits.strong.items() if v] == [category]


def test_a_false_alarm_phrase_does_not_hide_a_real_mention(lex):
    h = lex.hits("fix the race condition in my code. also, I was diagnosed with cancer and I'm scared")
    assert h.strong["health"] and not h.strong["ethnicity"]


def test_code_and_urls_are_dropped_before_detection():
    text = "why does this fail?\n```python\nimport os\nprint('pray for me')\n```\nsee https://example.com/god\nx = foo(bar); y = {1: 2}"
    c = clean_text(text)
    assert "import" not in c and "example.com" not in c and "foo(bar)" not in c and "why does this fail?" in c
    long = " ".join(["This is a sentence about nothing much at all."] * 40)
    segs = segments(long, max_words=60)
    assert all(len(s.split()) <= 60 for s in segs) and len(segs) >= 5
    assert len(segments("\n".join(f"line number {i} says hello" for i in range(100)), max_segments=10)) == 10


# ------------------------------------------------------------------------------- statistics


def test_validation_counts_and_confidence_intervals_match_statsmodels():
    rng = np.random.default_rng(3)
    n = 400
    y = rng.random((n, len(ART9))) < 0.15
    p = np.where(y, rng.random(y.shape) < 0.8, rng.random(y.shape) < 0.05)
    labels = [[c for j, c in enumerate(ART9) if y[i, j]] for i in range(n)]
    v = evaluate_detector(pd.DataFrame(p, columns=list(ART9)), labels)
    r = v.per_category.set_index("category").loc["health"]
    j = ART9.index("health")
    tp, fp = int((y[:, j] & p[:, j]).sum()), int((~y[:, j] & p[:, j]).sum())
    fn, tn = int((y[:, j] & ~p[:, j]).sum()), int((~y[:, j] & ~p[:, j]).sum())
    assert (r.tp, r.fp, r.fn, r.tn) == (tp, fp, fn, tn)
    assert r.precision == pytest.approx(tp / (tp + fp)) and r.recall == pytest.approx(tp / (tp + fn))
    assert (r.recall_low, r.recall_high) == pytest.approx(proportion_confint(tp, tp + fn, method="wilson"))
    assert (r.specificity_low, r.specificity_high) == pytest.approx(proportion_confint(tn, tn + fp, method="wilson"))
    assert r.f1_low < r.f1 < r.f1_high
    m = v.micro.iloc[0]
    assert m.tp == int((y & p).sum()) and m.fp == int((~y & p).sum())
    dv = v.detector_validation()
    assert list(dv.columns[:5]) == ["category", "tp", "fn", "tn", "fp"] and len(dv) == len(ART9)
    # confusion: the 'none' row counts unlabeled conversations by what was flagged
    none_none = int(((~y).all(axis=1) & (~p).all(axis=1)).sum())
    assert v.confusion.loc["none", "none"] == none_none


def test_recall_ci_covers_the_true_sensitivity_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    cover = 0
    for _ in range(300):
        y = rng.random((150, 1)) < 0.3
        p = np.where(y, rng.random(y.shape) < 0.85, rng.random(y.shape) < 0.02)
        v = evaluate_detector(pd.DataFrame(p, columns=["health"]), [["health"] if t else [] for t in y[:, 0]], n_boot=1)
        r = v.per_category.iloc[0]
        cover += r.recall_low <= 0.85 <= r.recall_high
    assert 0.91 <= cover / 300 <= 0.99


def test_threshold_choice_separates_and_sits_between_scores():
    s = np.array([0.1, 0.2, 0.35, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    t = choose_threshold(s, y)
    assert 0.35 < t <= 0.6
    assert label_matrix([["health"], [], ["trade_union", "health"]]).sum() == 3


def test_shipped_defaults_load_for_both_backends():
    for b in ("minilm", "minilm_user_side", "student", "student_user_side"):
        p = DetectorParams.load(None, b)
        assert set(p.thresholds) == set(ART9) and p.fitted_on
    with pytest.raises(KeyError, match="fit on labels"):
        DetectorParams.load(None, "no-such-backend")
    # the untrained static model's entry is gone (the trained student is the fast detector): asking for it says what to use
    with pytest.raises(KeyError, match=r"backend 'static' in .*detector_default\.json .*removed in session 9.*use 'student'"):
        SensitiveDetector(backend="static")
    with pytest.raises(ValueError, match=r"detector_backend='static'.*use 'student' \(or 'minilm'"):
        MappingSettings(detector_backend="static")
    assert MappingSettings(detector_backend=STUDENT).detector_backend == STUDENT


# -------------------------------------------------------------------------- cross-fitting


def to_fit(fitting: FitOptions | None = None) -> SensitiveDetector:
    """A detector on the fast `student` embeddings with unfitted params (user-side features only: no head, reply
    or vote), for the fits below to replace every part of."""
    return SensitiveDetector(backend=STUDENT, params=DetectorParams.unfitted(STUDENT, list(ART9)), fitting=fitting)


@pytest.fixture(scope="module")
def small_labeled(small_world):
    """The small world's conversations, all labeled with the simulator's truth, user-side features on the student."""
    conv = build_conversations(small_world.messages, small_world.users)
    truth = small_world.conversation_truth.set_index("conversation_id").loc[conv["conversation_id"], "art9"].reset_index(drop=True)
    det = to_fit()
    docs = conv["document"].tolist()
    return docs, truth, det.features(docs)


def test_cross_fit_judges_each_fold_without_its_labels(small_labeled):
    """Relabeling fold 0 changes nothing about fold 0's out-of-fold scores and flags (its detector and
    the thresholds it uses never saw fold 0's labels), but it does change the other folds'."""
    docs, truth, feats = small_labeled
    folds = np.arange(len(docs)) % 4
    kw = dict(features=feats)
    fitting = FitOptions(min_head_positives=10, seed=1)
    a = to_fit(fitting).cross_fit(docs, truth, folds, **kw)
    assert len(a.scores) == len(docs) and set(a.params.heads) == set(ART9)
    assert all("cross-fitted" in v for v in a.params.notes["thresholds"].values())
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    f0 = np.flatnonzero(folds == 0)
    noisy.iloc[f0] = [list(rng.choice(list(ART9), 1)) if rng.random() < 0.5 else [] for _ in f0]
    b = to_fit(fitting).cross_fit(docs, noisy, folds, **kw)
    np.testing.assert_array_equal(a.scores.to_numpy()[f0], b.scores.to_numpy()[f0])
    np.testing.assert_array_equal(a.flags.to_numpy()[f0], b.flags.to_numpy()[f0])
    assert not np.array_equal(a.scores.to_numpy()[folds != 0], b.scores.to_numpy()[folds != 0])
    assert a.params.thresholds != b.params.thresholds
    # the fits run on threads: the number of them changes nothing
    c = to_fit(fitting).cross_fit(docs, truth, folds, workers=1, **kw)
    np.testing.assert_array_equal(a.scores.to_numpy(), c.scores.to_numpy())
    assert a.params.to_dict() == c.params.to_dict()
    with pytest.raises(ValueError, match="at least 2 folds"):
        to_fit(fitting).cross_fit(docs, truth, np.zeros(len(docs), dtype=int), **kw)


def test_cross_fit_falls_back_to_the_nested_search_for_a_rare_category(small_labeled):
    """A category with heads on all labels but too few positives once two folds are left out gets its
    thresholds from the nested 5-fold search, and still a head."""
    docs, truth, feats = small_labeled
    folds = np.arange(len(docs)) % 3
    n_tu = int(truth.map(lambda v: "trade_union" in list(v)).sum())
    # heads need n_tu positives on all labels, so the folds' (2/3) and pairs' (1/3) training rows lack them
    cf = to_fit(FitOptions(min_head_positives=n_tu, seed=1)).cross_fit(docs, truth, folds, features=feats)
    assert "trade_union" in cf.params.heads
    assert "nested" in cf.params.notes["thresholds"]["trade_union"]


def test_refit_cross_predicts_unlabeled_conversations_with_their_folds_model(small_labeled):
    """Stage 02's refit with cv_folds > 1 scores an unlabeled conversation by the detector of the fold its
    id hashes to: a copy of a labeled conversation (same text) hashing to that one's fold gets exactly its
    out-of-fold score and flags; a copy hashing to another fold is scored by another fold's detector.
    The all-labels detector is kept as `detection.params` but scores none of them."""
    from analysis.mapping.labels import id_hash

    docs, truth, _ = small_labeled
    n, K = 450, 3
    s = MappingSettings(fit_detector=True, cv_folds=K, min_labels_to_fit=10, seed=5)
    lab_ids = pd.Series([f"L{i}" for i in range(n)])
    lab_fold = (id_hash(lab_ids, s.seed) * K).astype(int)
    # per labeled conversation, an unlabeled copy in its fold and one in the next fold (ids searched by hash)
    cand = pd.Series([f"U{i}" for i in range(20 * n)])
    cand_fold = (id_hash(cand, s.seed) * K).astype(int)
    pools = {k: list(cand[cand_fold == k]) for k in range(K)}
    same = [pools[k].pop() for k in lab_fold]
    other = [pools[(k + 1) % K].pop() for k in lab_fold]
    conv = pd.DataFrame({"conversation_id": list(lab_ids) + same + other, "document": docs[:n] * 3})
    labels = pd.DataFrame({"conversation_id": lab_ids, "art9": truth[:n]})
    det = to_fit(FitOptions(min_head_positives=10, seed=1))
    run = detect_with_refit(det, conv, labels, s, params_source="shipped")
    sc, fl = run.detection.scores.to_numpy(), run.detection.flags.to_numpy()
    # (the copies' features are computed in other embedding batches: equal up to float32 rounding)
    np.testing.assert_allclose(sc[n:2 * n], sc[:n], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(fl[n:2 * n], fl[:n])
    assert not np.allclose(sc[2 * n:], sc[:n])
    feats = run.detection.features.iloc[:n].reset_index(drop=True)
    # the saved all-labels detector scores differently from the fold detectors and is not what scored
    full = det.detect(docs[:n], features=feats)
    assert run.detection.params is det.params and not np.allclose(full.scores.to_numpy(), sc[:n])
    assert "cross-prediction" in run.params_source and run.validation is not None


def test_heads_read_the_head_vector_and_first_reply_when_fitted_with_them(small_world, small_labeled, tmp_path):
    """Head-vector and reply columns join the heads' input; the params record it, reload with it, score
    texts and replies like the precomputed features, and refuse features of the other kind."""
    docs, truth, feats = small_labeled
    conv = build_conversations(small_world.messages, small_world.users)
    replies = conv["first_reply"].tolist()
    det = to_fit(FitOptions(min_head_positives=10, seed=1))
    fr = pd.concat([feats, head_columns(docs, STUDENT), reply_columns(replies, STUDENT)], axis=1)
    assert sum(c.startswith("emb__reply_") for c in fr) == sum(c.startswith("emb__head_") for c in fr) == embed(["x"], STUDENT).shape[1]
    det.cross_fit(docs, truth, np.arange(len(docs)) % 3, features=fr)
    assert det.params.with_reply and det.params.with_head and det.params.heads
    again = SensitiveDetector.load(det.save(tmp_path / "r.json"))
    assert again.params.with_reply and again.params.with_head
    a, b = det.detect(docs, features=fr), again.detect(docs, replies=replies)
    np.testing.assert_allclose(a.scores.to_numpy(), b.scores.to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="head columns"):
        again.detect(docs, features=feats)
    # no replies at all: zeros in their place, the user side still scores
    assert again.detect(docs[:5]).scores.notna().all().all()
    # ... unless the params file has the user-side fit beside it (`<backend>_user_side`): it scores them, as the
    # shipped file's does for its own entry
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"student": det.params.to_dict(), "student_user_side": DetectorParams.load(None, "student_user_side").to_dict()}))
    d = SensitiveDetector(backend=STUDENT, params=both)
    assert not d.user_side_params().with_reply
    np.testing.assert_array_equal(d.detect(docs[:20]).scores.to_numpy(), SensitiveDetector(backend=STUDENT).detect(docs[:20]).scores.to_numpy())



def test_a_corpus_without_replies_gets_the_user_side_entry_of_an_explicit_params_file(small_labeled, tmp_path):
    """One rule for "no replies" in `detect` and in stage 02's `detect_with_refit`: params that read the
    first reply, loaded from a file that also holds `<backend>_user_side`, score a corpus without replies
    with that entry, and the detection carries it (stage 02 saves `detection.params`); a file of one
    parameter set has none, so zeros stand in and a note says so."""
    docs = small_labeled[0][:40]
    user = DetectorParams.load(None, "student_user_side")
    assert user.with_head and user.vote and not user.with_reply
    rep = DetectorParams.from_dict(json.loads(json.dumps(user.to_dict())))
    rep.with_reply = True
    dims, n_vote = embed(["x"], STUDENT).shape[1], len(user.vote["names"])
    for h in rep.heads.values():  # reply columns (after the segments' and head's vectors, before the vote and 35 design columns) that weigh nothing
        at = len(h["mean"]) - 35 - n_vote
        for k, v in (("mean", 0.0), ("scale", 1.0), ("coef", 0.0)):
            h[k] = h[k][:at] + [v] * dims + h[k][at:]
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"student": rep.to_dict(), "student_user_side": user.to_dict()}))
    flat = rep.save(tmp_path / "flat.json")
    conv = pd.DataFrame({"conversation_id": [f"c{i}" for i in range(len(docs))], "document": docs, "first_reply": [" "] * len(docs)})
    s = MappingSettings(fit_detector=False)
    run = detect_with_refit(SensitiveDetector(backend=STUDENT, params=both), conv, None, s, params_source="both.json")
    assert run.detection.params.to_dict() == user.to_dict() and "user-side parameters (`student_user_side`" in run.notes[0]
    direct = SensitiveDetector(backend=STUDENT, params=both).detect(docs)
    assert direct.params.to_dict() == user.to_dict()
    np.testing.assert_array_equal(direct.scores.to_numpy(), run.detection.scores.to_numpy())
    # with replies the file's main entry scores
    replied = detect_with_refit(SensitiveDetector(backend=STUDENT, params=both), conv.assign(first_reply="Sure, here it is."), None, s,
                                params_source="both.json")
    assert replied.detection.params.with_reply and not replied.notes
    # a file of one parameter set (as stage 02 saves them): no user-side fit, zeros in the reply's place, said
    run = detect_with_refit(SensitiveDetector(backend=STUDENT, params=flat), conv.drop(columns="first_reply"), None, s, params_source="flat.json")
    assert run.detection.params.with_reply and "no `student_user_side` entry" in run.notes[0] and str(flat) in run.notes[0]
    np.testing.assert_allclose(run.detection.scores.to_numpy(), direct.scores.to_numpy(), rtol=1e-9)

# ------------------------------------------------------------------- the simulated world




def test_detector_saves_and_loads_its_parameters(tmp_path):
    det = SensitiveDetector(backend=STUDENT)
    path = det.save(tmp_path / "params.json")
    again = SensitiveDetector.load(path)
    assert again.backend == STUDENT and again.params.to_dict() == det.params.to_dict()


def test_threshold_choice_honours_a_precision_floor_where_one_can():
    # max F1 (12/14) cuts between 0.1 and 0.2 at precision 6/8; with the floor 0.8 the best cut that
    # reaches it lies between 0.4 and 0.5 (precision 4/5, F1 8/11)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)
    assert 0.1 < choose_threshold(s, y) <= 0.2
    assert 0.4 < choose_threshold(s, y, min_precision=0.8) <= 0.5
    # no cut reaches the floor: plain max F1
    assert choose_threshold(s, ~y, min_precision=0.99) == choose_threshold(s, ~y)


def test_a_precision_floor_met_by_one_flag_at_the_top_does_not_count_under_a_recall_floor():
    # only the top cut (1 flag, 1 right) reaches precision 0.8: the floor alone keeps it (recall 1/6);
    # asking it to keep a quarter of the positives falls back to max F1 (precision 6/9, recall 1)
    s = np.arange(1, 11) / 10
    y = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=bool)
    assert choose_threshold(s, y, min_precision=0.8) > 0.9
    assert choose_threshold(s, y, min_precision=0.8, min_recall=0.25) == choose_threshold(s, y) <= 0.2
    # a cut reaching both floors is kept: the top four (precision 1, recall 4/7), not max F1's all ten
    y2 = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert 0.6 < choose_threshold(s, y2, min_precision=0.8, min_recall=0.25) <= 0.7
    assert choose_threshold(s, y2) < 0.1


def test_cross_fit_calibrates_heads_and_gives_rare_categories_the_lexicon_rule(small_labeled, tmp_path):
    """Heads carry a Platt calibration fitted on out-of-fold probabilities (calibrated scores are not the
    balanced heads' inflated ones: their mean is near the positive rate); a category below
    `min_head_positives` is scored by the lexicon rule, which survives save/load."""
    docs, truth, feats = small_labeled
    y = label_matrix(truth, ART9)
    counts = dict(zip(ART9, y.sum(axis=0)))
    rare = min(counts, key=counts.get)
    folds = np.arange(len(docs)) % 4
    det = to_fit(FitOptions(min_head_positives=counts[rare] + 1, seed=1))
    cf = det.cross_fit(docs, truth, folds, features=feats)
    assert rare in cf.params.rules and rare not in cf.params.heads
    hit = feats[f"{rare}__strong"].to_numpy() > 0
    r = cf.params.rules[rare]
    assert r["n_hit"] == hit.sum() and r["p_hit"] == pytest.approx((y[hit, ART9.index(rare)].sum() + 1) / (hit.sum() + 2))
    for c in cf.params.heads:
        assert len(cf.params.heads[c]["platt"]) == 2
        j = ART9.index(c)
        # calibrated out-of-fold scores: their mean tracks the positive rate (balanced heads' raw ones do not)
        assert abs(cf.scores[c].mean() - y[:, j].mean()) < 0.05
    path = det.save(tmp_path / "p.json")
    again = SensitiveDetector.load(path)
    a, b = det.detect(docs, features=feats), again.detect(docs, features=feats)
    np.testing.assert_array_equal(a.scores.to_numpy(), b.scores.to_numpy())
    np.testing.assert_array_equal(a.scores[rare].to_numpy(), np.where(hit, r["p_hit"], r["p_miss"]))
    assert (a.flags[rare].to_numpy() == hit).all() or r["p_hit"] <= r["p_miss"]


def test_lexicon_shortcut_finds_exactly_what_every_pattern_finds(lex):
    """The per-list alternation only skips lists that cannot match: same hits as running every pattern."""
    from analysis.detector.features import LexiconDetector

    slow = LexiconDetector()
    slow._any, slow._any_neutral = {c: None for c in slow._any}, None
    texts = [t for t in FALSE_ALARMS] + [t for _, t in TRUE_HITS] + [
        "fix the race condition in my code. also, I was diagnosed with cancer and I'm scared",
        "the Soviet Union and the european union; my union rep says the strike is on",
        "healthy recipes for my diabetic mom; a health check endpoint", "", "plain text about spreadsheets",
    ]
    assert lex.counts(texts).equals(slow.counts(texts))
    assert all(lex.hits(t) == slow.hits(t) for t in texts)
