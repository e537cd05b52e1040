"""Readers: Parquet, CSV and JSON Lines into a frame with a 1-based `_row` column; unusable files raise DataError."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.schemas import DataError

# ---------------------------------------------------------------------------------- readers


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one file into a frame with a `_row` column (1-based record number); raise DataError if unreadable."""
    path = Path(path)
    if path.is_dir():  # a Parquet dataset: part files, flat or Hive-partitioned (key=value/ folders)
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(path, "the folder holds no .parquet files (nor key=value/ subfolders of them)")
        df = pd.concat([_read_parquet(f).assign(**_hive_keys(f, path)) for f in files], ignore_index=True)
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


def _hive_keys(file: Path, root: Path) -> dict[str, str]:
    """The partition columns of a Hive-partitioned file (`month=2025-11/part-0.parquet` -> month)."""
    return dict(p.split("=", 1) for p in file.relative_to(root).parent.parts if "=" in p)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"not a readable Parquet file ({type(e).__name__}: {e})") from e


def decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line}); re-encode the file as UTF-8") from e


def _read_csv(path: Path) -> pd.DataFrame:
    text = decode_utf8(path)
    if not text.strip():
        raise DataError(path, "empty file: no header and no rows")
    header = text.split("\n", 1)[0]
    if header.count(",") == 0 and header.count(";") >= 2:
        raise DataError(path, "looks ';'-delimited (its header has no comma and several ';'): save it comma-delimited", row=0)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as e:
        raise DataError(path, f"malformed CSV: {e}") from e
    return df


def _read_jsonl(path: Path) -> pd.DataFrame:
    text = decode_utf8(path)
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
