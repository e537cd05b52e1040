"""Hand labels of conversations, and the deterministic id-hash split used to tune and validate."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.contract.schemas import DataError
from analysis.ingest.check import check_table
from analysis.ingest.readers import read_table


def id_hash(ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per id from a seeded hash: deterministic splits and folds
    (`< share` is a tuning part, `* k` a fold number) that do not depend on row order."""
    return ids.astype(str).map(lambda s: int(hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()[:8], 16) / 2**32).to_numpy()

def read_labels(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Labels from one file or several (CSV, JSON Lines or Parquet), read and checked by ingest's
    reader and the `labels` schema, so they accept what `input_dir/labels.*` accepts (`;`-separated
    or empty art9, tier-1 ids or names; tier-1 becomes its id). Other columns are kept. A bad value
    or a conversation labeled in two rows or files is an error naming file, row, column and reason:
    a validation sample with silently dropped labels would bias every figure computed on it."""
    parts = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        raw = read_table(p)
        chk = check_table("labels", raw, p)
        if len(chk.quarantine):
            r = chk.quarantine.iloc[0]
            more = f" ({len(chk.quarantine) - 1} more bad value(s))" if len(chk.quarantine) > 1 else ""
            raise DataError(p, f"{r.reason}: {r.value!r}{more}", row=int(r.row), column=r.column)
        extra = raw.drop(columns=[c for c in chk.data.columns if c != "_row" and c in raw.columns])
        parts.append(chk.data.merge(extra, on="_row", how="left").drop(columns="_row").assign(labels_file=str(p)))
    out = pd.concat(parts, ignore_index=True)
    dup = out["conversation_id"].duplicated(keep=False)
    if dup.any():
        first = out.loc[dup, "conversation_id"].iloc[0]
        raise DataError(sorted(set(out.loc[out["conversation_id"] == first, "labels_file"]))[0],
                        f"conversation {first!r} is labeled in more than one row/file: {sorted(set(out.loc[out['conversation_id'] == first, 'labels_file']))}")
    return out
