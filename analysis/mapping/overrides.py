"""Analyst overrides of the topic -> IAB mapping and of the Art. 9 ad nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from analysis.contract.art9 import ART9
from analysis.util.taxonomy import TaxonomyError, load_taxonomy

UNMAPPED = "unmapped"

# ------------------------------------------------------------------------------ overrides


@dataclass
class Overrides:
    """The analyst's corrections: topic -> IAB id (or "unmapped"), and category -> ad nodes."""

    topics: dict[str, str | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    ad_nodes: dict[str, list[str]] = field(default_factory=dict)
    source: str | None = None
    conversations: dict[str, str | None] = field(default_factory=dict)  # conversation id -> IAB id or None (no ad category)

    @classmethod
    def load(cls, path: str | Path | None, taxonomy: pd.DataFrame | None = None) -> "Overrides":
        """Read and validate the YAML file (missing path or empty file: no overrides)."""
        if not path:
            return cls()
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"overrides file {p} does not exist")
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise TaxonomyError(f"{p}: expected a mapping with 'topics', 'conversations' and/or 'ad_nodes'")
        known = set((taxonomy if taxonomy is not None else load_taxonomy())["id"])
        topics, notes = {}, {}
        for key, val in (raw.get("topics") or {}).items():
            note = ""
            if isinstance(val, dict):
                note = str(val.get("note") or "")
                val = val.get("iab_id")
            iab = None if val in (None, "", UNMAPPED) else str(val)
            if iab is not None and iab not in known:
                raise TaxonomyError(f"{p}: topic {key!r}: unknown IAB node id {iab!r}")
            topics[str(key)] = iab
            notes[str(key)] = note
        ad_nodes = {}
        for c, nodes in (raw.get("ad_nodes") or {}).items():
            if c not in ART9:
                raise TaxonomyError(f"{p}: ad_nodes: unknown category {c!r} (choose from {list(ART9)})")
            bad = [str(n) for n in nodes if str(n) not in known]
            if bad:
                raise TaxonomyError(f"{p}: ad_nodes for {c}: unknown IAB node id(s) {bad}")
            ad_nodes[c] = [str(n) for n in nodes]
        convs = {}
        for key, val in (raw.get("conversations") or {}).items():
            iab = None if val in (None, "", UNMAPPED, "none") else str(val)
            if iab is not None and iab not in known:
                raise TaxonomyError(f"{p}: conversation {key!r}: unknown IAB node id {iab!r}")
            convs[str(key)] = iab
        return cls(topics, notes, ad_nodes, str(p), convs)

    def for_topic(self, topic, label: str | None = None) -> tuple[bool, str | None, str]:
        """(overridden?, IAB id or None, note) for a topic id, else for its label."""
        for key in (str(topic), str(label) if label is not None else None):
            if key is not None and key in self.topics:
                return True, self.topics[key], self.notes.get(key, "")
        return False, None, ""
