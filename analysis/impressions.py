"""Impression logs: the compact reader, the chat flag, and the reduction to sufficient statistics (LiftData)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.util.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE, is_excluded

NS_PER_DAY = 86_400 * 10**9
CHAT_SOURCE = "ai_chat"
ARMS = ("treatment", "holdout")

# ----------------------------------------------------------------------------- loading


def read_impressions(path: str | Path) -> pd.DataFrame:
    """Impressions in the compact form `aggregate` needs, read column-wise with Arrow.

    `targeting_sources` (a list per row) becomes a boolean `chat` ("ai_chat" among the sources)
    without materializing Python lists; ids become categoricals. Missing optional columns stay absent.
    """
    schema = pq.ParquetDataset(path).schema  # a file or a folder of part files
    # an optional column of Arrow type null (written all-empty) is no column
    cols = [c for c in ("user_id", "shown_at", "ad_category", "clicked", "targeting_sources", "arm")
            if c in schema.names and not pa.types.is_null(schema.field(c).type)]
    t = pq.read_table(path, columns=cols)
    out = {
        "user_id": t["user_id"].combine_chunks().dictionary_encode(),
        "shown_at": t["shown_at"],
        "ad_category": t["ad_category"].combine_chunks().dictionary_encode(),
        "clicked": t["clicked"],
    }
    if "arm" in cols:
        out["arm"] = t["arm"].combine_chunks().dictionary_encode()
    if "targeting_sources" in cols:
        out["chat"] = pa.array(chat_flag(t["targeting_sources"].combine_chunks()))
    return pa.table(out).to_pandas()


def chat_flag(lists) -> np.ndarray:
    """True where the row's list of targeting sources contains "ai_chat" (null lists: False)."""
    if not isinstance(lists, (pa.Array, pa.ChunkedArray)):
        lists = pa.array([None if v is None else list(v) for v in lists], type=pa.list_(pa.string()))
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flag = np.zeros(len(lists), dtype=bool)
    hit = pc.equal(pc.list_flatten(lists), CHAT_SOURCE).fill_null(False).to_numpy(zero_copy_only=False)
    flag[pc.list_parent_indices(lists).to_numpy()[hit]] = True
    return flag


# ------------------------------------------------------------------------- aggregation


@dataclass
class LiftData:
    """Sufficient statistics of an impression log.

    users: one row per user (index = user code): user_id, region, included, arm.
    user_week: user, week (weeks since the policy date; edge weeks with < 4 days merged inward),
        impressions, clicks. `week >= 0` is the post period.
    category_cells: included regions, post period: user, ad_category, chat, impressions, clicks
        (None when the log has no targeting_sources).
    """

    users: pd.DataFrame
    user_week: pd.DataFrame
    category_cells: pd.DataFrame | None
    policy_date: str
    n_impressions: int
    n_dropped: int = 0  # impressions of users without a known region
    _per_user: pd.DataFrame | None = field(default=None, repr=False)

    @cached_property
    def user_period(self) -> pd.DataFrame:
        """user, post, impressions, clicks (+ included, region, arm); rows with impressions only."""
        pu = self.per_user()
        parts = []
        for post, sfx in ((False, "pre"), (True, "post")):
            m = pu[f"imp_{sfx}"].to_numpy() > 0
            parts.append(pd.DataFrame({"user": pu.index[m], "post": post, "impressions": pu[f"imp_{sfx}"].to_numpy()[m],
                                       "clicks": pu[f"clk_{sfx}"].to_numpy()[m]}))
        up = pd.concat(parts, ignore_index=True).sort_values(["user", "post"], kind="stable", ignore_index=True)
        return up.join(self.users[["included", "region", "arm"]], on="user")

    def per_user(self) -> pd.DataFrame:
        """One row per user: imp_pre, clk_pre, imp_post, clk_post plus the user's attributes."""
        if self._per_user is None:
            uw = self.user_week
            size = int(self.users.index.max()) + 1 if len(self.users) else 0
            u = uw["user"].to_numpy()
            post = uw["week"].to_numpy() >= 0
            out = pd.DataFrame(index=self.users.index)
            for name, col in (("imp", "impressions"), ("clk", "clicks")):
                v = uw[col].to_numpy(float)
                for sfx, m in (("pre", ~post), ("post", post)):
                    out[f"{name}_{sfx}"] = np.bincount(u[m], weights=v[m], minlength=size)[out.index].astype(np.int64)
            self._per_user = out.join(self.users[["included", "region", "arm"]])
        return self._per_user

    def cells(self) -> pd.DataFrame:
        """CTR by region group and period (impression-weighted) with user and impression counts."""
        up = self.user_period
        g = up.groupby(["included", "post"]).agg(users=("user", "nunique"), impressions=("impressions", "sum"), clicks=("clicks", "sum"))
        g["ctr"] = g["clicks"] / g["impressions"]
        g = g.reset_index()
        g["group"] = np.where(g["included"], "included", "excluded")
        g["period"] = np.where(g["post"], "post", "pre")
        return g[["group", "period", "users", "impressions", "clicks", "ctr"]]

    def summary(self) -> pd.DataFrame:
        u = self.users
        return pd.DataFrame(
            {
                "impressions": [self.n_impressions],
                "impressions_dropped_no_region": [self.n_dropped],
                "users": [len(u)],
                "users_included": [int(u["included"].sum())],
                "users_with_arm": [int(u["arm"].notna().sum())],
                "user_weeks": [len(self.user_week)],
                "weeks": [f"{self.user_week['week'].min()}..{self.user_week['week'].max()}"],
            }
        )


def aggregate(
    impressions: pd.DataFrame,
    users: pd.DataFrame,
    *,
    policy_date: str = DEFAULT_POLICY_DATE,
    excluded_regions=None,
) -> LiftData:
    """Reduce an impression log to per-user-week (and per-user-category) counts, in memory.

    `impressions` needs user_id, shown_at, clicked; optional ad_category, arm and either
    `chat` (bool) or `targeting_sources` (lists). `users` needs user_id and region. The Dask
    engine computes the same partial sums by groupby and finishes them with `assemble`.
    """
    excluded = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    uid = impressions["user_id"]
    ucat = uid.array if isinstance(uid.dtype, pd.CategoricalDtype) else pd.Categorical(uid)
    codes = np.asarray(ucat.codes, dtype=np.int64)
    nu = len(ucat.categories)
    region = user_regions(users, ucat.categories)
    known = pd.notna(region)
    keep = known[codes] if len(codes) else np.zeros(0, dtype=bool)

    t = impressions["shown_at"]
    t = t.dt.tz_convert("UTC") if getattr(t.dt, "tz", None) is not None else t.dt.tz_localize("UTC")
    ns = t.to_numpy(dtype="datetime64[ns]").view("int64") - pd.Timestamp(policy_date, tz="UTC").value
    day = np.floor_divide(ns, NS_PER_DAY)
    week = np.floor_divide(day, 7)
    clicked = impressions["clicked"].to_numpy(dtype=bool)
    dk = day[keep]
    days = np.flatnonzero(np.bincount(dk - dk.min())) + dk.min()
    # partial sums per user and raw week (the Dask engine's groupby gives the same)
    wk = week[keep]
    w0 = int(wk.min())
    nw = int(wk.max()) - w0 + 1
    k, size, sums = _count_by(codes[keep] * nw + (wk - w0), clicked[keep])
    user_week = (k // nw, k % nw + w0, size, sums)

    n_arm = None
    if "arm" in impressions:
        a = impressions["arm"]
        a = a.array if isinstance(a.dtype, pd.CategoricalDtype) else pd.Categorical(a)
        n_arm = [np.bincount(codes, weights=np.asarray(a == arm_name), minlength=nu) for arm_name in ARMS]

    cells = None
    chat = None
    if "chat" in impressions:
        chat = impressions["chat"].to_numpy(dtype=bool)
    elif "targeting_sources" in impressions:
        chat = chat_flag(impressions["targeting_sources"])
    if chat is not None and "ad_category" in impressions:
        included = included_users(region, excluded)
        m = keep & (day >= 0) & included[codes]
        cat = impressions["ad_category"]
        ccat = cat.array if isinstance(cat.dtype, pd.CategoricalDtype) else pd.Categorical(cat)
        ccodes = np.asarray(ccat.codes, dtype=np.int64)[m]
        k, size, sums = _count_by((ccodes * nu + codes[m]) * 2 + chat[m], clicked[m])
        cells = (k, size, sums, np.asarray(ccat.categories, dtype=object))
    return assemble(np.asarray(ucat.categories, dtype=object), region, days, user_week, n_arm, cells, policy_date=policy_date,
                    excluded_regions=excluded, n_impressions=int(len(impressions)), n_dropped=int((~keep).sum()))


def user_regions(users: pd.DataFrame, user_ids) -> np.ndarray:
    """The region of each of `user_ids` (None where the users table lacks it)."""
    regions = users.drop_duplicates("user_id").set_index("user_id")["region"]
    return regions.reindex(pd.Index(user_ids)).to_numpy(dtype=object)


def included_users(region: np.ndarray, excluded_regions) -> np.ndarray:
    return ~is_excluded(pd.Series(region, dtype="object").fillna(""), excluded_regions).to_numpy()


def assemble(user_ids: np.ndarray, region: np.ndarray, days: np.ndarray, user_week: tuple, n_arm: list | None, cells: tuple | None, *,
             policy_date: str, excluded_regions, n_impressions: int, n_dropped: int) -> LiftData:
    """The rules that turn partial sums into `LiftData`, shared by every engine.

    `days`: the distinct days (since the policy date) with data of users with a known region;
    `user_week`: (user code, raw week, impressions, clicks) summed per user and week; `n_arm`:
    per arm (ARMS order) the impressions of each user; `cells`: (key, impressions, clicks,
    categories) with key = (category code * users + user code) * 2 + chat, included regions and
    the post period only. Rules: an edge week covered by fewer than 4 days of data is merged into
    its neighbour, never across the policy date; a user seen in both arms has no arm.
    """
    nu = len(user_ids)
    known = pd.notna(region)
    included = included_users(region, excluded_regions)
    dw = np.asarray(days, dtype=np.int64) // 7  # weeks of the days that have data
    wk, ndays = np.unique(dw, return_counts=True)
    lo = wk[0] + (1 if len(wk) > 1 and ndays[0] < 4 else 0)
    hi = wk[-1] - (1 if len(wk) > 1 and ndays[-1] < 4 else 0)
    u, w, n, c = (np.asarray(x) for x in user_week)
    w = w.astype(np.int64)
    w2 = np.clip(w, lo, hi)
    w2 = np.where(w >= 0, np.maximum(w2, 0), np.minimum(w2, -1))  # a merge never crosses the policy date
    nw = int(hi - lo + 1)
    key = u.astype(np.int64) * nw + (w2 - lo)
    size = np.bincount(key, weights=n.astype(float))
    clicks = np.bincount(key, weights=c.astype(float))
    k = np.flatnonzero(size)
    uw = pd.DataFrame({"user": k // nw, "week": k % nw + lo, "impressions": size[k].astype(np.int64), "clicks": clicks[k].astype(np.int64)})

    arm = np.full(nu, None, dtype=object)
    if n_arm is not None:
        ac = np.where(n_arm[0] > 0, 0, np.where(n_arm[1] > 0, 1, -1))
        # a user seen in both arms is not a clean experimental unit: leave them out of the A/B
        ac = np.where((n_arm[0] > 0) & (n_arm[1] > 0), -1, ac)
        arm = np.array([None, *ARMS], dtype=object)[ac + 1]
    user_tab = pd.DataFrame({"user_id": user_ids, "region": region, "included": included, "arm": arm})
    user_tab = user_tab[known].rename_axis("user")

    cat_cells = None
    if cells is not None:
        ck, cn, cc, cats = cells
        o = np.argsort(ck, kind="stable")
        ck = np.asarray(ck, dtype=np.int64)[o]
        cat_cells = pd.DataFrame({"ad_category": np.asarray(cats, dtype=object)[ck // (2 * nu)], "user": (ck // 2) % nu,
                                  "chat": (ck % 2).astype(bool), "impressions": np.asarray(cn, dtype=np.int64)[o],
                                  "clicks": np.asarray(cc, dtype=np.int64)[o]})
    return LiftData(user_tab, uw, cat_cells, policy_date, n_impressions, n_dropped)


def _count_by(key: np.ndarray, flag: np.ndarray, dense_limit: int = 50_000_000):
    """Distinct keys (sorted), rows per key and flagged rows per key: bincount when the key range
    is small enough for a dense array, a hash group-by otherwise."""
    key = np.asarray(key, dtype=np.int64)
    if len(key) and key.max() < dense_limit:
        size = np.bincount(key)
        sums = np.bincount(key, weights=flag).astype(np.int64)
        k = np.flatnonzero(size)
        return k, size[k].astype(np.int64), sums[k]
    g = pd.DataFrame({"k": key, "c": flag}).groupby("k", sort=True)["c"].agg(["size", "sum"])
    return g.index.to_numpy(np.int64), g["size"].to_numpy(np.int64), g["sum"].to_numpy(np.int64)
