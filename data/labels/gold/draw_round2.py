"""Round 2 of the gold set: enrich the rare Art. 9 categories, extend the frozen split, blind packets.

    CHAT_AD_AUDIT_CACHE=/work/cache PYTHONPATH=<code at d4e625e> .venv/bin/python data/labels/gold/draw_round2.py draw
    ... draw_round2.py packets /work/labeling

A frozen record like draw_gold.py: it runs only on the code of d4e625e (`git worktree add /tmp/gold
d4e625e`), whose module names and detector its strata depend on.

Round 1 (draw_gold.py) found few positives for ethnicity, sexual orientation, philosophical beliefs
and trade union; issue 15 wants >= 60 per category the corpus holds. Round 2 draws ~430 more
conversations from the same pool (the corpus minus everything labeled, >= 5 words of prose after
`clean_text`), aimed at those four categories, with scorers fitted on round-1 **train** labels only:

- `r2lex:<cat>`: the broad regexes R2LEX (false friends such as "European Union", "credit union",
  "race condition", "caster", "content syndication", "account lockout", "came out to $5" excluded
  by construction, checked on the matched terms); random among the TOP_FACTOR x quota with most matches;
- `r2score:<cat>`: class-weighted logistic regression (one-vs-rest) on MiniLM embeddings of the
  cleaned user side (first EMBED_CHARS characters); random among the TOP_FACTOR x quota highest;
- `r2nn:<cat>`: max cosine to the category's anchors (train positives, positives of the 578 older
  labels, and SEEDS: short descriptions of the category, because trade union has a single positive);
  random among the TOP_FACTOR x quota nearest;
- `r2random`: a simple random sample of the pool, so that labelers do not see only candidates.

A stratum short of candidates passes its remainder to the next one of the category (lexicon ->
score -> nn; the lexicon goes first because its few explicit hits are the likeliest positives).
`draw` rewrites split.csv as the round-1 rows plus the round-2 rows: a conversation of a chat
already in split.csv takes that chat's split; the rest go 35% test per stratum (seeded), grouped
by chat. `packets` gives the round-2 conversations to labelers L7 and L8 (DOUBLE_SHARE read
by both, adjudicator one of L1-L6) under item ids continuing after round 1, and appends them to
OUT_DIR/key.csv. No conversation text leaves this script except into OUT_DIR (outside the repo).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.sensitive import SensitiveDetector, clean_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from draw_batch2 import HEAD, WINDOW  # noqa: E402  (same excerpt shape as rounds before)
from draw_gold import ASSIST_CHARS, ASSIST_IF_SHORT, TEST_SHARE, chat_of, corpus, existing_labels, group_by_chat  # noqa: E402

SEED = 20261201
BACKEND = "minilm"
EMBED_CHARS = 2000  # MiniLM reads 256 word pieces anyway; the same text lets others reuse the cached vectors
TARGETS = ("ethnicity", "sexual_orientation", "philosophical_beliefs", "trade_union")
QUOTA = {"ethnicity": 110, "sexual_orientation": 110, "philosophical_beliefs": 80, "trade_union": 80}
N_RANDOM = 40
TOP_FACTOR = 3
ROUND1_ITEMS = 2041  # round-2 item ids start at g2042
LABELERS = ["L7", "L8"]
ADJUDICATORS = [f"L{k}" for k in range(1, 7)]
DOUBLE_SHARE = 0.16

_I = re.I
R2LEX = {
    "ethnicity": re.compile(
        r"\bracis[mt]s?\b|\bracial\w*|\bethnic\w*|\bbiracial\b|\bmixed[- ]race\b|\brace (?:relations|and ethnicity|-?based)\b"
        r"|\b(?:my|his|her|their|of any|people of) race\b|\bpeople of colou?r\b|\bbipoc\b"
        r"|\bblack (?:people|americans?|women|woman|men|man|community|communities|lives matter|history|culture|folks?|students?|families)\b"
        r"|\bafrican[- ]americans?\b|\blatin[oax]s?\b|\bhispanics?\b|\basian[- ]americans?\b|\banti-?asian\b"
        r"|\bindigenous\b|\bnative americans?\b|\baboriginal\b|\bfirst nations\b|\bdiaspora\w*|\bheritage\b|\bancestry\b"
        r"|\bcaste(?:s|ism|ist)?\b|\bdalits?\b|\bxenophob\w*|\banti-?semit\w*|\bwhite (?:supremac\w*|privilege|people|nationalis\w*)\b"
        r"|\bsegregation\b|\bapartheid\b|\bjim crow\b|\bslavery\b|\brohingya\b|\buyghurs?\b|\bkurds?\b|\bgenocide\b"
        r"|\bimmigrant (?:experience|famil\w+|communit\w+|identity)\b|\bsecond[- ]generation\b|\bethnicity\b", _I),
    "sexual_orientation": re.compile(
        r"\bgays?\b|\blesbians?\b|\bbisexual\w*|\blgbt\w*|\bqueer\w*|\btrans(?:gender|sexual)\w*"
        r"|\btrans (?:women|woman|men|man|people|person|kids?|youth|rights)\b|\bnon-?binary (?:people|person|identity|gender|folks?|individuals?)\b"
        r"|\bnonbinary\b|\b(?:coming|came|come) out (?:as (?:gay|lesbian|bi\w*|trans\w*|queer|non-?binary|ace|asexual)|of the closet|to (?:my|his|her|their|our|your) (?:parents|family|friends|mom|mother|dad|father|sister|brother|wife|husband))\b|\bin the closet\b"
        r"|\bsame[- ]sex\b|\bhomosexual\w*|\bheterosexual\w*|\bsexual orientation\b|\bgender identity\b|\bpansexual\w*|\basexual\w*"
        r"|\bhomophob\w*|\btransphob\w*|\bpride (?:month|parade|flag|march)\b|\bdrag (?:queens?|kings?|shows?)\b|\bgender[- ]affirming\b"
        r"|\bgender dysphoria\b|\bmy (?:husband|boyfriend) and i are both men\b|\bmy (?:wife|girlfriend) and i are both women\b", _I),
    "philosophical_beliefs": re.compile(
        r"\batheis[mt]s?\b|\bagnosticism\b|\b(?:an|am|i'?m|was|be|being|as) agnostics?\b(?! (?:to|of|about|and))"
        r"|\bveganism\b|\bvegan (?:ethic\w*|lifestyle|philosophy|values|activis\w*|movement)\b|\b(?:am|i'?m|as a|became|went|go|going|turned) vegan\b"
        r"|\banimal rights\b|\bsecular humanis\w*|\bhumanis[mt]s?\b|\bsecularism\b|\bpacifis[mt]\w*|\bconscientious objector\w*"
        r"|\bstoicism\b|\bthe stoics\b|\bstoic (?:philosophy|principles|way of life|teachings|practice|mindset)\b"
        r"|\bnihilis[mt]\w*|\banti-?natalis[mt]\w*|\beffective altruis[mt]\w*|\bexistentialis[mt]\w*|\babsurdism\b|\butilitarianism\b"
        r"|\bobjectivism\b|\btranshumanis[mt]\w*|\bfreethinker\w*|\bworld ?view\b|\b(?:my|personal|life) philosophy\b"
        r"|\bphilosophy of life\b|\bmeaning of life\b|\bfree will\b|\bmoral (?:convictions?|beliefs?|values)\b", _I),
    "trade_union": re.compile(
        r"\b(?:labou?r|trade|workers'?|teachers'?|nurses'?|employees'?|staff|tenants'?|auto ?workers'?|public[- ]sector|police|industrial|craft)"
        r" unions?\b|\bunioni[sz]\w*|\bunion (?:members?|membership|dues|reps?|representatives?|leaders?|leadership|organi[sz]\w*|contracts?"
        r"|busting|stewards?|officials?|drive|elections?|workers|jobs|halls?|meetings?|negotiat\w*|grievances?)\b|\bnon-?union\b|\banti-?union\b"
        r"|\bcollective(?:ly)? bargain\w*|\bcollective (?:labou?r )?agreements?\b|\bpicket\w*|\bshop stewards?\b|\bafl-cio\b|\bteamsters?\b"
        r"|\b(?:on|general|labou?r|workers'?|national|teachers'?|nurses'?|wildcat|rail|writers'?) strikes?\b|\bstrike (?:action|ballot|pay|fund|vote)\b"
        r"|\bstrik(?:ing|ers) (?:workers|employees|teachers|nurses|staff|writers|actors)\b|\bsag-aftra\b|\bwriters guild\b|\bnlrb\b"
        r"|\bnational labou?r relations\b|\bunfair labou?r practices?\b|\blabou?r movement\b|\bworks council\b"
        r"|gewerkschaft\w*|\bsindicat\w*|\bsyndicalis\w*|工会|工會|노동조합|労働組合", _I),
}
SEEDS = {
    "ethnicity": ["racism and racial discrimination against Black people", "my ethnic heritage and identity as a second-generation immigrant",
                  "indigenous peoples and ethnic minorities"],
    "sexual_orientation": ["coming out as gay to my family", "LGBTQ rights and same-sex marriage", "transgender identity and gender transition"],
    "philosophical_beliefs": ["I am an atheist and do not believe in god", "veganism as an ethical conviction about animal rights",
                              "stoicism as my philosophy of life"],
    "trade_union": ["workers organizing a labor union at their workplace", "the union is negotiating a collective bargaining agreement",
                    "employees went on strike and formed a picket line"],
}


def lex_hits(text: str, cat: str) -> int:
    return len(R2LEX[cat].findall(text))


def round1_split() -> pd.DataFrame:
    s = pd.read_csv(HERE / "split.csv", dtype=str)
    return s[~s["stratum"].str.startswith("r2")].reset_index(drop=True)


def train_labels(split1: pd.DataFrame) -> pd.DataFrame:
    """Round-1 train conversations, one bool column per target: positive if any reading says so."""
    raw = pd.read_csv(HERE / "labels_raw.csv", dtype=str, keep_default_na=False)
    train = set(split1.loc[split1["split"] == "train", "conversation_id"])  # split.csv is authoritative (regrouped by chat)
    raw = raw[raw["conversation_id"].isin(train)]
    cats = raw["art9"].str.split(";")
    pos = pd.DataFrame({c: cats.map(lambda s, c=c: c in s) for c in TARGETS}).groupby(raw["conversation_id"]).any()
    return pos


def draw() -> pd.DataFrame:
    from sklearn.linear_model import LogisticRegression

    from analysis.embeddings import get_embedder

    split1 = round1_split()
    docs, _, _ = corpus()
    old = existing_labels()
    clean = docs.map(clean_text)
    done = set(split1["conversation_id"]) | set(old["conversation_id"])
    pool = clean[~clean.index.isin(done) & (clean.map(lambda s: len(s.split())) >= 5)]
    ytr = train_labels(split1)
    print(f"{len(docs)} conversations; pool {len(pool)}; round-1 train conversations {len(ytr)}; "
          f"train positives: {ytr.sum().to_dict()}")
    emb = get_embedder(BACKEND)
    vec = emb.encode([t[:EMBED_CHARS] for t in pool])
    xtr = emb.encode([clean.get(c, "")[:EMBED_CHARS] for c in ytr.index])
    old_vec = emb.encode([clean.get(c, "")[:EMBED_CHARS] for c in old["conversation_id"]])
    print(f"embedded ({emb.model_id}): {emb.stats.computed} computed, {emb.stats.cached} from cache, {emb.stats.seconds:.0f} s")

    rng = np.random.default_rng(SEED)
    picked: dict[str, str] = {}
    notes: list[str] = []

    def take(stratum: str, ranked: pd.Series, n: int) -> int:
        """Random n among the TOP_FACTOR x n best-ranked candidates not yet picked (ranked > 0 only)."""
        cand = [i for i in ranked[ranked > 0].sort_values(ascending=False, kind="stable").index if i not in picked][: TOP_FACTOR * n]
        k = min(n, len(cand))
        for cid in (rng.choice(np.array(cand, dtype=object), size=k, replace=False) if k else []):
            picked[cid] = stratum
        if k < n:
            notes.append(f"{stratum}: {len(cand)} candidates for {n}")
        return k

    take("r2random", pd.Series(1.0, index=pool.index), N_RANDOM)  # all tied: a simple random sample
    for c in TARGETS:
        q = QUOTA[c]
        parts = [q // 3, q // 3, q - 2 * (q // 3)]
        # lexicon first: the scarce explicit hits are the likeliest positives, so a short lexicon
        # stratum is taken whole and passes its remainder on (lexicon -> score -> nn)
        hits = pool.map(lambda t, c=c: lex_hits(t, c)).astype(float)
        carry = parts[0] - take(f"r2lex:{c}", hits, parts[0])
        y = ytr[c].to_numpy()
        if y.sum() >= 2:
            lr = LogisticRegression(class_weight="balanced", C=1.0, max_iter=2000).fit(xtr, y)
            score = pd.Series(lr.predict_proba(vec)[:, 1], index=pool.index)
            carry = parts[1] + carry - take(f"r2score:{c}", score, parts[1] + carry)
        else:
            notes.append(f"r2score:{c}: {int(y.sum())} train positive(s), no model; {parts[1] + carry} passed on")
            carry = parts[1] + carry
        anchors = np.vstack([xtr[y], old_vec[old["art9"].map(lambda s, c=c: c in s).to_numpy()], emb.encode(SEEDS[c])])
        nn = pd.Series((vec @ anchors.T).max(axis=1), index=pool.index)
        print(f"{c}: {int((hits > 0).sum())} pool conversations with a lexicon hit; {len(anchors)} nn anchors ({int(y.sum())} train positives)")
        take(f"r2nn:{c}", nn, parts[2] + carry)

    out = pd.DataFrame({"conversation_id": list(picked), "stratum": list(picked.values())})
    for n in notes:
        print("short:", n)
    return assign_split(out, split1)


def assign_split(drawn: pd.DataFrame, split1: pd.DataFrame) -> pd.DataFrame:
    """A chat already in round 1 keeps its split; the rest TEST_SHARE test per stratum, then grouped by chat."""
    rng = np.random.default_rng(SEED + 1)
    drawn = drawn.sort_values(["stratum", "conversation_id"]).reset_index(drop=True)
    split = pd.Series("train", index=drawn.index)
    for _, g in drawn.groupby("stratum", sort=True):
        split[rng.permutation(g.index.to_numpy())[: int(round(TEST_SHARE * len(g)))]] = "test"
    drawn["split"] = split
    drawn = group_by_chat(drawn)
    known = split1.assign(chat=chat_of(split1["conversation_id"])).groupby("chat")["split"].agg(set)
    if (known.map(len) > 1).any():
        raise ValueError(f"split.csv: chats in both splits: {list(known[known.map(len) > 1].index[:5])}")
    chat = chat_of(drawn["conversation_id"])
    inherit = chat.map(known.map(lambda s: next(iter(s))))
    drawn["split"] = inherit.fillna(drawn["split"])
    print(f"{int(inherit.notna().sum())} round-2 conversations belong to a round-1 chat and take its split")
    return drawn



def excerpt(text: str, det: SensitiveDetector) -> str:
    """draw_batch2.excerpt's shape, with windows around the shipped lexicon's and R2LEX's hits (for every item alike)."""
    t = clean_text(text)
    if len(t) <= HEAD + 400:
        return t
    out = [t[:HEAD]]
    neut = det.lexicon.neutralize(t)
    spans = [m.start() for c in det.cats for rx in det.lexicon._strong[c] + det.lexicon._weak[c] for m in rx.finditer(neut, HEAD)]
    spans += [m.start() for rx in R2LEX.values() for m in rx.finditer(t, HEAD)]
    last = HEAD
    for s in sorted(spans)[:60]:
        if s < last:
            continue
        a, b = max(last, s - WINDOW), min(len(t), s + WINDOW)
        out.append("[...] " + t[a:b])
        last = b
        if len(out) > 6:
            break
    out.append(f"[... {len(t)} characters in all]")
    return "\n".join(out)


def assign_readers(ids: list[str], rng: np.random.Generator) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Both of L7/L8 read DOUBLE_SHARE (adjudicator: one of L1-L6, balanced); the rest alternate."""
    order = list(rng.permutation(ids))
    n_double = int(round(DOUBLE_SHARE * len(ids)))
    readers = {cid: list(LABELERS) for cid in order[:n_double]}
    adjudicator = {cid: ADJUDICATORS[k % len(ADJUDICATORS)] for k, cid in enumerate(order[:n_double])}
    for k, cid in enumerate(order[n_double:]):
        readers[cid] = [LABELERS[k % len(LABELERS)]]
    return readers, adjudicator


def packets(out_dir: str) -> None:
    out = Path(out_dir)
    split = pd.read_csv(HERE / "split.csv", dtype=str)
    r2 = split[split["stratum"].str.startswith("r2")].reset_index(drop=True)
    if r2.empty:
        raise SystemExit("split.csv has no round-2 rows: run `draw` first")
    key_path = out / "key.csv"
    key1 = pd.read_csv(key_path, dtype=str, keep_default_na=False)
    key1 = key1[key1["item_id"].str[1:].astype(int) <= ROUND1_ITEMS]  # rerunnable: round-1 rows only
    if len(key1) != ROUND1_ITEMS or key1["conversation_id"].isin(r2["conversation_id"]).any():
        raise SystemExit(f"{key_path}: expected the {ROUND1_ITEMS} round-1 items and none of round 2")
    docs, _, assistant = corpus()
    det = SensitiveDetector(backend="student")  # its lexicon (with R2LEX) marks the excerpt's windows
    rng = np.random.default_rng(SEED + 2)
    ids = r2["conversation_id"].tolist()
    item = dict(zip(rng.permutation(ids), (f"g{k:04d}" for k in range(ROUND1_ITEMS + 1, ROUND1_ITEMS + 1 + len(ids)))))
    readers, adjudicator = assign_readers(ids, rng)
    key2 = r2.assign(item_id=r2["conversation_id"].map(item),
                     labelers=r2["conversation_id"].map(lambda c: ";".join(readers[c])),
                     adjudicator=r2["conversation_id"].map(lambda c: adjudicator.get(c, "")))
    key2 = key2[list(key1.columns)].sort_values("item_id")
    pd.concat([key1, key2], ignore_index=True).to_csv(key_path, index=False)
    for who in LABELERS:
        mine = key2[key2["labelers"].str.split(";").map(lambda r, w=who: w in r)]
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
    n2 = int((key2["labelers"].str.count(";") > 0).sum())
    print(f"{len(key2)} round-2 conversations ({key2['item_id'].min()}..{key2['item_id'].max()}), {n2} read twice; "
          f"adjudicators {key2.loc[key2['adjudicator'] != '', 'adjudicator'].value_counts().sort_index().to_dict()} -> {key_path}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["draw"]:
        split1 = round1_split()
        drawn = draw()
        pd.concat([split1, drawn[["conversation_id", "stratum", "split"]]], ignore_index=True).to_csv(HERE / "split.csv", index=False)
        tab = drawn.groupby("stratum")["split"].value_counts().unstack(fill_value=0)
        tab["n"] = tab.sum(axis=1)
        print(tab.to_string())
        print(f"round 2 total {len(drawn)}: test {int((drawn.split == 'test').sum())}, train {int((drawn.split == 'train').sum())}")
    elif argv[:1] == ["packets"] and len(argv) == 2:
        packets(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
