"""The GDPR Art. 9 special categories, in one order, read once from `analysis/data/art9.yaml`.

The YAML is the only list: its `categories` keys (in file order) are `ART9`, its `summary_name`s
name the categories in the stakeholder summary's sentences. The full definitions (ids, IAB
subtrees, lexicon, exemplars) are validated by `analysis.util.taxonomy.load_art9`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml


def art9_data_path() -> Path:
    return Path(str(resources.files("analysis") / "data" / "art9.yaml"))


def _read() -> dict:
    raw = yaml.safe_load(art9_data_path().read_text(encoding="utf-8"))
    return raw["categories"]


_CATEGORIES = _read()
ART9: tuple[str, ...] = tuple(_CATEGORIES)
SUMMARY_NAMES: dict[str, str] = {c: str((d or {}).get("summary_name") or c) for c, d in _CATEGORIES.items()}


def label_matrix(lists: Sequence, cats: Sequence[str] = ART9) -> np.ndarray:
    """Lists of category names (one list per row) -> boolean matrix (rows, categories).
    Names outside `cats` and rows that are not lists (None, NaN) count as no category."""
    cats = list(cats)
    col = {c: j for j, c in enumerate(cats)}
    out = np.zeros((len(lists), len(cats)), dtype=bool)
    for i, v in enumerate(lists):
        if isinstance(v, (list, tuple, set, np.ndarray)):
            for x in v:
                j = col.get(x)
                if j is not None:
                    out[i, j] = True
    return out
