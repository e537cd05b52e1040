"""Check one table against its schema: usable rows, and quarantined rows with their reason."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9
from analysis.contract.schemas import QUARANTINE_COLUMNS, SCHEMAS, Column, DataError
from analysis.util.regions import ISO_ALPHA2
from analysis.util.taxonomy import is_node, load_taxonomy, resolve_tier1

_TEXTLIKE = {"text"}  # values of these columns never enter the quarantine table (privacy)

# ------------------------------------------------------------------------------- validation


@dataclass
class Checked:
    table: str
    file: str
    data: pd.DataFrame
    quarantine: pd.DataFrame
    n_read: int


def quarantine_rows(table, file, rows, column, reason, values=None) -> pd.DataFrame:
    rows = np.asarray(rows)
    if column in _TEXTLIKE:
        shown = ["<withheld>"] * len(rows)
    elif values is None:
        shown = [None] * len(rows)
    else:
        shown = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)[:80] for v in values]
    return pd.DataFrame({"table": table, "file": str(file), "row": rows.astype("int64"), "column": column, "reason": reason, "value": shown})


def _is_missing(s: pd.Series, kind: str) -> np.ndarray:
    if kind == "art9_list":  # an empty cell is the label "none of the categories", not a missing value
        return np.zeros(len(s), dtype=bool)
    miss = s.isna().to_numpy().copy()
    if kind not in ("art9_list", "str_list") and _all_strings(s):
        miss |= s.astype("string").str.strip().eq("").fillna(False).to_numpy()
    return miss


def _all_strings(s: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(s.dtype) and (s.dtype != object or pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"))


def _parse(col: Column, s: pd.Series) -> tuple[pd.Series, pd.Series, str]:
    """Return (parsed values, bad mask among non-missing values, reason for bad values)."""
    k = col.kind
    none_bad = pd.Series(False, index=s.index)
    if k in ("id", "str", "text"):
        if _all_strings(s) or pd.api.types.is_integer_dtype(s.dtype):
            parsed = s.astype("string")
            return (parsed if k == "text" else parsed.str.strip()), none_bad, ""
        ok = s.map(lambda v: isinstance(v, (str, int, np.integer)) and not isinstance(v, bool))
        parsed = s.where(ok).astype("string")
        return (parsed if k == "text" else parsed.str.strip()), ~ok, "expected a string"
    if k == "int":
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna() | (num < 0) | (num.fillna(0) % 1 != 0)
        return num.where(~bad).astype("Int64"), bad, "expected a non-negative integer"
    if k == "timestamp":
        if pd.api.types.is_datetime64_any_dtype(s):
            ts = s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")
        else:
            text = s.astype("string").str.strip()
            ts = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
            if text.str.fullmatch(r"\d{9,13}(\.\d*)?").fillna(False).mean() > 0.5:  # read as years by ISO 8601
                return ts, pd.Series(True, index=s.index), "looks like a Unix epoch number, not an ISO 8601 timestamp (its unit is ambiguous: convert to ISO 8601 UTC)"
        return ts, ts.isna(), "cannot parse as an ISO 8601 UTC timestamp"
    if k == "bool":
        if pd.api.types.is_bool_dtype(s):
            return s.astype(bool), none_bad, ""
        m = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "t": True, "f": False, "1.0": True, "0.0": False}
        parsed = s.astype("string").str.strip().str.lower().map(m)
        return parsed.astype("boolean"), parsed.isna(), "expected a boolean (true/false, 1/0)"
    if k == "enum":
        low = s.astype("string").str.strip().str.lower()
        return low, ~low.isin(col.values), f"expected one of {', '.join(col.values)}"
    if k == "region":
        up = s.astype("string").str.strip().str.upper()
        return up, ~up.isin(ISO_ALPHA2), "expected an ISO 3166-1 alpha-2 region code (ZZ for unknown)"
    if k == "unit_float":
        num = pd.to_numeric(s, errors="coerce")
        return num, num.isna() | (num < 0) | (num > 1), "expected a number in [0, 1]"
    if k == "iab_id":
        ids = s.astype("string").str.strip()
        return ids, ~pd.Series(is_node(ids, load_taxonomy()), index=s.index), "not an IAB 3.0 id (IAB Content Taxonomy 3.0 unique ids, e.g. 596)"
    if k == "iab_tier1":
        ids, bad = resolve_tier1(s, load_taxonomy())
        return ids, pd.Series(bad, index=s.index), "not an IAB 3.0 tier-1 id or name (e.g. 210 or 'Food & Drink'; 'none' for no tier-1)"
    if k in ("art9_list", "str_list"):
        is_seq = s.map(type).isin([list, tuple, np.ndarray])
        if k == "str_list" and (is_seq | s.isna()).all():
            return s, none_bad, ""  # a Parquet list<string> column: already a list per row
        parsed = s.map(_as_list)
        if k == "art9_list":
            parsed = parsed.where(s.notna(), pd.Series([[] for _ in range(len(s))], index=s.index))
        bad = parsed.isna()
        reason = "expected a list of strings (JSON list or ';'-separated)"
        if k == "art9_list":
            bad = bad | parsed.map(lambda v: v is not None and any(x not in ART9 for x in v))
            reason = f"expected a list of Art. 9 categories ({', '.join(ART9)})"
        return parsed, bad.astype(bool), reason
    raise ValueError(f"unknown column kind {k}")


def _as_list(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x).strip() for x in v]
    if isinstance(v, str):
        t = v.strip()
        if t.startswith("["):
            try:
                out = json.loads(t)
            except json.JSONDecodeError:
                return None
            return [str(x).strip() for x in out] if isinstance(out, list) else None
        return [x.strip() for x in re.split(r"[;|]", t) if x.strip()]
    return None


def check_table(table: str, df: pd.DataFrame, file: str | Path, *, allow_missing_time: bool = False) -> Checked:
    """Check one table against its schema; return the usable rows and the quarantined ones."""
    schema = SCHEMAS[table]
    file = str(file)
    n = len(df)
    if n == 0:
        raise DataError(file, "empty file: no rows")
    present = set(df.columns)
    for c in schema.columns:
        if c.required and c.name not in present:
            found = ", ".join(x for x in df.columns if x != "_row")
            raise DataError(file, f"missing required column (found: {found})", column=c.name)
    rows = df["_row"].to_numpy()
    qs = [quarantine_rows(table, file, [b["row"] for b in df.attrs.get("bad_lines", [])], None, None)] if df.attrs.get("bad_lines") else []
    if qs:
        qs[0]["reason"] = [b["reason"] for b in df.attrs["bad_lines"]]
    out = pd.DataFrame({"_row": rows})
    bad_any = np.zeros(n, dtype=bool)
    for c in schema.columns:
        if c.name not in present:  # an absent optional column stays absent (load_inputs drops empty ones too)
            continue
        s = df[c.name].reset_index(drop=True)
        miss = _is_missing(s, c.kind)
        parsed, bad, reason = _parse(c, s)
        bad = np.asarray(bad, dtype=bool) & ~miss
        nonmissing = int((~miss).sum())
        if nonmissing and bad.sum() == nonmissing and nonmissing >= 3:
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                file,
                f"wrong type: none of the {nonmissing} values is valid ({reason}); e.g. {str(s.iloc[first])[:40]!r} at row {rows[first]}",
                column=c.name,
            )
        if c.kind == "timestamp" and allow_missing_time:
            miss = np.zeros(n, dtype=bool)  # imported corpora without times keep NaT
        if not c.nullable and miss.any() and not (c.kind == "timestamp" and allow_missing_time):
            qs.append(quarantine_rows(table, file, rows[miss], c.name, "empty message text" if c.kind == "text" else "missing value"))
            bad_any |= miss
        if bad.any():
            qs.append(quarantine_rows(table, file, rows[bad], c.name, reason, s[bad].tolist()))
            bad_any |= bad
        out[c.name] = parsed.where(~pd.Series(bad), None) if bad.any() else parsed
    if table == "messages":
        empty = (~bad_any) & out["text"].astype("string").fillna("").str.strip().eq("").to_numpy()
        if empty.any():
            qs.append(quarantine_rows(table, file, rows[empty], "text", "empty message text"))
            bad_any |= empty
    good = out[~bad_any].copy()
    dup = good.duplicated(list(schema.key), keep="first")
    if dup.any():
        first_row = good.drop_duplicates(list(schema.key)).set_index(list(schema.key))["_row"]
        d = good[dup]
        firsts = first_row.reindex(pd.MultiIndex.from_frame(d[list(schema.key)]) if len(schema.key) > 1 else d[schema.key[0]]).to_numpy()
        keyvals = d[list(schema.key)].astype(str).agg(" / ".join, axis=1)
        q = quarantine_rows(table, file, d["_row"], "/".join(schema.key), "duplicate key", keyvals.tolist())
        q["reason"] = [f"duplicate key, first seen at row {f}" for f in firsts]
        qs.append(q)
        good = good[~dup]
    quarantine = pd.concat(qs, ignore_index=True) if qs else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    # lines that never became a row (unparsable JSON, records cut off) were read too: the gate counts them
    return Checked(table, file, good.reset_index(drop=True), quarantine, n + len(df.attrs.get("bad_lines", [])))
