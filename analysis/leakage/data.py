"""Leakage inputs: category memberships, validation counts and the exposure index of an impression log."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9, label_matrix
from analysis.impressions import chat_flag
from analysis.util.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE, is_excluded
from analysis.util.taxonomy import load_taxonomy

CHAT_SOURCE = "ai_chat"
GROUPS = ("all", "included", "excluded")
# Non-sensitive positive controls: topic -> the IAB node(s) its ads fall in (analysis/data/world_topics.yaml).
DEFAULT_CONTROLS = {
    "hiking": ["159"],
    "cooking": ["216"],
    "fitness": ["225"],
    "video_games": ["680"],
    "dogs": ["425"],
}

# ------------------------------------------------------------------------------ memberships


def flag_matrix(categories: pd.DataFrame, cats=ART9) -> pd.DataFrame:
    """Boolean (conversation_id x category) flags from `flag_<c>` columns or an `art9` list column."""
    cats = list(cats)
    if all(f"flag_{c}" in categories for c in cats):
        m = categories[[f"flag_{c}" for c in cats]].fillna(False).astype(bool).to_numpy()
    elif "art9" in categories:
        m = label_matrix(categories["art9"], cats)
    else:
        raise ValueError(f"conversation categories need flag_<category> columns or an 'art9' list column; have {list(categories.columns)}")
    return pd.DataFrame(m, index=pd.Index(categories["conversation_id"].astype(str), name="conversation_id"), columns=cats)

def related_nodes(nodes, taxonomy: pd.DataFrame | None = None) -> set[str]:
    """The nodes, everything below them and their ancestors: a conversation mapped anywhere on that
    branch (Video Gaming > PC Games for ads in Video Gaming) is about the same ads."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    parent = tax.set_index("id")["parent_id"].to_dict()
    children: dict[str, list[str]] = {}
    for c, p in parent.items():
        if isinstance(p, str):
            children.setdefault(p, []).append(c)
    out: set[str] = set()
    for n in map(str, nodes):
        todo = [n]  # the node and everything below it
        while todo:
            x = todo.pop()
            if x not in out:
                out.add(x)
                todo.extend(children.get(x, []))
        p = parent.get(n)
        while isinstance(p, str):
            out.add(p)
            p = parent.get(p)
    return out


def iab_matrix(categories: pd.DataFrame, controls: dict[str, list[str]], *, branch: bool = True) -> pd.DataFrame:
    """Boolean (conversation_id x control topic): the conversation maps to one of the topic's IAB nodes
    (with `branch`, to a node on the same branch: below or above one of them)."""
    col = next((c for c in ("iab_ids", "iab_id", "iab") if c in categories), None)
    idx = pd.Index(categories["conversation_id"].astype(str), name="conversation_id")
    if col is None:
        return pd.DataFrame(np.zeros((len(categories), 0), dtype=bool), index=idx)
    vals = categories[col]
    sets = [set(map(str, v)) if isinstance(v, (list, tuple, set, np.ndarray)) else ({str(v)} if isinstance(v, str) and v else set()) for v in vals]
    match = {name: (related_nodes(nodes) if branch else set(map(str, nodes))) for name, nodes in controls.items()}
    out = {name: np.fromiter((bool(s & match[name]) for s in sets), dtype=bool, count=len(sets)) for name in controls}
    return pd.DataFrame(out, index=idx)


def validation_counts(flags: pd.DataFrame, labels: pd.DataFrame, stratum: pd.Series | None = None) -> pd.DataFrame:
    """Per category tp, fn, tn, fp of `flags` against labeled conversations (`conversation_id`, `art9`);
    with `stratum` (a Series indexed by conversation_id), one row per category and stratum."""
    ids = labels["conversation_id"].astype(str).to_numpy(dtype=object)
    pos = flags.index.get_indexer(ids)
    first = ~pd.Series(ids).duplicated().to_numpy()
    ok = (pos >= 0) & first
    y = label_matrix(labels["art9"].to_numpy()[ok], flags.columns)
    p = flags.to_numpy(dtype=bool)[pos[ok]]
    strata = [(None, np.ones(len(y), dtype=bool))]
    if stratum is not None:
        s = stratum.reindex(flags.index).to_numpy()[pos[ok]]
        strata = [(v, s == v) for v in pd.unique(s)]
    rows = []
    for name, m in strata:
        yy, pp = y[m], p[m]
        tp, fn = (yy & pp).sum(axis=0), (yy & ~pp).sum(axis=0)
        tn, fp = (~yy & ~pp).sum(axis=0), (~yy & pp).sum(axis=0)
        for j, c in enumerate(flags.columns):
            r = {"category": c, "tp": int(tp[j]), "fn": int(fn[j]), "tn": int(tn[j]), "fp": int(fp[j])}
            if stratum is not None:
                r["stratum"] = name
            rows.append(r)
    out = pd.DataFrame(rows)
    out["sensitivity"] = out["tp"] / (out["tp"] + out["fn"]).where(lambda x: x > 0)
    out["specificity"] = out["tn"] / (out["tn"] + out["fp"]).where(lambda x: x > 0)
    return out

# ------------------------------------------------------------------------------- black box

def _codes(values: pd.Series, index: pd.Index) -> np.ndarray:
    """Position of each value in `index` (-1 if absent), fast for categoricals (codes mapped once)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        m = index.get_indexer(pd.Index(values.cat.categories).astype(str))
        c = values.cat.codes.to_numpy()
        return np.where(c >= 0, m[c], -1)
    return index.get_indexer(pd.Index(values).astype(str))


SHIFT = 36  # key = user code << 36 | seconds since origin (2^36 s ~ 2,000 years)


@dataclass
class ExposureData:
    """Impressions sorted by (user, time) as integer keys, for window counts by binary search."""
    user_ids: pd.Index
    included: np.ndarray  # per user code
    region: np.ndarray  # per user code
    key: np.ndarray  # int64 per impression, sorted
    node: np.ndarray  # node code per impression
    nodes: pd.Index
    chat: np.ndarray | None  # "ai_chat" among the impression's targeting sources
    origin: pd.Timestamp
    policy_s: int
    end_s: int

    @classmethod
    def build(cls, impressions: pd.DataFrame, users: pd.DataFrame, *, excluded_regions=None,
              policy_date: str = DEFAULT_POLICY_DATE) -> "ExposureData":
        excluded_regions = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
        u = users.drop_duplicates("user_id")
        uid = pd.Index(u["user_id"].astype(str))
        code = _codes(impressions["user_id"], uid)
        keep = code >= 0
        shown = pd.to_datetime(impressions["shown_at"], utc=True)
        origin = shown.min() - pd.Timedelta(days=400)
        sec = ((shown - origin).dt.total_seconds().to_numpy()).astype(np.int64)
        ad = impressions["ad_category"]
        node_cat = ad.cat.rename_categories(lambda x: str(x)).array if isinstance(ad.dtype, pd.CategoricalDtype) else pd.Categorical(ad.astype(str))
        key = (code.astype(np.int64) << SHIFT) | sec
        key, node = key[keep], node_cat.codes[keep]
        chat = None
        if "chat" in impressions:
            chat = impressions["chat"].to_numpy(dtype=bool)[keep]
        elif "targeting_sources" in impressions:
            chat = chat_flag(impressions["targeting_sources"])[keep]
        order = np.argsort(key, kind="stable")
        policy = pd.Timestamp(policy_date, tz="UTC")
        return cls(uid, ~is_excluded(u["region"], excluded_regions).to_numpy(), u["region"].astype(str).to_numpy(),
                   key[order], node[order], pd.Index(node_cat.categories.astype(str)), None if chat is None else chat[order],
                   origin, int((policy - origin).total_seconds()), int(sec.max()) if len(sec) else 0)

    @property
    def start_s(self) -> int:
        """Time of the first impression (seconds since `origin`)."""
        return int((self.key & ((1 << SHIFT) - 1)).min()) if len(self.key) else 0

    def seconds(self, ts: pd.Series) -> np.ndarray:
        return ((pd.to_datetime(ts, utc=True) - self.origin).dt.total_seconds().to_numpy()).astype(np.int64)

    def cumulative(self, node_mask: np.ndarray) -> np.ndarray:
        """Running count of impressions in the nodes of `node_mask` (bool per node code), 0 first."""
        return np.concatenate([[0], np.cumsum(node_mask[self.node], dtype=np.int64)])

    def window_counts(self, users: np.ndarray, t0: np.ndarray, cs: np.ndarray, window_s: int) -> np.ndarray:
        """(n_before, k_before, n_after, k_after) per (user, t0): impressions in [t0 - w, t0) and [t0, t0 + w)
        and how many of them are in the nodes counted by `cs` (from `cumulative`)."""
        base = users.astype(np.int64) << SHIFT
        i0 = np.searchsorted(self.key, base | np.maximum(t0 - window_s, 0), side="left")
        i1 = np.searchsorted(self.key, base | t0, side="left")
        i2 = np.searchsorted(self.key, base | (t0 + window_s), side="left")
        return np.stack([i1 - i0, cs[i1] - cs[i0], i2 - i1, cs[i2] - cs[i1]], axis=1)

def primary_nodes(categories: pd.DataFrame) -> pd.Series:
    """conversation_id -> the first IAB node of the conversation's topics (from `iab_ids`/`iab_id`)."""
    col = next((c for c in ("iab_ids", "iab_id", "iab") if c in categories), None)
    idx = pd.Index(categories["conversation_id"].astype(str))
    if col is None:
        return pd.Series(dtype=object)
    v = [x[0] if isinstance(x, (list, tuple, np.ndarray)) and len(x) else (x if isinstance(x, str) and x else None) for x in categories[col]]
    return pd.Series(v, index=idx, dtype=object).dropna().astype(str)

@dataclass
class LeakageInputs:
    """What stage 03 reads from the run folder (stage 00 and stage 02 outputs; `analysis.stages.leakage.read_inputs`)."""
    conversations: pd.DataFrame
    users: pd.DataFrame
    categories: pd.DataFrame
    impressions: pd.DataFrame | None
    filter_decisions: pd.DataFrame | None
    labels: pd.DataFrame | None
    validation: pd.DataFrame | None

