"""Ingest: read the input tables, validate them against the data contract, quarantine bad rows.

Readers take Parquet, CSV and JSON Lines; importers take ShareGPT-style JSON (salvaging the
complete records of a truncated file) and the OpenAI ChatGPT export (`conversations.json`).
Problems that make a file unusable raise `DataError` naming file, row, column and reason;
problems with single rows send them to the quarantine table with their reason. Row numbers
are 1-based record numbers: the line for JSON Lines, the data row (header excluded) for CSV,
the record for Parquet and JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.regions import DEFAULT_EXCLUDED, ISO_ALPHA2, is_excluded

ART9 = ("health", "religion", "politics", "sexual_orientation", "ethnicity", "philosophical_beliefs", "trade_union")
QUARANTINE_COLUMNS = ["table", "file", "row", "column", "reason", "value"]
_TEXTLIKE = {"text"}  # values of these columns never enter the quarantine table (privacy)


class DataError(ValueError):
    """An input that cannot be used: names the file, row, column and reason."""

    def __init__(self, file, reason: str, *, row: int | None = None, column: str | None = None):
        self.file, self.row, self.column, self.reason = str(file), row, column, reason
        where = ", ".join(x for x in (f"row {row}" if row is not None else "", f"column {column!r}" if column else "") if x)
        super().__init__(f"{file}: {where + ': ' if where else ''}{reason}")


# ----------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # id | int | text | str | timestamp | bool | enum | region | unit_float | art9_list | str_list
    required: bool = True  # the column must be present
    nullable: bool = False
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


SCHEMAS = {
    "messages": Schema(
        "messages",
        (
            Column("conversation_id", "id"),
            Column("user_id", "id"),
            Column("turn_index", "int"),
            Column("role", "enum", values=("user", "assistant")),
            Column("text", "text"),
            Column("sent_at", "timestamp"),
            Column("modality", "enum", values=("text", "voice")),
        ),
        key=("conversation_id", "turn_index"),
    ),
    "users": Schema(
        "users",
        (
            Column("user_id", "id"),
            Column("region", "region"),
            Column("age_band", "str", required=False, nullable=True),
            Column("signup_date", "timestamp", required=False, nullable=True),
        ),
        key=("user_id",),
    ),
    "impressions": Schema(
        "impressions",
        (
            Column("impression_id", "id"),
            Column("user_id", "id"),
            Column("shown_at", "timestamp"),
            Column("ad_category", "id"),
            Column("clicked", "bool"),
            Column("placement", "str", required=False, nullable=True),
            Column("targeting_sources", "str_list", required=False, nullable=True),
            Column("arm", "enum", required=False, nullable=True, values=("treatment", "holdout")),
        ),
        key=("impression_id",),
    ),
    "filter_decisions": Schema(
        "filter_decisions",
        (Column("conversation_id", "id"), Column("blocked", "bool"), Column("score", "unit_float", required=False, nullable=True)),
        key=("conversation_id",),
    ),
    "labels": Schema(
        "labels",
        (Column("conversation_id", "id"), Column("art9", "art9_list"), Column("iab_tier1", "str", required=False, nullable=True)),
        key=("conversation_id",),
    ),
}
REQUIRED_TABLES = ("messages", "users", "impressions")
OPTIONAL_TABLES = ("filter_decisions", "labels")


# ---------------------------------------------------------------------------------- readers


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one file into a frame with a `_row` column (1-based record number); raise DataError if unreadable."""
    path = Path(path)
    if path.is_dir():  # partitioned Parquet dataset
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(path, "empty file: the folder holds no .parquet files")
        df = pd.concat([_read_parquet(f) for f in files], ignore_index=True)
    elif not path.exists():
        raise DataError(path, "file not found")
    elif path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    else:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            df = _read_parquet(path)
        elif suffix == ".csv":
            df = _read_csv(path)
        elif suffix in (".jsonl", ".ndjson"):
            df = _read_jsonl(path)
        else:
            raise DataError(path, f"unsupported file type {suffix!r}: use .parquet, .csv or .jsonl (or an importer for .json)")
    if len(df) == 0:
        raise DataError(path, "empty file: no rows")
    if "_row" not in df:
        df.insert(0, "_row", np.arange(1, len(df) + 1))
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"not a readable Parquet file ({type(e).__name__}: {e})") from e


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line}); re-encode the file as UTF-8") from e


def _read_csv(path: Path) -> pd.DataFrame:
    import io

    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(path, "empty file: no header and no rows")
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as e:
        raise DataError(path, f"malformed CSV: {e}") from e
    return df


def _read_jsonl(path: Path) -> pd.DataFrame:
    text = _decode_utf8(path)
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append({"row": i, "reason": f"invalid JSON: {e.msg} at char {e.pos}"})
            continue
        if not isinstance(rec, dict):
            bad.append({"row": i, "reason": f"expected a JSON object, got {type(rec).__name__}"})
            continue
        rec["_row"] = i
        rows.append(rec)
    if not rows and not bad:
        raise DataError(path, "empty file: no records")
    if not rows:
        raise DataError(path, f"no valid JSON record; first problem: {bad[0]['reason']}", row=bad[0]["row"])
    df = pd.DataFrame(rows)
    df.attrs["bad_lines"] = bad
    return df


# ------------------------------------------------------------------------------- validation


@dataclass
class Validated:
    table: str
    file: str
    data: pd.DataFrame
    quarantine: pd.DataFrame
    n_read: int


def _q(table, file, rows, column, reason, values=None) -> pd.DataFrame:
    rows = np.asarray(rows)
    if column in _TEXTLIKE:
        shown = ["<withheld>"] * len(rows)
    elif values is None:
        shown = [None] * len(rows)
    else:
        shown = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)[:80] for v in values]
    return pd.DataFrame({"table": table, "file": str(file), "row": rows.astype("int64"), "column": column, "reason": reason, "value": shown})


def _is_missing(s: pd.Series, kind: str) -> np.ndarray:
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
            ts = pd.to_datetime(s.astype("string"), utc=True, errors="coerce", format="ISO8601")
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
    if k in ("art9_list", "str_list"):
        is_seq = s.map(type).isin([list, tuple, np.ndarray])
        if k == "str_list" and (is_seq | s.isna()).all():
            return s, none_bad, ""  # a Parquet list<string> column: already a list per row
        parsed = s.map(_as_list)
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


def validate(table: str, df: pd.DataFrame, file: str | Path, *, allow_missing_time: bool = False) -> Validated:
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
    qs = [_q(table, file, [b["row"] for b in df.attrs.get("bad_lines", [])], None, None)] if df.attrs.get("bad_lines") else []
    if qs:
        qs[0]["reason"] = [b["reason"] for b in df.attrs["bad_lines"]]
    out = pd.DataFrame({"_row": rows})
    bad_any = np.zeros(n, dtype=bool)
    for c in schema.columns:
        if c.name not in present:
            out[c.name] = pd.Series([None] * n, dtype="object")
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
            qs.append(_q(table, file, rows[miss], c.name, "missing value"))
            bad_any |= miss
        if bad.any():
            qs.append(_q(table, file, rows[bad], c.name, reason, s[bad].tolist()))
            bad_any |= bad
        out[c.name] = parsed.where(~pd.Series(bad), None) if bad.any() else parsed
    if table == "messages":
        empty = (~bad_any) & out["text"].astype("string").fillna("").str.strip().eq("").to_numpy()
        if empty.any():
            qs.append(_q(table, file, rows[empty], "text", "empty message text"))
            bad_any |= empty
    good = out[~bad_any].copy()
    dup = good.duplicated(list(schema.key), keep="first")
    if dup.any():
        first_row = good.drop_duplicates(list(schema.key)).set_index(list(schema.key))["_row"]
        d = good[dup]
        firsts = first_row.reindex(pd.MultiIndex.from_frame(d[list(schema.key)]) if len(schema.key) > 1 else d[schema.key[0]]).to_numpy()
        keyvals = d[list(schema.key)].astype(str).agg(" / ".join, axis=1)
        q = _q(table, file, d["_row"], "/".join(schema.key), "duplicate key", keyvals.tolist())
        q["reason"] = [f"duplicate key, first seen at row {f}" for f in firsts]
        qs.append(q)
        good = good[~dup]
    quarantine = pd.concat(qs, ignore_index=True) if qs else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return Validated(table, file, good.reset_index(drop=True), quarantine, n)


# ----------------------------------------------------------------------------- importers


@dataclass
class ImportResult:
    """Contract tables built from a chat export, with what could not be salvaged."""

    messages: pd.DataFrame
    users: pd.DataFrame
    source: str
    n_records: int
    n_skipped: int = 0
    bytes_lost: int = 0
    truncated: bool = False
    problems: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.source}: {self.n_records} conversations imported, {self.n_skipped} skipped"
        if self.truncated:
            s += f"; file cut off: {self.bytes_lost} trailing bytes (one partial record) lost"
        return s


def iter_json_array(text: str, path: str | Path):
    """Yield (index, record, end_offset) from a top-level JSON array, stopping cleanly at a truncation."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DataError(path, "not a JSON array (no '[' found)")
    i += 1
    k = 0
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the rest is an incomplete record: the caller reports the bytes lost
        k += 1
        yield k, obj, end
        i = end


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bing": "assistant", "bard": "assistant"}


def pseudonym(value: str, salt: str = "chat-ad-audit") -> str:
    """A stable opaque id for an identifier that must not appear in outputs."""
    return "u_" + hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]


def import_sharegpt(path: str | Path, *, region: str = "ZZ", max_records: int | None = None) -> ImportResult:
    """ShareGPT-style JSON ([{id, conversations: [{from, value}]}]); tolerant of a file cut off mid-way.

    ShareGPT splits long chats into parts `<id>_0`, `<id>_1`, ...: parts of one chat share a
    pseudonymous user. There are no timestamps (sent_at is missing) and no region (ZZ).
    """
    path = Path(path)
    text = _decode_utf8(path)
    rows, problems = [], []
    n = skipped = 0
    last_end = text.find("[") + 1
    for k, rec, end in iter_json_array(text, path):
        last_end = end
        if max_records is not None and n >= max_records:
            break
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not rec.get("id"):
            skipped += 1
            problems.append({"row": k, "reason": "record without 'id' or 'conversations' list"})
            continue
        cid = str(rec["id"])
        user = pseudonym(cid.rsplit("_", 1)[0])
        t_i = 0
        for t in turns:
            role = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
            value = t.get("value") if isinstance(t, dict) else None
            if role is None or not isinstance(value, str):
                problems.append({"row": k, "reason": f"turn with unknown role {t.get('from') if isinstance(t, dict) else t!r}"})
                continue
            rows.append((cid, user, t_i, role, value))
            t_i += 1
        if t_i == 0:
            skipped += 1
            problems.append({"row": k, "reason": "conversation with no usable turns"})
            continue
        n += 1
    tail = text[last_end:].strip().lstrip(",").strip()
    truncated = max_records is None and bool(tail) and tail != "]"
    messages = pd.DataFrame(rows, columns=["conversation_id", "user_id", "turn_index", "role", "text"])
    messages["sent_at"] = pd.Series(pd.NaT, index=messages.index, dtype="datetime64[ns, UTC]")
    messages["modality"] = "text"
    users = pd.DataFrame({"user_id": messages["user_id"].unique(), "region": region})
    return ImportResult(
        messages, users, f"ShareGPT JSON {path}", n, skipped,
        bytes_lost=len(text[last_end:].encode()) if truncated else 0, truncated=truncated, problems=problems,
    )


def import_chatgpt_export(path: str | Path, *, user_id: str = "export_user", region: str = "ZZ") -> ImportResult:
    """The OpenAI ChatGPT data export (`conversations.json`): follow each message tree from
    `current_node` back to the root, keeping user and assistant turns of the active branch."""
    path = Path(path)
    text = _decode_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(path, "expected a JSON list of conversations")
    uid = pseudonym(user_id)
    rows, problems = [], []
    n = skipped = 0
    for k, conv in enumerate(data, start=1):
        mapping = conv.get("mapping") if isinstance(conv, dict) else None
        if not isinstance(mapping, dict):
            skipped += 1
            problems.append({"row": k, "reason": "conversation without a 'mapping' tree"})
            continue
        cid = str(conv.get("conversation_id") or conv.get("id") or f"chatgpt_{k}")
        node = conv.get("current_node") or _deepest_leaf(mapping)
        chain, seen = [], set()
        while node and node in mapping and node not in seen:
            seen.add(node)
            chain.append(mapping[node])
            node = mapping[node].get("parent")
        t_i = 0
        for item in reversed(chain):
            msg = item.get("message") or {}
            role = (msg.get("author") or {}).get("role")
            if role not in ("user", "assistant"):
                continue
            content = msg.get("content") or {}
            text_parts, voice = [], content.get("content_type") == "audio_transcription"
            for p in content.get("parts") or []:
                if isinstance(p, str):
                    text_parts.append(p)
                elif isinstance(p, dict) and isinstance(p.get("text"), str):
                    text_parts.append(p["text"])
                    voice = voice or p.get("content_type") == "audio_transcription"
            body = "\n".join(x for x in text_parts if x.strip())
            if not body:
                continue
            ts = msg.get("create_time") or conv.get("create_time")
            sent = pd.Timestamp(ts, unit="s", tz="UTC") if isinstance(ts, (int, float)) else pd.NaT
            rows.append((cid, uid, t_i, role, body, sent, "voice" if voice else "text"))
            t_i += 1
        if t_i == 0:
            skipped += 1
            problems.append({"row": k, "reason": "conversation with no user or assistant text"})
            continue
        n += 1
    messages = pd.DataFrame(rows, columns=["conversation_id", "user_id", "turn_index", "role", "text", "sent_at", "modality"])
    messages["sent_at"] = pd.to_datetime(messages["sent_at"], utc=True)
    users = pd.DataFrame({"user_id": [uid], "region": region})
    return ImportResult(messages, users, f"ChatGPT export {path}", n, skipped, problems=problems)


def _deepest_leaf(mapping: dict) -> str | None:
    leaves = [k for k, v in mapping.items() if not v.get("children")]
    return leaves[-1] if leaves else None


def detect_json_format(path: str | Path) -> str:
    """'sharegpt' or 'chatgpt_export', from the first record of a JSON array."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(200_000)
    for _, rec, _ in iter_json_array(head, path):
        if isinstance(rec, dict) and "mapping" in rec:
            return "chatgpt_export"
        if isinstance(rec, dict) and "conversations" in rec:
            return "sharegpt"
        break
    if '"mapping"' in head:
        return "chatgpt_export"
    if '"conversations"' in head:
        return "sharegpt"
    raise DataError(path, "unrecognized JSON: expected a ShareGPT array ({id, conversations}) or a ChatGPT export ({mapping})")


# ------------------------------------------------------------------------------- the inputs


@dataclass
class Inputs:
    """Validated input tables of one audit, the quarantine and where each came from."""

    messages: pd.DataFrame
    users: pd.DataFrame
    impressions: pd.DataFrame | None
    filter_decisions: pd.DataFrame | None
    labels: pd.DataFrame | None
    quarantine: pd.DataFrame
    sources: dict[str, str]
    n_read: dict[str, int]
    imports: list[ImportResult] = field(default_factory=list)

    def quality_summary(self) -> pd.DataFrame:
        """Rows read, kept and quarantined per table."""
        out = []
        for t, n in self.n_read.items():
            q = int((self.quarantine["table"] == t).sum()) if len(self.quarantine) else 0
            q_rows = self.quarantine.loc[self.quarantine["table"] == t, "row"].nunique() if len(self.quarantine) else 0
            kept = len(getattr(self, t)) if getattr(self, t) is not None else 0
            out.append({"table": t, "file": self.sources.get(t), "rows_read": n, "rows_kept": kept, "rows_quarantined": n - kept, "problems": q, "distinct_bad_rows": q_rows})
        return pd.DataFrame(out)

    def quarantine_reasons(self) -> pd.DataFrame:
        if not len(self.quarantine):
            return pd.DataFrame(columns=["table", "column", "reason", "rows"])
        r = self.quarantine.assign(reason=self.quarantine["reason"].str.replace(r", first seen at row \d+", "", regex=True))
        return r.groupby(["table", "column", "reason"], dropna=False).size().rename("rows").reset_index().sort_values("rows", ascending=False)


def find_input(input_dir: Path, table: str) -> Path | None:
    for name in (f"{table}.parquet", f"{table}.csv", f"{table}.jsonl", f"{table}.ndjson", table):
        p = input_dir / name
        if p.exists():
            return p
    if table == "messages":
        for name in ("conversations.json", "sharegpt.json", "messages.json"):
            if (input_dir / name).exists():
                return input_dir / name
    return None


def load_inputs(
    input_dir: str | Path | None = None,
    *,
    paths: dict[str, str | Path] | None = None,
    max_quarantine_share: float = 0.2,
    require: tuple[str, ...] = REQUIRED_TABLES,
) -> Inputs:
    """Find, read, validate and cross-check the audit's input tables.

    `paths` overrides the file of any table; the rest are looked up in `input_dir` by name.
    Raises DataError if a required table is missing or unusable, or if a table loses more than
    `max_quarantine_share` of its rows to quarantine.
    """
    input_dir = Path(input_dir) if input_dir else None
    found: dict[str, Path] = {}
    for t in REQUIRED_TABLES + OPTIONAL_TABLES:
        p = Path(paths[t]) if paths and t in paths else (find_input(input_dir, t) if input_dir else None)
        if p is not None:
            found[t] = p
    if "messages" not in found:
        raise DataError(input_dir or "<no input_dir>", "no messages table found (messages.parquet/.csv/.jsonl, or a ShareGPT / ChatGPT export .json)")
    imports: list[ImportResult] = []
    validated: dict[str, Validated] = {}
    allow_missing_time = False
    msg_path = found["messages"]
    if msg_path.suffix.lower() == ".json":
        fmt = detect_json_format(msg_path)
        imp = import_sharegpt(msg_path) if fmt == "sharegpt" else import_chatgpt_export(msg_path)
        imports.append(imp)
        allow_missing_time = imp.messages["sent_at"].isna().any()
        mdf = imp.messages.assign(_row=np.arange(1, len(imp.messages) + 1))
        validated["messages"] = validate("messages", mdf, msg_path, allow_missing_time=allow_missing_time)
        if "users" not in found:
            validated["users"] = validate("users", imp.users.assign(_row=np.arange(1, len(imp.users) + 1)), f"{msg_path} (users)")
        # a chat export is a corpus without ads: stages 00-02 run on it, leakage and lift need impressions
        require = tuple(t for t in require if t != "impressions")
    for t in REQUIRED_TABLES + OPTIONAL_TABLES:
        if t in validated:
            continue
        if t not in found:
            if t in require:
                raise DataError(input_dir or "<no input_dir>", f"required table {t!r} not found ({t}.parquet, .csv or .jsonl)")
            continue
        validated[t] = validate(t, read_table(found[t]), found[t])

    qs = [v.quarantine for v in validated.values()]
    tables = {t: v.data for t, v in validated.items()}
    # cross-table checks: every reference must resolve
    users = tables["users"]
    known_users = set(users["user_id"])
    msgs = tables["messages"]
    orphan = ~msgs["user_id"].isin(known_users)
    if orphan.any():
        qs.append(_q("messages", validated["messages"].file, msgs.loc[orphan, "_row"], "user_id", "user_id not in users table", msgs.loc[orphan, "user_id"].tolist()))
        msgs = msgs[~orphan]
    n_owner = msgs.groupby("conversation_id")["user_id"].transform("nunique")
    if (n_owner > 1).any():
        bad = n_owner > 1
        qs.append(_q("messages", validated["messages"].file, msgs.loc[bad, "_row"], "user_id", "conversation has turns from more than one user_id", msgs.loc[bad, "conversation_id"].tolist()))
        msgs = msgs[~bad]
    tables["messages"] = msgs
    conv_ids = set(msgs["conversation_id"])
    if "impressions" in tables:
        imp = tables["impressions"]
        orphan = ~imp["user_id"].isin(known_users)
        if orphan.any():
            qs.append(_q("impressions", validated["impressions"].file, imp.loc[orphan, "_row"], "user_id", "user_id not in users table", imp.loc[orphan, "user_id"].tolist()))
            tables["impressions"] = imp[~orphan]
    for t in OPTIONAL_TABLES:
        if t in tables:
            d = tables[t]
            orphan = ~d["conversation_id"].isin(conv_ids)
            if orphan.any():
                qs.append(_q(t, validated[t].file, d.loc[orphan, "_row"], "conversation_id", "conversation_id not in messages", d.loc[orphan, "conversation_id"].tolist()))
                tables[t] = d[~orphan]
    quarantine = pd.concat([q for q in qs if len(q)], ignore_index=True) if any(len(q) for q in qs) else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    n_read = {t: v.n_read for t, v in validated.items()}
    for t, df in tables.items():
        lost = 1 - len(df) / n_read[t]
        if lost > max_quarantine_share:
            top = quarantine[quarantine["table"] == t]["reason"].value_counts().head(3)
            raise DataError(
                validated[t].file,
                f"{lost:.0%} of rows quarantined (limit {max_quarantine_share:.0%}); top reasons: "
                + "; ".join(f"{r} ({c})" for r, c in top.items()),
            )
    return Inputs(
        messages=tables["messages"].drop(columns="_row").reset_index(drop=True),
        users=tables["users"].drop(columns="_row").reset_index(drop=True),
        impressions=tables["impressions"].drop(columns="_row").reset_index(drop=True) if "impressions" in tables else None,
        filter_decisions=tables["filter_decisions"].drop(columns="_row").reset_index(drop=True) if "filter_decisions" in tables else None,
        labels=tables["labels"].drop(columns="_row").reset_index(drop=True) if "labels" in tables else None,
        quarantine=quarantine,
        sources={t: str(p) for t, p in found.items()},
        n_read=n_read,
        imports=imports,
    )


# --------------------------------------------------------------------------- conversations


def build_conversations(
    messages: pd.DataFrame,
    users: pd.DataFrame,
    *,
    excluded_regions=DEFAULT_EXCLUDED,
    policy_date: str | None = None,
) -> pd.DataFrame:
    """One row per conversation: the user-side document (user turns, one per line), its opening
    (the first user turn: what the conversation asks), owner, region, excluded flag, times, turns."""
    from analysis.privacy import scrub_pii

    m = messages.sort_values(["conversation_id", "turn_index"])
    user_side = m[m["role"] == "user"]
    docs = user_side.groupby("conversation_id", sort=False)["text"].agg("\n".join)
    openings = user_side.groupby("conversation_id", sort=False)["text"].first()
    g = m.groupby("conversation_id", sort=False)
    conv = pd.DataFrame(
        {
            "user_id": g["user_id"].first(),
            "started_at": g["sent_at"].min(),
            "ended_at": g["sent_at"].max(),
            "n_turns": g.size(),
            "n_user_turns": user_side.groupby("conversation_id").size(),
            "voice": (m["modality"] == "voice").groupby(m["conversation_id"], sort=False).any(),
        }
    )
    conv["n_user_turns"] = conv["n_user_turns"].fillna(0).astype("int64")
    conv["document"] = docs.reindex(conv.index).fillna("")
    conv["opening"] = openings.reindex(conv.index).fillna("")
    conv = conv.reset_index().merge(users[["user_id", "region"]], on="user_id", how="left")
    conv["excluded"] = is_excluded(conv["region"], excluded_regions)
    if policy_date is not None:
        conv["after_policy"] = conv["started_at"] >= pd.Timestamp(policy_date, tz="UTC")
    conv["document_display"] = conv["document"].map(scrub_pii)
    cols = ["conversation_id", "user_id", "region", "excluded", "started_at", "ended_at", "n_turns", "n_user_turns", "voice"]
    cols += ["after_policy"] if policy_date is not None else []
    return conv[cols + ["document", "opening", "document_display"]]


# ------------------------------------------------------------------------------- the stage


@dataclass
class IngestResult:
    """What stage 00 produced: tables written under `run_dir/data/` and the data-quality summary."""

    inputs: Inputs
    conversations: pd.DataFrame
    artifacts: dict[str, str]
    excluded_regions: tuple = DEFAULT_EXCLUDED

    def summary(self) -> pd.DataFrame:
        return self.inputs.quality_summary()

    def region_volumes(self, min_cell_users: int = 10) -> pd.DataFrame:
        """Users and conversations per region, small cells suppressed."""
        from analysis.privacy import suppress_small_cells

        c = self.conversations
        users = self.inputs.users
        v = (
            users.groupby("region").size().rename("users").to_frame()
            .join(c.groupby("region").size().rename("conversations"), how="left")
            .fillna(0).astype("int64").reset_index()
        )
        v["excluded"] = is_excluded(v["region"], self.excluded_regions)
        v = v.sort_values(["excluded", "users"], ascending=[True, False]).reset_index(drop=True)
        return suppress_small_cells(v, ["users", "conversations"], k=min_cell_users, by="users")


def ingest(
    input_dir: str | Path,
    run_dir: str | Path,
    *,
    excluded_regions=None,
    policy_date: str | None = None,
    max_quarantine_share: float = 0.2,
) -> IngestResult:
    """Stage 00: load and validate the inputs, build the conversations table, write the artifacts."""
    from analysis.storage import write_parquet

    excluded = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    inputs = load_inputs(input_dir, max_quarantine_share=max_quarantine_share)
    conv = build_conversations(inputs.messages, inputs.users, excluded_regions=excluded, policy_date=policy_date)
    out = Path(run_dir) / "data"
    artifacts = {"conversations": str(write_parquet(conv, out / "conversations.parquet"))}
    artifacts["quarantine"] = str(write_parquet(inputs.quarantine.astype({"value": "object"}), out / "quarantine.parquet"))
    for t in ("users", "impressions", "filter_decisions", "labels"):
        df = getattr(inputs, t)
        if df is not None:
            artifacts[t] = str(write_parquet(df, out / f"{t}.parquet"))
    res = IngestResult(inputs, conv, artifacts, excluded)
    _record_metrics(res, Path(input_dir), Path(run_dir))
    return res


def read_ground_truth(input_dir: str | Path) -> dict | None:
    """The simulator's ground truth when the inputs are a simulated world, else None."""
    p = Path(input_dir) / "ground_truth.json"
    return json.loads(p.read_text()) if p.exists() else None


def _record_metrics(res: IngestResult, input_dir: Path, run_dir: Path) -> None:
    from analysis.metrics import MetricsRecorder

    gt = read_ground_truth(input_dir) if input_dir.is_dir() else None
    counts = (gt or {}).get("counts", {})
    m = MetricsRecorder(run_dir, "00_ingest")
    for row in res.summary().itertuples():
        m.add("rows_read", row.rows_read, group={"table": row.table})
        m.add("rows_quarantined", row.rows_quarantined, group={"table": row.table})
    c = res.conversations
    m.add("conversations", len(c), truth=counts.get("conversations"))
    m.add("users", len(res.inputs.users), truth=counts.get("users"))
    m.add("users_excluded_region", int(is_excluded(res.inputs.users["region"], res.excluded_regions).sum()), truth=counts.get("users_excluded"))
    if res.inputs.impressions is not None:
        m.add("impressions", len(res.inputs.impressions), truth=counts.get("impressions"))
    m.add("voice_share", float(c["voice"].mean()) if len(c) else None, n=len(c))
    m.write()
