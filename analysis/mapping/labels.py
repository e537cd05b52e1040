"""Hand labels of conversations, and the deterministic id-hash split used to tune and validate."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9


def id_hash(ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per id from a seeded hash: deterministic splits and folds
    (`< share` is a tuning part, `* k` a fold number) that do not depend on row order."""
    return ids.astype(str).map(lambda s: int(hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()[:8], 16) / 2**32).to_numpy()

def read_labels(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Labels from one file or several (CSV with conversation_id and ';'-separated art9, or Parquet);
    a conversation labeled in two files is an error, not a silent choice."""
    parts = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        lp = Path(p)
        if not lp.exists():
            raise FileNotFoundError(f"labels file {lp} does not exist")
        lab = pd.read_csv(lp, keep_default_na=False) if lp.suffix == ".csv" else pd.read_parquet(lp)
        missing = {"conversation_id", "art9"} - set(lab.columns)
        if missing:
            raise ValueError(f"{lp}: labels need columns conversation_id and art9 (missing {sorted(missing)})")
        if lab["art9"].map(lambda v: isinstance(v, str)).all():
            lab["art9"] = lab["art9"].map(lambda s: [x.strip() for x in s.replace(",", ";").split(";") if x.strip()])
        bad = sorted({c for v in lab["art9"] for c in v} - set(ART9))
        if bad:
            row = int(lab.index[lab["art9"].map(lambda v: bool(set(v) & set(bad)))][0]) + 1
            raise ValueError(f"{lp}: row {row}, column art9: unknown category {bad[0]!r} (choose from {list(ART9)})")
        parts.append(lab.assign(labels_file=str(lp)))
    out = pd.concat(parts, ignore_index=True)
    dup = out["conversation_id"].duplicated(keep=False)
    if dup.any():
        first = out.loc[dup, "conversation_id"].iloc[0]
        raise ValueError(f"conversation {first!r} is labeled in more than one row/file: {sorted(set(out.loc[out['conversation_id'] == first, 'labels_file']))}")
    return out
