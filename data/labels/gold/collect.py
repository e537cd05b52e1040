"""Merge the labelers' answer files into the gold set; agreement; disagreements for adjudication.

    .venv/bin/python data/labels/gold/collect.py [--dir /work/labeling] [--partial]

Reads DIR/key.csv (item_id -> conversation_id, stratum, split, labelers, adjudicator) and
DIR/labels_L<k>.csv, validates every row (errors name file, row, item, column and reason; any
error stops the run), and writes:

- data/labels/gold/labels_raw.csv: one row per reading (conversation_id, labeler, stratum, split,
  art9, self_disclosure, iab_tier1, borderline, language, note);
- data/labels/gold/agreement.csv: Cohen's kappa (sklearn) on the doubly-read conversations, per
  Art. 9 category, any-sensitive, self-disclosure and IAB tier-1, with counts;
- DIR/disagreements.md (both readings and the excerpt, for the named adjudicator) and
  DIR/adjudication.csv (an answer template, one row per disagreement; kept if it exists);
- data/labels/gold/labels.csv, once every disagreement has an adjudicated row: one row per
  conversation — the single reading, the agreed one, or the adjudicated one (GUIDELINE.md s. 6).

Round 2 (draw_round2.py) added labelers L7 and L8 and items after g2041 to the same key.csv. Round 3
(draw_round3.py) has its own folder, DIR/round3/ (key.csv, packets, answer files of L9-L12): every
DIR/round*/ subfolder holding a key.csv is read with DIR, its disagreements go to its own
disagreements.md and adjudication.csv, and agreement.csv gives kappa pooled over all double
readings (`scope` all) and per round (round from the stratum: r2* round 2, r3* round 3, else 1).

`--partial` accepts answer files that do not yet cover every item (progress checks); final
labels are then not written. `--check L3` validates only DIR's labels_L3.csv against DIR/key.csv
and writes nothing (for labelers; `--check L9 --dir /work/labeling/round3` in round 3); `--check ADJ`
validates DIR/adjudication.csv the same way (for adjudicators).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from analysis.contract.art9 import ART9
from analysis.util.taxonomy import load_taxonomy

HERE = Path(__file__).resolve().parent
COLUMNS = ["item_id", "art9", "self_disclosure", "iab_tier1", "borderline", "language", "note"]
BOOL = {"true": True, "false": False}
_LANG = re.compile(r"^(?:[a-z]{2}|und)$")
_ITEM = re.compile(r"^===== item (g\d+) \(\d+/\d+\) =====$", re.M)


class LabelError(ValueError):
    """Answer files that cannot be used; the message lists every bad cell."""


def tier1_names() -> set[str]:
    t = load_taxonomy()
    return set(t.loc[t["tier"] == 1, "label"]) | {"none"}


def read_answers(path: Path, labeler: str, key: pd.DataFrame, tiers: set[str], *, partial: bool) -> tuple[pd.DataFrame, list[str]]:
    """Validated rows of one labeler's file, plus the error messages."""
    errs: list[str] = []
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        return pd.DataFrame(), [f"{path}: cannot read: {e}"]
    if list(df.columns) != COLUMNS:
        return pd.DataFrame(), [f"{path}: header must be {','.join(COLUMNS)}, got {','.join(df.columns)}"]
    assigned = set(key.loc[key["labelers"].str.split(";").map(lambda r: labeler in r), "item_id"])
    seen: set[str] = set()
    rows = []
    for i, r in df.iterrows():
        where = f"{path.name} row {i + 2} (item {r['item_id'] or '?'})"
        item = r["item_id"].strip()
        if item not in assigned:
            errs.append(f"{where} column item_id: not an item of {labeler}'s packet")
            continue
        if item in seen:
            errs.append(f"{where} column item_id: duplicate row")
            continue
        seen.add(item)
        if all(not r[c].strip() for c in COLUMNS[1:]):
            if partial:
                continue  # not labeled yet
            errs.append(f"{where}: row not filled in")
            continue
        cats = [c.strip() for c in r["art9"].split(";") if c.strip()]
        bad = [c for c in cats if c not in ART9]
        if bad:
            errs.append(f"{where} column art9: unknown categor{'y' if len(bad) == 1 else 'ies'} {', '.join(map(repr, bad))} (allowed: {', '.join(ART9)}, ';'-separated)")
        if len(set(cats)) != len(cats):
            errs.append(f"{where} column art9: a category is repeated")
        vals = {}
        for col in ("self_disclosure", "borderline"):
            v = r[col].strip().lower()
            if v not in BOOL:
                errs.append(f"{where} column {col}: expected true or false, got {r[col]!r}")
            vals[col] = BOOL.get(v)
        if vals["self_disclosure"] and not cats:
            errs.append(f"{where} column self_disclosure: true but art9 is empty")
        tier = r["iab_tier1"].strip()
        if tier not in tiers:
            errs.append(f"{where} column iab_tier1: {tier!r} is not an IAB 3.0 tier-1 name (exact spelling) or 'none'")
        lang = r["language"].strip()
        if not _LANG.match(lang):
            errs.append(f"{where} column language: expected an ISO 639-1 code like 'en' (or 'und'), got {lang!r}")
        if len(r["note"].split()) > 12:
            errs.append(f"{where} column note: more than 12 words")
        rows.append({"item_id": item, "labeler": labeler, "art9": ";".join(c for c in ART9 if c in cats),
                     "self_disclosure": vals["self_disclosure"], "iab_tier1": tier, "borderline": vals["borderline"],
                     "language": lang, "note": r["note"].strip()})
    missing = assigned - seen
    if missing and not partial:
        errs.append(f"{path.name}: {len(missing)} of {len(assigned)} items have no row (e.g. {sorted(missing)[0]})")
    return pd.DataFrame(rows, columns=["item_id", "labeler", *COLUMNS[1:]]), errs


def round_of(stratum: pd.Series) -> pd.Series:
    """The labeling round a stratum belongs to: r2* round 2, r3* round 3, else round 1."""
    return stratum.str.extract(r"^r(\d+)", expand=False).fillna("1").map(lambda k: f"round {k}")


def agreement(raw: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa on the conversations read twice (the two independent readings): pooled over all
    rounds (`scope` all), then per round."""
    two = raw.groupby("item_id").filter(lambda g: len(g) == 2)
    rounds = round_of(two["stratum"]) if "stratum" in two else pd.Series("round 1", index=two.index)
    parts = [("all", two)] + [(r, two[rounds == r]) for r in sorted(rounds.unique())]
    frames = [_kappas(g).assign(scope=name) for name, g in parts]
    cols = ["scope", "field", "n_items", "positive_readings", "agreement", "kappa"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _kappas(two: pd.DataFrame) -> pd.DataFrame:
    two = two.sort_values(["item_id", "labeler"])
    a, b = two.iloc[::2].reset_index(drop=True), two.iloc[1::2].reset_index(drop=True)
    out = []

    def row(name, x, y, binary=True):
        x, y = [v if not binary else bool(v) for v in x], [v if not binary else bool(v) for v in y]
        same = float(np.mean([p == q for p, q in zip(x, y)]))
        # kappa is undefined when both readers used a single value throughout
        k = cohen_kappa_score(x, y) if len(set(x) | set(y)) > 1 else np.nan
        pos = sum(x) + sum(y) if binary else np.nan
        out.append({"field": name, "n_items": len(x), "positive_readings": pos, "agreement": same, "kappa": k})

    if len(a):
        for c in ART9:
            row(c, a["art9"].str.split(";").map(lambda s, c=c: c in s), b["art9"].str.split(";").map(lambda s, c=c: c in s))
        row("any_sensitive", a["art9"] != "", b["art9"] != "")
        row("self_disclosure", a["self_disclosure"], b["self_disclosure"])
        row("iab_tier1", a["iab_tier1"], b["iab_tier1"], binary=False)
    out = pd.DataFrame(out, columns=["field", "n_items", "positive_readings", "agreement", "kappa"])
    return out.astype({"positive_readings": "Int64"})


def excerpts(folder: Path) -> dict[str, str]:
    """item_id -> the excerpt shown in the packets."""
    out = {}
    for p in sorted(folder.glob("packet_L*.md")):
        text = p.read_text(encoding="utf-8")
        heads = list(_ITEM.finditer(text))
        for m, nxt in zip(heads, heads[1:] + [None]):
            out.setdefault(m.group(1), text[m.end(): nxt.start() if nxt else len(text)].strip())
    return out


def round_folders(root: Path) -> list[Path]:
    """DIR and its round*/ subfolders that hold a key.csv (one labeling round each)."""
    return [root] + sorted(p for p in root.glob("round*") if (p / "key.csv").is_file())


def write_disagreements(folder: Path, differ: list[str], two: pd.DataFrame, adj_of: pd.Series) -> Path:
    """folder/disagreements.md (both readings and the excerpt) and folder/adjudication.csv (kept rows, new empty ones)."""
    ex = excerpts(folder)
    with open(folder / "disagreements.md", "w", encoding="utf-8") as f:
        f.write(f"# {len(differ)} disagreements to adjudicate under GUIDELINE.md section 6\n"
                "Write one final row per item to adjudication.csv (same columns as the answer files).\n")
        for i in differ:
            g = two[two["item_id"] == i]
            f.write(f"\n\n===== {i} · adjudicator {adj_of[i]} =====\n")
            for r in g.itertuples():
                f.write(f"- {r.labeler}: art9=[{r.art9}] self_disclosure={r.self_disclosure} iab_tier1={r.iab_tier1} borderline={r.borderline} note: {r.note}\n")
            f.write(f"\n{ex.get(i, '(excerpt not found in the packets)')}\n")
    adj_path = folder / "adjudication.csv"
    if not adj_path.exists():
        pd.DataFrame({"item_id": differ}).reindex(columns=COLUMNS).to_csv(adj_path, index=False)
    else:  # keep the rows written so far; add empty ones for disagreements found since
        have = pd.read_csv(adj_path, dtype=str, keep_default_na=False)
        new = [i for i in differ if i not in set(have["item_id"])]
        if new:
            pd.concat([have, pd.DataFrame({"item_id": new}).reindex(columns=COLUMNS)], ignore_index=True).to_csv(adj_path, index=False)
            print(f"{len(new)} new disagreement row(s) appended to {adj_path}")
    return adj_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/labeling", type=Path, help="the labeling folder (its round*/ subfolders are read too)")
    ap.add_argument("--out", default=HERE, type=Path, help="where labels_raw.csv / agreement.csv / labels.csv go")
    ap.add_argument("--partial", action="store_true")
    ap.add_argument("--check", metavar="LABELER", help="only validate DIR/labels_LABELER.csv (ADJ: DIR/adjudication.csv), partial; write nothing")
    args = ap.parse_args(argv)
    tiers = tier1_names()
    if args.check:
        key = pd.read_csv(args.dir / "key.csv", dtype=str, keep_default_na=False)
        name = "adjudication.csv" if args.check == "ADJ" else f"labels_{args.check}.csv"
        if args.check == "ADJ":  # the template collect wrote lists exactly the disputed items
            listed = set(pd.read_csv(args.dir / name, dtype=str, keep_default_na=False)["item_id"])
            key = key[key["item_id"].isin(listed)].assign(labelers="ADJ")
        df, errs = read_answers(args.dir / name, args.check, key, tiers, partial=True)
        print(f"{name}: {len(df)} rows filled, {int(df['borderline'].sum()) if len(df) else 0} borderline, {len(errs)} problem(s)",
              *errs[:200], sep="\n  ")
        return 1 if errs else 0
    folders = round_folders(args.dir)
    keys = {f: pd.read_csv(f / "key.csv", dtype=str, keep_default_na=False) for f in folders}
    key = pd.concat(keys.values(), ignore_index=True)
    dup = key.loc[key["item_id"].duplicated() | key["conversation_id"].duplicated(), "item_id"]
    if len(dup):
        print(f"key.csv files of {', '.join(map(str, folders))}: item or conversation in more than one row (e.g. {dup.iloc[0]})", file=sys.stderr)
        return 1
    frames, errs = [], []
    for folder, k in keys.items():
        for who in sorted({w for r in k["labelers"] for w in r.split(";")}):
            path = folder / f"labels_{who}.csv"
            if not path.exists():
                errs.append(f"{path}: missing")
                continue
            df, e = read_answers(path, who, k, tiers, partial=args.partial)
            frames.append(df)
            errs += e
    if errs:
        print(f"{len(errs)} problem(s):", *errs[:200], sep="\n  ", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw = pd.concat(frames, ignore_index=True).merge(key[["item_id", "conversation_id", "stratum", "split"]], on="item_id")
    raw = raw.sort_values(["conversation_id", "labeler"])
    raw[["conversation_id", "labeler", "stratum", "split", "art9", "self_disclosure", "iab_tier1", "borderline", "language", "note"]].to_csv(
        args.out / "labels_raw.csv", index=False)
    agr = agreement(raw)
    agr.to_csv(args.out / "agreement.csv", index=False, float_format="%.3f")
    print(f"{len(raw)} readings of {raw['item_id'].nunique()} conversations -> {args.out / 'labels_raw.csv'}")
    print(agr.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    fields = ["art9", "self_disclosure", "iab_tier1"]
    two = raw.groupby("item_id").filter(lambda g: len(g) == 2)
    differ = [i for i, g in two.groupby("item_id") if (g[fields].nunique() > 1).any()]
    adj_of = key.set_index("item_id")["adjudicator"]
    adj_paths = {}
    for folder, k in keys.items():
        mine = [i for i in differ if i in set(k["item_id"])]
        adj_paths[folder] = write_disagreements(folder, mine, two, adj_of)
        print(f"{len(mine)} disagreements of {two.loc[two['item_id'].isin(k['item_id']), 'item_id'].nunique()} doubly-read "
              f"-> {folder / 'disagreements.md'}")
    if args.partial:
        return 0

    adj = []
    for folder, k in keys.items():
        mine = k[k["item_id"].isin(differ)]
        if mine.empty:
            continue
        # one file per round for all its adjudicators: every row must be a disputed item of that round
        a, e = read_answers(adj_paths[folder], "ADJ", mine.assign(labelers="ADJ"), tiers, partial=True)
        if e:
            print(f"{len(e)} problem(s) in {adj_paths[folder]}:", *e[:200], sep="\n  ", file=sys.stderr)
            return 1
        adj.append(a)
    adj = pd.concat(adj, ignore_index=True) if adj else pd.DataFrame(columns=["item_id"])
    todo = set(differ) - set(adj["item_id"])
    if todo:
        print(f"{len(todo)} disagreements not adjudicated yet: labels.csv not written")
        return 0
    final = []
    adj = adj.set_index("item_id")
    for i, g in raw.groupby("item_id"):
        r = g.iloc[0]
        row = {k: r[k] for k in ("conversation_id", "stratum", "split", "art9", "self_disclosure", "iab_tier1", "language")}
        row.update(borderline=bool(g["borderline"].any()), n_readings=len(g), adjudicated=i in differ)
        if i in differ:
            a = adj.loc[i]
            row.update(art9=a["art9"], self_disclosure=a["self_disclosure"], iab_tier1=a["iab_tier1"], language=a["language"],
                       borderline=bool(a["borderline"] or g["borderline"].any()))
        final.append(row)
    pd.DataFrame(final).sort_values("conversation_id").to_csv(args.out / "labels.csv", index=False)
    print(f"{len(final)} conversations -> {args.out / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
