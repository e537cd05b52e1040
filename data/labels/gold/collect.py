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

Round 6 on (GUIDELINE.md section 7) the answer files carry `iab_tier2` (a child of the row's tier-1
or empty; validated against the taxonomy), kappa gets an `iab_tier2` row (doubly-read items whose
readings share the tier-1) and a tier-2 dispute is a disagreement. A round folder may also hold
the **tier-2 pass** over earlier rows (draw_active.py): tier2_key.csv (with the gold `iab_tier1`
shown), tier2_labels_L<k>.csv (item_id, iab_tier2, borderline, note), tier2_disagreements.md and
tier2_adjudication.csv; its readings go to labels_tier2_raw.csv, its kappa to scope `tier2 pass
(test)`, and its final tier-2 into labels.csv's `iab_tier2` (empty for rows without one).

`--partial` accepts answer files that do not yet cover every item (progress checks); final
labels are then not written. `--check L3` validates only DIR's labels_L3.csv (and tier2_labels_L3.csv) against
DIR/key.csv (tier2_key.csv) and writes nothing (for labelers; `--check L9 --dir /work/labeling/round3` in round 3); `--check ADJ`
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
COLUMNS_T2 = COLUMNS + ["iab_tier2"]  # answer files of round 6 on
PASS_COLUMNS = ["item_id", "iab_tier2", "borderline", "note"]  # the tier-2 pass over earlier rows (tier-1 shown)
TIER2_FROM = 6  # the first round with tier-2 labels
BOOL = {"true": True, "false": False}
_LANG = re.compile(r"^(?:[a-z]{2}|und)$")
_ITEM = re.compile(r"^===== item (g\d+) \(\d+/\d+\) =====$", re.M)


class LabelError(ValueError):
    """Answer files that cannot be used; the message lists every bad cell."""


def tier1_names() -> set[str]:
    t = load_taxonomy()
    return set(t.loc[t["tier"] == 1, "label"]) | {"none"}


def tier2_children() -> dict[str, list[str]]:
    """tier-1 name -> its tier-2 children's names in taxonomy order ([] for childless tier-1s and `none`)."""
    t = load_taxonomy()
    out = {n: [] for n in t.loc[t["tier"] == 1, "label"]} | {"none": []}
    for r in t[t["tier"] == 2].itertuples():
        out[r.tier1_label].append(r.label)
    return out


def _tier2_error(tier2: str, tier1: str, children: dict[str, list[str]]) -> str | None:
    """Why `tier2` is not a valid answer under `tier1` (None when it is: a child, or empty)."""
    if not tier2 or tier2 in children.get(tier1, []):
        return None
    kids = children.get(tier1, [])
    if not kids:
        return f"{tier2!r} given, but {tier1!r} has no tier-2 children: leave it empty"
    return f"{tier2!r} is not a tier-2 child of {tier1!r} (exact spelling; allowed: {'; '.join(kids)}; or empty)"


def round_no(stratum: pd.Series) -> pd.Series:
    """The labeling round of a stratum as an int (r<k>* round k, else 1)."""
    return stratum.str.extract(r"^r(\d+)", expand=False).fillna("1").astype(int)


def answer_columns(key: pd.DataFrame) -> list[str]:
    """The answer-file header of a round's key: with iab_tier2 from round TIER2_FROM on."""
    return COLUMNS_T2 if len(key) and (round_no(key["stratum"]) >= TIER2_FROM).any() else COLUMNS


def _read(path: Path, columns: list[str]) -> tuple[pd.DataFrame | None, list[str]]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        return None, [f"{path}: cannot read: {e}"]
    if list(df.columns) != columns:
        return None, [f"{path}: header must be {','.join(columns)}, got {','.join(df.columns)}"]
    return df, []


def _filled_rows(df: pd.DataFrame, path: Path, assigned, packet: str, columns: list[str], seen: set[str], errs: list[str], *,
                 partial: bool):
    """(where, item, row) for each row of an answer file that names an item of `packet` (`assigned`) once and is
    filled in; the other rows are errors, except rows not filled in yet when `partial`. `seen` collects the items named."""
    for i, r in df.iterrows():
        where = f"{path.name} row {i + 2} (item {r['item_id'] or '?'})"
        item = r["item_id"].strip()
        if item not in assigned:
            errs.append(f"{where} column item_id: not an item of {packet}")
            continue
        if item in seen:
            errs.append(f"{where} column item_id: duplicate row")
            continue
        seen.add(item)
        if all(not r[c].strip() for c in columns[1:]):
            if not partial:
                errs.append(f"{where}: row not filled in")
            continue
        yield where, item, r


def read_answers(path: Path, labeler: str, key: pd.DataFrame, tiers: set[str], *, partial: bool,
                 columns: list[str] = COLUMNS) -> tuple[pd.DataFrame, list[str]]:
    """Validated rows of one labeler's file (`columns`: COLUMNS, or COLUMNS_T2 from round 6), plus the error messages."""
    df, errs = _read(path, columns)
    if df is None:
        return pd.DataFrame(), errs
    with_t2 = "iab_tier2" in columns
    children = tier2_children() if with_t2 else {}
    assigned = set(key.loc[key["labelers"].str.split(";").map(lambda r: labeler in r), "item_id"])
    seen: set[str] = set()
    rows = []
    for where, item, r in _filled_rows(df, path, assigned, f"{labeler}'s packet", columns, seen, errs, partial=partial):
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
        row = {"item_id": item, "labeler": labeler, "art9": ";".join(c for c in ART9 if c in cats),
               "self_disclosure": vals["self_disclosure"], "iab_tier1": tier, "borderline": vals["borderline"],
               "language": lang, "note": r["note"].strip()}
        if with_t2:
            row["iab_tier2"] = r["iab_tier2"].strip()
            if tier in tiers and (why := _tier2_error(row["iab_tier2"], tier, children)):
                errs.append(f"{where} column iab_tier2: {why}")
        rows.append(row)
    missing = assigned - seen
    if missing and not partial:
        errs.append(f"{path.name}: {len(missing)} of {len(assigned)} items have no row (e.g. {sorted(missing)[0]})")
    return pd.DataFrame(rows, columns=["item_id", "labeler", *columns[1:]]), errs


def read_pass(path: Path, labeler: str, key: pd.DataFrame, *, partial: bool) -> tuple[pd.DataFrame, list[str]]:
    """Validated rows of one labeler's tier-2 pass file (key: tier2_key.csv, whose iab_tier1 is the shown gold tier-1)."""
    df, errs = _read(path, PASS_COLUMNS)
    if df is None:
        return pd.DataFrame(), errs
    children = tier2_children()
    mine = key[key["labelers"].str.split(";").map(lambda r: labeler in r)].set_index("item_id")
    seen: set[str] = set()
    rows = []
    for where, item, r in _filled_rows(df, path, mine.index, f"{labeler}'s tier-2 packet", PASS_COLUMNS, seen, errs, partial=partial):
        t2, b = r["iab_tier2"].strip(), r["borderline"].strip().lower()
        if why := _tier2_error(t2, mine.loc[item, "iab_tier1"], children):
            errs.append(f"{where} column iab_tier2: {why}")
        if b not in BOOL:
            errs.append(f"{where} column borderline: expected true or false, got {r['borderline']!r}")
        if len(r["note"].split()) > 12:
            errs.append(f"{where} column note: more than 12 words")
        rows.append({"item_id": item, "labeler": labeler, "iab_tier2": t2, "borderline": BOOL.get(b), "note": r["note"].strip()})
    missing = set(mine.index) - seen
    if missing and not partial:
        errs.append(f"{path.name}: {len(missing)} of {len(mine)} items have no row (e.g. {sorted(missing)[0]})")
    return pd.DataFrame(rows, columns=["item_id", "labeler", *PASS_COLUMNS[1:]]), errs


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


def _kappa_row(name: str, x, y, binary: bool = True) -> dict:
    x, y = [v if not binary else bool(v) for v in x], [v if not binary else bool(v) for v in y]
    same = float(np.mean([p == q for p, q in zip(x, y)]))
    # kappa is undefined when both readers used a single value throughout
    k = cohen_kappa_score(x, y) if len(set(x) | set(y)) > 1 else np.nan
    pos = sum(x) + sum(y) if binary else np.nan
    return {"field": name, "n_items": len(x), "positive_readings": pos, "agreement": same, "kappa": k}


def _pairs(two: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first and the second reading of each doubly-read item, aligned."""
    two = two.sort_values(["item_id", "labeler"])
    return two.iloc[::2].reset_index(drop=True), two.iloc[1::2].reset_index(drop=True)


def _kappas(two: pd.DataFrame) -> pd.DataFrame:
    a, b = _pairs(two)
    out = []
    if len(a):
        for c in ART9:
            out.append(_kappa_row(c, a["art9"].str.split(";").map(lambda s, c=c: c in s), b["art9"].str.split(";").map(lambda s, c=c: c in s)))
        out.append(_kappa_row("any_sensitive", a["art9"] != "", b["art9"] != ""))
        out.append(_kappa_row("self_disclosure", a["self_disclosure"], b["self_disclosure"]))
        out.append(_kappa_row("iab_tier1", a["iab_tier1"], b["iab_tier1"], binary=False))
        if "iab_tier2" in a:  # rounds with tier-2 labels, on the items whose two readings share the tier-1
            same = (a["iab_tier2"].notna() & b["iab_tier2"].notna() & (a["iab_tier1"] == b["iab_tier1"])).to_numpy()
            if same.any():
                out.append(_kappa_row("iab_tier2", a.loc[same, "iab_tier2"], b.loc[same, "iab_tier2"], binary=False))
    out = pd.DataFrame(out, columns=["field", "n_items", "positive_readings", "agreement", "kappa"])
    return out.astype({"positive_readings": "Int64"})


def pass_agreement(praw: pd.DataFrame) -> pd.DataFrame:
    """Tier-2 kappa of the tier-2 pass (scope `tier2 pass (test)`; both readers saw the same gold tier-1)."""
    a, b = _pairs(praw.groupby("item_id").filter(lambda g: len(g) == 2))
    out = pd.DataFrame([_kappa_row("iab_tier2", a["iab_tier2"], b["iab_tier2"], binary=False)] if len(a) else [],
                       columns=["field", "n_items", "positive_readings", "agreement", "kappa"])
    return out.astype({"positive_readings": "Int64"}).assign(scope="tier2 pass (test)")


def excerpts(folder: Path, pattern: str = "packet_L*.md") -> dict[str, str]:
    """item_id -> the excerpt shown in the packets."""
    out = {}
    for p in sorted(folder.glob(pattern)):
        text = p.read_text(encoding="utf-8")
        heads = list(_ITEM.finditer(text))
        for m, nxt in zip(heads, heads[1:] + [None]):
            out.setdefault(m.group(1), text[m.end(): nxt.start() if nxt else len(text)].strip())
    return out


def round_folders(root: Path) -> list[Path]:
    """DIR and its round*/ subfolders that hold a key.csv (one labeling round each)."""
    return [root] + sorted(p for p in root.glob("round*") if (p / "key.csv").is_file())


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def write_disagreements(folder: Path, differ: list[str], two: pd.DataFrame, adj_of: pd.Series, *,
                        prefix: str = "", columns: list[str] = COLUMNS) -> Path:
    """folder/<prefix>disagreements.md (both readings and the excerpt) and folder/<prefix>adjudication.csv
    (kept rows, new empty ones); prefix `tier2_` for the tier-2 pass."""
    ex = excerpts(folder, f"{prefix}packet_L*.md")
    shown = [c for c in columns[1:] if c not in ("language", "note")]
    with open(folder / f"{prefix}disagreements.md", "w", encoding="utf-8") as f:
        f.write(f"# {len(differ)} disagreements to adjudicate under GUIDELINE.md section 6"
                f"{' and section 7 (tier-2)' if 'iab_tier2' in columns else ''}\n"
                f"Write one final row per item to {prefix}adjudication.csv (same columns as the {'tier-2 ' if prefix else ''}answer files).\n")
        for i in differ:
            g = two[two["item_id"] == i]
            f.write(f"\n\n===== {i} · adjudicator {adj_of[i]} =====\n")
            for r in g.to_dict("records"):
                f.write(f"- {r['labeler']}: " + " ".join((f"{c}=[{_fmt(r.get(c))}]" if c in ("art9", "iab_tier2") else f"{c}={_fmt(r.get(c))}") for c in shown) + f" note: {r['note']}\n")
            f.write(f"\n{ex.get(i, '(excerpt not found in the packets)')}\n")
    adj_path = folder / f"{prefix}adjudication.csv"
    if not adj_path.exists():
        pd.DataFrame({"item_id": differ}).reindex(columns=columns).to_csv(adj_path, index=False)
    else:  # keep the rows written so far; add empty ones for disagreements found since
        have = pd.read_csv(adj_path, dtype=str, keep_default_na=False)
        new = [i for i in differ if i not in set(have["item_id"])]
        if new:
            pd.concat([have, pd.DataFrame({"item_id": new}).reindex(columns=columns)], ignore_index=True).to_csv(adj_path, index=False)
            print(f"{len(new)} new disagreement row(s) appended to {adj_path}")
    return adj_path


def _check(args, tiers: set[str]) -> int:
    """--check: validate one labeler's files (ADJ: the adjudication files) of DIR, partial; write nothing."""
    files = []  # (file name, reader)
    key = pd.read_csv(args.dir / "key.csv", dtype=str, keep_default_na=False)
    cols = answer_columns(key)
    pkey = pd.read_csv(args.dir / "tier2_key.csv", dtype=str, keep_default_na=False) if (args.dir / "tier2_key.csv").is_file() else None
    if args.check == "ADJ":  # the templates collect wrote list exactly the disputed items
        listed = set(pd.read_csv(args.dir / "adjudication.csv", dtype=str, keep_default_na=False)["item_id"])
        files.append(("adjudication.csv", lambda p: read_answers(p, "ADJ", key[key["item_id"].isin(listed)].assign(labelers="ADJ"),
                                                                  tiers, partial=True, columns=cols)))
        if pkey is not None and (args.dir / "tier2_adjudication.csv").is_file():
            plisted = set(pd.read_csv(args.dir / "tier2_adjudication.csv", dtype=str, keep_default_na=False)["item_id"])
            files.append(("tier2_adjudication.csv", lambda p: read_pass(p, "ADJ", pkey[pkey["item_id"].isin(plisted)].assign(labelers="ADJ"), partial=True)))
    else:
        files.append((f"labels_{args.check}.csv", lambda p: read_answers(p, args.check, key, tiers, partial=True, columns=cols)))
        if pkey is not None and pkey["labelers"].str.split(";").map(lambda r: args.check in r).any():
            files.append((f"tier2_labels_{args.check}.csv", lambda p: read_pass(p, args.check, pkey, partial=True)))
    bad = 0
    for name, reader in files:
        df, errs = reader(args.dir / name)
        print(f"{name}: {len(df)} rows filled, {int(df['borderline'].sum()) if len(df) else 0} borderline, {len(errs)} problem(s)",
              *errs[:200], sep="\n  ")
        bad += len(errs)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/labeling", type=Path, help="the labeling folder (its round*/ subfolders are read too)")
    ap.add_argument("--out", default=HERE, type=Path, help="where labels_raw.csv / agreement.csv / labels.csv go")
    ap.add_argument("--partial", action="store_true")
    ap.add_argument("--check", metavar="LABELER", help="only validate DIR/labels_LABELER.csv and DIR/tier2_labels_LABELER.csv "
                    "(ADJ: DIR/adjudication.csv and DIR/tier2_adjudication.csv), partial; write nothing")
    args = ap.parse_args(argv)
    tiers = tier1_names()
    if args.check:
        return _check(args, tiers)
    folders = round_folders(args.dir)
    keys = {f: pd.read_csv(f / "key.csv", dtype=str, keep_default_na=False) for f in folders}
    pkeys = {f: pd.read_csv(f / "tier2_key.csv", dtype=str, keep_default_na=False) for f in folders if (f / "tier2_key.csv").is_file()}
    key = pd.concat(keys.values(), ignore_index=True)
    dup = key.loc[key["item_id"].duplicated() | key["conversation_id"].duplicated(), "item_id"]
    if len(dup):
        print(f"key.csv files of {', '.join(map(str, folders))}: item or conversation in more than one row (e.g. {dup.iloc[0]})", file=sys.stderr)
        return 1
    pkey = pd.concat(pkeys.values(), ignore_index=True) if pkeys else pd.DataFrame(columns=["item_id", "conversation_id", "iab_tier1", "split", "adjudicator"])
    dup = pkey.loc[pkey["item_id"].isin(key["item_id"]) | pkey["item_id"].duplicated() | pkey["conversation_id"].duplicated(), "item_id"]
    if len(dup):
        print(f"tier2_key.csv: item in more than one row or also in a key.csv, or conversation read twice in the pass (e.g. {dup.iloc[0]})", file=sys.stderr)
        return 1
    frames, pframes, errs = [], [], []
    for folder, k in keys.items():
        for who in sorted({w for r in k["labelers"] for w in r.split(";")}):
            path = folder / f"labels_{who}.csv"
            if not path.exists():
                errs.append(f"{path}: missing")
                continue
            df, e = read_answers(path, who, k, tiers, partial=args.partial, columns=answer_columns(k))
            frames.append(df)
            errs += e
    for folder, k in pkeys.items():
        for who in sorted({w for r in k["labelers"] for w in r.split(";")}):
            path = folder / f"tier2_labels_{who}.csv"
            if not path.exists():
                errs.append(f"{path}: missing")
                continue
            df, e = read_pass(path, who, k, partial=args.partial)
            pframes.append(df)
            errs += e
    if errs:
        print(f"{len(errs)} problem(s):", *errs[:200], sep="\n  ", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw = pd.concat(frames, ignore_index=True).merge(key[["item_id", "conversation_id", "stratum", "split"]], on="item_id")
    raw = raw.sort_values(["conversation_id", "labeler"])
    if "iab_tier2" not in raw:
        raw["iab_tier2"] = np.nan  # NaN: a round without tier-2 labels; "" : no tier-2 fits
    raw[["conversation_id", "labeler", "stratum", "split", "art9", "self_disclosure", "iab_tier1", "iab_tier2", "borderline", "language", "note"]].to_csv(
        args.out / "labels_raw.csv", index=False)
    praw = (pd.concat(pframes, ignore_index=True) if pframes else pd.DataFrame(columns=["item_id", "labeler", *PASS_COLUMNS[1:]]))
    praw = praw.merge(pkey[["item_id", "conversation_id", "split", "iab_tier1"]], on="item_id").sort_values(["conversation_id", "labeler"])
    if len(praw):
        praw[["conversation_id", "labeler", "split", "iab_tier1", "iab_tier2", "borderline", "note"]].to_csv(
            args.out / "labels_tier2_raw.csv", index=False)
    agr = agreement(raw)
    if len(praw):
        agr = pd.concat([agr, pass_agreement(praw)[agr.columns]], ignore_index=True)
    agr.to_csv(args.out / "agreement.csv", index=False, float_format="%.3f")
    print(f"{len(raw)} readings of {raw['item_id'].nunique()} conversations -> {args.out / 'labels_raw.csv'}"
          + (f"; tier-2 pass: {len(praw)} readings of {praw['item_id'].nunique()} -> {args.out / 'labels_tier2_raw.csv'}" if len(praw) else ""))
    print(agr.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    fields = ["art9", "self_disclosure", "iab_tier1", "iab_tier2"]  # NaN tier-2 (older rounds) never differs
    two = raw.groupby("item_id").filter(lambda g: len(g) == 2)
    differ = [i for i, g in two.groupby("item_id") if (g[fields].nunique() > 1).any()]
    ptwo = praw.groupby("item_id").filter(lambda g: len(g) == 2)
    pdiffer = [i for i, g in ptwo.groupby("item_id") if g["iab_tier2"].nunique() > 1]
    adj_of = pd.concat([key.set_index("item_id")["adjudicator"], pkey.set_index("item_id")["adjudicator"]])
    adj_paths, padj_paths = {}, {}
    for folder, k in keys.items():
        mine = [i for i in differ if i in set(k["item_id"])]
        adj_paths[folder] = write_disagreements(folder, mine, two, adj_of, columns=answer_columns(k))
        print(f"{len(mine)} disagreements of {two.loc[two['item_id'].isin(k['item_id']), 'item_id'].nunique()} doubly-read "
              f"-> {folder / 'disagreements.md'}")
    for folder, k in pkeys.items():
        mine = [i for i in pdiffer if i in set(k["item_id"])]
        padj_paths[folder] = write_disagreements(folder, mine, ptwo, adj_of,
                                                 prefix="tier2_", columns=PASS_COLUMNS)
        print(f"{len(mine)} tier-2 pass disagreements of {ptwo.loc[ptwo['item_id'].isin(k['item_id']), 'item_id'].nunique()} doubly-read "
              f"-> {folder / 'tier2_disagreements.md'}")
    if args.partial:
        return 0

    adj, padj = [], []
    for folder, k in keys.items():
        mine = k[k["item_id"].isin(differ)]
        if mine.empty:
            continue
        # one file per round for all its adjudicators: every row must be a disputed item of that round
        a, e = read_answers(adj_paths[folder], "ADJ", mine.assign(labelers="ADJ"), tiers, partial=True, columns=answer_columns(k))
        if e:
            print(f"{len(e)} problem(s) in {adj_paths[folder]}:", *e[:200], sep="\n  ", file=sys.stderr)
            return 1
        adj.append(a)
    for folder, k in pkeys.items():
        mine = k[k["item_id"].isin(pdiffer)]
        if mine.empty:
            continue
        a, e = read_pass(padj_paths[folder], "ADJ", mine.assign(labelers="ADJ"), partial=True)
        if e:
            print(f"{len(e)} problem(s) in {padj_paths[folder]}:", *e[:200], sep="\n  ", file=sys.stderr)
            return 1
        padj.append(a)
    adj = pd.concat(adj, ignore_index=True) if adj else pd.DataFrame(columns=["item_id"])
    padj = pd.concat(padj, ignore_index=True) if padj else pd.DataFrame(columns=["item_id", "iab_tier2"])
    todo = (set(differ) - set(adj["item_id"])) | (set(pdiffer) - set(padj["item_id"]))
    if todo:
        print(f"{len(todo)} disagreements not adjudicated yet: labels.csv not written")
        return 0
    final = []
    adj = adj.set_index("item_id")
    for i, g in raw.groupby("item_id"):
        r = g.iloc[0]
        row = {k: r[k] for k in ("conversation_id", "stratum", "split", "art9", "self_disclosure", "iab_tier1", "iab_tier2", "language")}
        row.update(borderline=bool(g["borderline"].any()), n_readings=len(g), adjudicated=i in differ)
        if i in differ:
            a = adj.loc[i]
            row.update(art9=a["art9"], self_disclosure=a["self_disclosure"], iab_tier1=a["iab_tier1"], iab_tier2=a.get("iab_tier2", np.nan),
                       language=a["language"], borderline=bool(a["borderline"] or g["borderline"].any()))
        final.append(row)
    final = pd.DataFrame(final).set_index("conversation_id")
    final["iab_tier2"] = final["iab_tier2"].astype(object)  # all-NaN before round 6 reads
    # the tier-2 pass: the single reading, the agreed one, or the adjudicated one, under the row's gold tier-1
    padj = padj.set_index("item_id")
    for i, g in praw.groupby("item_id"):
        cid, t1 = g["conversation_id"].iloc[0], g["iab_tier1"].iloc[0]
        if cid not in final.index or final.loc[cid, "iab_tier1"] != t1:
            print(f"tier2_key.csv item {i}: the shown tier-1 {t1!r} is not the gold tier-1 of {cid} "
                  f"({final['iab_tier1'].get(cid, 'no gold row')!r}): the pass no longer fits labels.csv", file=sys.stderr)
            return 1
        final.loc[cid, "iab_tier2"] = padj.loc[i, "iab_tier2"] if i in pdiffer else g["iab_tier2"].iloc[0]
    final.reset_index().sort_values("conversation_id").to_csv(args.out / "labels.csv", index=False)
    print(f"{len(final)} conversations -> {args.out / 'labels.csv'}; iab_tier2 for {int(final['iab_tier2'].map(lambda v: isinstance(v, str) and v != '').sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
