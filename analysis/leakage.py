"""Stage 03: do sensitive (GDPR Art. 9) conversations reach ad targeting?

Two designs, both per category and region group (DESIGN.md §5):

- **White box** (the platform's filter decisions are given): the leak rate of category c is the
  share of conversations about c that passed the filter. `WhiteBoxLeakage` gives Clopper–Pearson
  and Wilson CIs (statsmodels), a one-sided exact binomial test against a tolerance (scipy) and
  Holm / BH adjustments across categories. Which conversations are "about c" comes either from
  labels (a labeled sample: exact, unbiased, small) or from our detector's flags (all
  conversations, but misclassified). `CorrectedLeakage` corrects the detector-based rate for the
  detector's error measured on the labeled sample (Rogan–Gladen per filter stratum).
- **Black box** (only the ads users saw): `ExposureTest` asks whether, after a conversation about
  c, a user's share of ads in c's IAB nodes rises more than it does for matched users without such
  a conversation (same region group, same period), and more than for excluded-region users with
  such a conversation (difference-in-differences). User-level permutation test of a Welch t
  statistic plus a cluster-robust binomial GLM. Non-sensitive topics (hiking -> outdoor gear ...)
  run through the same test as positive controls.

Excluded regions: any impression there with "ai_chat" among its targeting sources, or a
significant exposure effect among excluded-region users, is a violation (`violations`).

The detector interface is deliberately narrow: a frame of per-conversation flags
(`conversation_id`, `flag_<category>` [, `score_<category>`], optionally `iab_ids`) and a frame of
per-category validation counts (`category, tp, fn, tn, fp`). `simulated_detector` builds both from
a simulated world's truth, with chosen sensitivity and specificity, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from analysis.io import ART9
from analysis.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE, is_excluded

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


def label_matrix(lists, cats=ART9) -> np.ndarray:
    """Lists of category names -> boolean matrix (n, categories)."""
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


def related_nodes(nodes, taxonomy: pd.DataFrame | None = None) -> set[str]:
    """The nodes, everything below them and their ancestors: a conversation mapped anywhere on that
    branch (Video Gaming > PC Games for ads in Video Gaming) is about the same ads."""
    from analysis.taxonomy import descendants, load_taxonomy

    tax = load_taxonomy() if taxonomy is None else taxonomy
    parent = tax.set_index("id")["parent_id"].to_dict()
    out: set[str] = set()
    for n in map(str, nodes):
        out |= descendants(n, tax)
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


def simulated_detector(conversation_truth: pd.DataFrame, sensitivity: float | dict = 0.9, specificity: float | dict = 0.99,
                       seed: int = 0, topics: list[dict] | None = None) -> pd.DataFrame:
    """A stand-in for stage 02's output on a simulated world: flags with known error rates.

    score_c = Phi(z), z ~ N(Phi^-1(Se), 1) for true-c conversations and N(Phi^-1(1 - Sp), 1) otherwise,
    flag_c = score_c >= 0.5 (so P(flag | c) = Se, P(no flag | not c) = Sp exactly, and other
    thresholds trade one for the other). `iab_ids` holds the IAB nodes of the conversation's topics
    (both topics of a mixed conversation when `topics`, the ground truth's topic list, is given).
    """
    rng = np.random.default_rng(seed)
    y = label_matrix(conversation_truth["art9"], ART9)
    se = np.array([sensitivity[c] if isinstance(sensitivity, dict) else sensitivity for c in ART9])
    sp = np.array([specificity[c] if isinstance(specificity, dict) else specificity for c in ART9])
    mu = np.where(y, stats.norm.ppf(se)[None, :], stats.norm.ppf(1 - sp)[None, :])
    score = stats.norm.cdf(mu + rng.normal(size=y.shape))
    out = pd.DataFrame({"conversation_id": conversation_truth["conversation_id"].astype(str).to_numpy()})
    for j, c in enumerate(ART9):
        out[f"score_{c}"] = score[:, j]
    for j, c in enumerate(ART9):
        out[f"flag_{c}"] = score[:, j] >= 0.5
    flags = score >= 0.5
    out["any_sensitive"] = flags.any(axis=1)
    out["art9"] = [[c for j, c in enumerate(ART9) if f[j]] for f in flags]
    iab_of = {t["key"]: t.get("iab_id") for t in (topics or [])}
    a = conversation_truth["iab_id"].astype(object).to_numpy()
    b = conversation_truth["topic_b"].map(iab_of).astype(object).to_numpy() if topics else np.full(len(a), None)
    out["iab_ids"] = [[str(x) for x in (p, q) if isinstance(x, str) and x] for p, q in zip(a, b)]
    return out


# ------------------------------------------------------------------------------- white box


def _binom_cis(k: np.ndarray, n: np.ndarray, alpha: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.full(len(k), np.nan), np.full(len(k), np.nan)
    m = n > 0
    if m.any():
        lo[m], hi[m] = proportion_confint(k[m], n[m], alpha=alpha, method=method)
    return lo, hi


@dataclass
class LeakRateResult:
    """Leak rate per category and region group with CIs, tolerance tests and (simulated worlds) truth."""

    table: pd.DataFrame
    alpha: float
    tolerance: float
    basis: str
    min_cell: int = 10

    def summary(self) -> pd.DataFrame:
        """The publishable table: counts below `min_cell` suppressed, rates of such cells withheld."""
        from analysis.privacy import suppress_small_cells

        t = self.table.copy()
        small = (t["n"] > 0) & (t["n"] < self.min_cell)
        for c in ("leak_rate", "cp_low", "cp_high", "wilson_low", "wilson_high"):
            t[c] = t[c].where(~small)
        t = suppress_small_cells(t, ["n", "passed"], k=self.min_cell, complementary=False)
        cols = ["category", "region_group", "n", "passed", "leak_rate", "cp_low", "cp_high", "wilson_low", "wilson_high",
                "p_tolerance", "p_holm", "p_bh", "exceeds_tolerance_holm"]
        cols += [c for c in ("truth", "covers_truth_cp", "covers_truth_wilson") if c in t]
        return t[cols]

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, ax=None, group: str = "all", others: dict[str, pd.DataFrame] | None = None):
        """Forest plot: one row per category, Wilson interval (and other estimators' rows beside), truth as x."""
        t = self.table[self.table["region_group"] == group].copy()
        small = (t["n"] > 0) & (t["n"] < self.min_cell)  # withheld in the plot as in the table
        t.loc[small, ["leak_rate", "wilson_low", "wilson_high", "cp_low", "cp_high"]] = np.nan
        return forest_plot(t, ax=ax, tolerance=self.tolerance,
                           others={k: v[v["region_group"] == group] for k, v in (others or {}).items()},
                           label=f"{self.basis} (Wilson)")


class WhiteBoxLeakage:
    """Share of the conversations about each category that passed the platform's filter.

    `fit(passed, member, group)`: `passed` (bool per conversation), `member` (conversation x
    category booleans: which conversations are about which category), `group` (region group per
    conversation: "included" / "excluded"). A conversation about several categories counts in each.
    """

    def __init__(self, alpha: float = 0.05, tolerance: float = 0.01, min_cell: int = 10):
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
        self.alpha, self.tolerance, self.min_cell = alpha, tolerance, min_cell

    def fit(self, passed: pd.Series, member: pd.DataFrame, group: pd.Series, *, basis: str = "labels",
            truth: dict | None = None) -> LeakRateResult:
        passed = passed.reindex(member.index)
        keep = passed.notna().to_numpy()
        P = passed.to_numpy()[keep].astype(bool)
        M = member.to_numpy()[keep]
        G = group.reindex(member.index).to_numpy()[keep]
        rows = []
        for g in GROUPS:
            gm = np.ones(len(P), dtype=bool) if g == "all" else (G == g)
            for j, c in enumerate(member.columns):
                m = gm & M[:, j]
                rows.append({"category": c, "region_group": g, "n": int(m.sum()), "passed": int((m & P).sum())})
        t = pd.DataFrame(rows)
        k, n = t["passed"].to_numpy(), t["n"].to_numpy()
        t["leak_rate"] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        t["cp_low"], t["cp_high"] = _binom_cis(k, n, self.alpha, "beta")
        t["wilson_low"], t["wilson_high"] = _binom_cis(k, n, self.alpha, "wilson")
        t["jeffreys_low"], t["jeffreys_high"] = _binom_cis(k, n, self.alpha, "jeffreys")
        # H0: leak rate <= tolerance vs H1: above it (exact, one-sided)
        t["p_tolerance"] = [stats.binomtest(int(a), int(b), self.tolerance, alternative="greater").pvalue if b else np.nan for a, b in zip(k, n)]
        t["p_holm"], t["p_bh"] = np.nan, np.nan
        for g in GROUPS:
            m = (t["region_group"] == g) & t["p_tolerance"].notna()
            if m.any():
                t.loc[m, "p_holm"] = multipletests(t.loc[m, "p_tolerance"], alpha=self.alpha, method="holm")[1]
                t.loc[m, "p_bh"] = multipletests(t.loc[m, "p_tolerance"], alpha=self.alpha, method="fdr_bh")[1]
        t["exceeds_tolerance_holm"] = t["p_holm"] < self.alpha
        t["exceeds_tolerance_bh"] = t["p_bh"] < self.alpha
        t["basis"] = basis
        _attach_truth(t, truth)
        return LeakRateResult(t, self.alpha, self.tolerance, basis, self.min_cell)

    def by_region(self, passed: pd.Series, member: pd.DataFrame, region: pd.Series) -> pd.DataFrame:
        """Leak rate per category and region (Wilson CI); counts below min_cell suppressed."""
        from analysis.privacy import suppress_small_cells

        passed = passed.reindex(member.index)
        keep = passed.notna()
        df = member[keep.to_numpy()].copy()
        df["_passed"] = passed[keep].astype(bool).to_numpy()
        df["region"] = region.reindex(df.index).to_numpy()
        long = df.melt(id_vars=["region", "_passed"], var_name="category", value_name="member")
        long = long[long["member"]]
        t = long.groupby(["category", "region"]).agg(n=("member", "size"), passed=("_passed", "sum")).reset_index()
        k, n = t["passed"].to_numpy(), t["n"].to_numpy()
        t["leak_rate"] = k / n
        t["wilson_low"], t["wilson_high"] = _binom_cis(k, n, self.alpha, "wilson")
        small = t["n"] < self.min_cell
        t.loc[small, ["leak_rate", "wilson_low", "wilson_high"]] = np.nan
        return suppress_small_cells(t, ["n", "passed"], k=self.min_cell, complementary=False)


def _attach_truth(t: pd.DataFrame, truth: dict | None, est: str = "leak_rate") -> None:
    if not truth:
        return
    def tv(c, g):
        row = truth.get(c) or {}
        v = row.get("leak_rate") if g == "all" else ((row.get("by_region_group") or {}).get(g) or {}).get("leak_rate")
        return np.nan if v is None else float(v)
    t["truth"] = [tv(c, g) for c, g in zip(t["category"], t["region_group"])]
    for lo, hi, name in (("cp_low", "cp_high", "cp"), ("wilson_low", "wilson_high", "wilson"), ("ci_low", "ci_high", "ci")):
        if lo in t:
            t[f"covers_truth_{name}"] = np.where(t["truth"].notna() & t[lo].notna(), (t[lo] <= t["truth"]) & (t["truth"] <= t[hi]), None)


# ------------------------------------------------------------------ misclassification-corrected


class CorrectedLeakage:
    """Detector-based leak rate corrected for the detector's error (Rogan–Gladen per filter stratum).

    Within the passed (P) and blocked (B) strata, x_s conversations of N_s are flagged for c. With
    sensitivity Se and false-positive rate f = 1 - Sp (non-differential: the same in both strata),
    E[x_s] = Se T_s + f (N_s - T_s), so the Rogan–Gladen count of true-c conversations is
    T_s = (x_s - f N_s) / (Se - f), and the leak rate T_P / (T_P + T_B) = A / (A + B) with
    A = x_P - f N_P, B = x_B - f N_B: Se cancels, only the false-positive rate matters (missed
    conversations are missed equally often in both strata). The CI is the equal-tailed interval of
    draws of the four (stratum x flag) cell shares from their Jeffreys posterior Dirichlet(cells +
    1/2) and of f from Beta(fp + 1/2, tn + 1/2) (Se from Beta(tp + 1/2, fn + 1/2)): it carries the
    leak-rate sampling and the detector's error-rate uncertainty together (a Bayesian bootstrap;
    its frequentist coverage is checked by simulation, tests/test_leakage_simulation.py).

    The validation counts must come from conversations *not* in the counted set (the stage drops
    labeled conversations from the counts): otherwise f and x_P share the same false positives.
    With a `stratum` column in the validation frame ("passed" / "blocked"), f and Se are taken per
    stratum (differential misclassification) and Se no longer cancels.
    """

    def __init__(self, alpha: float = 0.05, n_boot: int = 4000, seed: int = 0, min_cell: int = 10):
        self.alpha, self.n_boot, self.seed, self.min_cell = alpha, n_boot, seed, min_cell

    def fit(self, passed: pd.Series, flags: pd.DataFrame, validation: pd.DataFrame, group: pd.Series, *,
            exclude: pd.Index | None = None, truth: dict | None = None) -> pd.DataFrame:
        rng = np.random.default_rng(self.seed)
        passed = passed.reindex(flags.index)
        keep = passed.notna().to_numpy().copy()
        if exclude is not None:
            pos = flags.index.get_indexer(pd.Index(exclude).astype(str))
            keep[pos[pos >= 0]] = False
        P = passed.to_numpy()[keep].astype(bool)
        F = flags.to_numpy()[keep]
        G = group.reindex(flags.index).to_numpy()[keep]
        val = validation.set_index(["category", "stratum"] if "stratum" in validation else "category")
        rows = []
        for g in GROUPS:
            gm = np.ones(len(P), dtype=bool) if g == "all" else (G == g)
            for j, c in enumerate(flags.columns):
                cells = np.array([(gm & P & F[:, j]).sum(), (gm & P & ~F[:, j]).sum(), (gm & ~P & F[:, j]).sum(), (gm & ~P & ~F[:, j]).sum()])
                rows.append({"category": c, "region_group": g, **self._one(cells, val, c, rng)})
        t = pd.DataFrame(rows)
        _attach_truth(t, truth)
        return t

    def _one(self, cells: np.ndarray, val: pd.DataFrame, c: str, rng) -> dict:
        n = int(cells.sum())
        x_p, n_p, x_b, n_b = cells[0], cells[0] + cells[1], cells[2], cells[2] + cells[3]
        out = {"n": n, "n_passed": int(n_p), "flagged": int(x_p + x_b), "flagged_passed": int(x_p),
               "raw_rate": x_p / (x_p + x_b) if x_p + x_b else np.nan}
        lo, hi = _binom_cis(np.array([x_p]), np.array([x_p + x_b]), self.alpha, "wilson")
        out["raw_low"], out["raw_high"] = float(lo[0]), float(hi[0])
        if "stratum" in val.index.names:
            vp, vb = val.loc[(c, "passed")], val.loc[(c, "blocked")]
        else:
            vp = vb = val.loc[c]
        se_p, f_p, se_b, f_b = (v for v in _rates(vp) + _rates(vb))
        est = _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b)
        out.update({"sensitivity": se_p if vp is vb else np.nan, "specificity": 1 - f_p if vp is vb else np.nan,
                    "fpr_passed": f_p, "fpr_blocked": f_b, "leak_rate": est[0], "true_passed": est[1], "true_blocked": est[2]})
        if n == 0 or not np.isfinite(est[0]):
            out.update({"ci_low": np.nan, "ci_high": np.nan, "se": np.nan})
            return out
        B = self.n_boot
        # Jeffreys posterior of the four cell shares (not a plug-in multinomial: a small passed-and-
        # flagged count would otherwise understate its own uncertainty, as a Wald interval does)
        draw = n * rng.dirichlet(cells + 0.5, size=B)
        bp, bb = _post(vp, B, rng), _post(vb, B, rng) if vp is not vb else None
        if bb is None:
            bb = bp
        th = _rg(draw[:, 0], draw[:, 0] + draw[:, 1], draw[:, 2], draw[:, 2] + draw[:, 3], bp[0], bp[1], bb[0], bb[1])[0]
        th = np.clip(th[np.isfinite(th)], 0, 1)
        a = self.alpha
        out.update({"ci_low": float(np.quantile(th, a / 2)), "ci_high": float(np.quantile(th, 1 - a / 2)), "se": float(th.std())})
        return out


def _rates(v) -> tuple[float, float]:
    tp, fn, tn, fp = (float(v[k]) for k in ("tp", "fn", "tn", "fp"))
    return (tp / (tp + fn) if tp + fn else np.nan, fp / (tn + fp) if tn + fp else np.nan)


def _post(v, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draws of (Se, f) from their Jeffreys posteriors."""
    return (rng.beta(v["tp"] + 0.5, v["fn"] + 0.5, size=size), rng.beta(v["fp"] + 0.5, v["tn"] + 0.5, size=size))


def _rg(x_p, n_p, x_b, n_b, se_p, f_p, se_b, f_b):
    """Rogan–Gladen true-c counts per stratum (floored at 0) and the leak rate they imply."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_p = np.maximum((x_p - f_p * n_p) / (se_p - f_p), 0.0)
        t_b = np.maximum((x_b - f_b * n_b) / (se_b - f_b), 0.0)
        return t_p / (t_p + t_b), t_p, t_b


# ------------------------------------------------------------------------------- black box

def _codes(values: pd.Series, index: pd.Index) -> np.ndarray:
    """Position of each value in `index` (-1 if absent), fast for categoricals (codes mapped once)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        m = index.get_indexer(pd.Index(values.cat.categories).astype(str))
        c = values.cat.codes.to_numpy()
        return np.where(c >= 0, m[c], -1)
    return index.get_indexer(pd.Index(values).astype(str))


_SHIFT = 36  # key = user code << 36 | seconds since origin (2^36 s ~ 2,000 years)


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
        key = (code.astype(np.int64) << _SHIFT) | sec
        key, node = key[keep], node_cat.codes[keep]
        chat = None
        if "chat" in impressions:
            chat = impressions["chat"].to_numpy(dtype=bool)[keep]
        elif "targeting_sources" in impressions:
            from analysis.lift import _chat_flag

            chat = _chat_flag(impressions["targeting_sources"])[keep]
        order = np.argsort(key, kind="stable")
        policy = pd.Timestamp(policy_date, tz="UTC")
        return cls(uid, ~is_excluded(u["region"], excluded_regions).to_numpy(), u["region"].astype(str).to_numpy(),
                   key[order], node[order], pd.Index(node_cat.categories.astype(str)), None if chat is None else chat[order],
                   origin, int((policy - origin).total_seconds()), int(sec.max()) if len(sec) else 0)

    def seconds(self, ts: pd.Series) -> np.ndarray:
        return ((pd.to_datetime(ts, utc=True) - self.origin).dt.total_seconds().to_numpy()).astype(np.int64)

    def cumulative(self, node_mask: np.ndarray) -> np.ndarray:
        """Running count of impressions in the nodes of `node_mask` (bool per node code), 0 first."""
        return np.concatenate([[0], np.cumsum(node_mask[self.node], dtype=np.int64)])

    def window_counts(self, users: np.ndarray, t0: np.ndarray, cs: np.ndarray, window_s: int) -> np.ndarray:
        """(n_before, k_before, n_after, k_after) per (user, t0): impressions in [t0 - w, t0) and [t0, t0 + w)
        and how many of them are in the nodes counted by `cs` (from `cumulative`)."""
        base = users.astype(np.int64) << _SHIFT
        i0 = np.searchsorted(self.key, base | np.maximum(t0 - window_s, 0), side="left")
        i1 = np.searchsorted(self.key, base | t0, side="left")
        i2 = np.searchsorted(self.key, base | (t0 + window_s), side="left")
        return np.stack([i1 - i0, cs[i1] - cs[i0], i2 - i1, cs[i2] - cs[i1]], axis=1)


@dataclass
class ExposureResult:
    """One row per category x design x region group: effect (change in ad share, percentage-point
    scale as a fraction), its CI, permutation / Welch / GLM p-values (one-sided: exposure rises)."""

    table: pd.DataFrame
    alpha: float
    window_days: float
    min_cell: int = 10

    def summary(self) -> pd.DataFrame:
        from analysis.privacy import suppress_small_cells

        cols = ["category", "kind", "design", "region_group", "n_treated", "n_control", "effect", "ci_low", "ci_high",
                "p_permutation", "p_glm", "glm_odds_ratio", "p_bh", "detected"]
        t = self.table[cols].copy()
        return suppress_small_cells(t, ["n_treated", "n_control"], k=self.min_cell, complementary=False)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, ax=None, design: str = "matched", group: str = "included"):
        """Effects with CIs, sensitive categories beside the positive controls."""
        import matplotlib.pyplot as plt

        t = self.table[(self.table["design"] == design) & (self.table["region_group"] == group)].dropna(subset=["effect"])
        t = t.sort_values(["kind", "category"], ascending=[False, True]).reset_index(drop=True)
        if ax is None:
            _, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(t), 3) + 1))
        y = np.arange(len(t))[::-1]
        for kind, col, name in (("sensitive", "tab:red", "Art. 9 category"), ("control", "tab:green", "positive control")):
            m = (t["kind"] == kind).to_numpy()
            if m.any():
                e = t[m]
                ax.errorbar(e["effect"] * 100, y[m], xerr=[(e["effect"] - e["ci_low"]) * 100, (e["ci_high"] - e["effect"]) * 100],
                            fmt="o", color=col, elinewidth=2, capsize=3, label=name)
        if not len(t):
            ax.text(0.5, 0.5, f"too few users for a test (< {self.min_cell})", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(frameon=False, fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, [f"{c} ({'control' if k == 'control' else 'Art. 9'})" for c, k in zip(t["category"], t["kind"])])
        ax.set_xlabel(f"change in share of the category's ads after vs before, treated minus {'matched' if design == 'matched' else 'excluded-region'} (pp)")
        ax.set_title(f"Black-box exposure ({design}, {group} regions), {self.window_days:g}-day windows, 95% CI")
        ax.figure.tight_layout()
        return ax


class ExposureTest:
    """After a conversation about c (after the policy date), does the user's share of ads in c's nodes rise?

    For each treated user (first conversation about c at or after the policy date, time t0) the
    outcome is D = share of c-node ads in [t0, t0 + w) minus the share in [t0 - w, t0). Controls are
    users with no conversation about c from (policy - w) on, in the same region group, each given a
    pseudo t0 drawn from the treated users' t0 in that group (same period). Designs:

    - `matched` (per region group): treated vs controls;
    - `did`: included-region treated vs excluded-region treated (the excluded regions are the
      policy's own control group).

    Tests are one-sided (exposure rises): a permutation test shuffling the user labels (Welch t
    statistic, valid with unequal group sizes and variances) and a binomial GLM on (user, window)
    counts with treated x after, cluster-robust by user. `effect` is the difference in mean D with
    a Welch CI. Ads in a node shared by several categories (Z7rJBM) count as exposure for each of
    them; with `exclusive_nodes` only the nodes a category does not share are used.

    A comparison with fewer than `min_users` users on either side is not tested: with ~10 treated
    users the Welch statistic's heavy tails push the false-positive rate to 0.08-0.12 (simulation).
    """

    def __init__(self, window_days: float = 30.0, n_permutations: int = 999, alpha: float = 0.05, min_users: int = 20,
                 seed: int = 0, glm: bool = True, exclusive_nodes: bool = False):
        self.window_days, self.n_permutations, self.alpha = window_days, n_permutations, alpha
        self.min_users, self.seed, self.glm, self.exclusive_nodes = min_users, seed, glm, exclusive_nodes

    def fit(self, data: ExposureData, conversations: pd.DataFrame, member: pd.DataFrame, ad_nodes: dict[str, list[str]],
            kinds: dict[str, str] | None = None, *, groups: np.ndarray | None = None, did: bool = True) -> ExposureResult:
        """`conversations`: conversation_id, user_id, started_at; `member`: conversation x category booleans
        (index conversation_id); `ad_nodes`: category -> IAB ids; `kinds`: category -> sensitive/control.
        `groups` (a label per user code, None = left out) replaces the included/excluded split, e.g. to
        test each excluded region on its own (then without the `did` design)."""
        rng = np.random.default_rng(self.seed)
        if groups is None:
            labels, glist = np.where(data.included, "included", "excluded").astype(object), ["included", "excluded"]
        else:
            labels = np.asarray(groups, dtype=object)
            glist = sorted({g for g in labels if isinstance(g, str)})
        conv = conversations.set_index(conversations["conversation_id"].astype(str))
        conv = conv.loc[conv.index.intersection(member.index)]
        ucode = data.user_ids.get_indexer(conv["user_id"].astype(str))
        ok = ucode >= 0
        conv, ucode = conv[ok], ucode[ok]
        t_conv = data.seconds(conv["started_at"])
        M = member.reindex(conv.index).fillna(False).to_numpy(dtype=bool)
        w = int(self.window_days * 86400)
        shared = pd.Series([n for nodes in ad_nodes.values() for n in set(nodes)]).value_counts()
        has_imp = np.bincount((data.key >> _SHIFT).astype(np.int64), minlength=len(data.user_ids)) > 0
        rows = []
        for j, c in enumerate(member.columns):
            if c not in ad_nodes:
                continue
            nodes = [n for n in ad_nodes[c] if not (self.exclusive_nodes and shared.get(n, 0) > 1)]
            cs = data.cumulative(np.asarray(data.nodes.isin(nodes)))
            m = M[:, j]
            post = m & (t_conv >= data.policy_s)
            # treated: first conversation about c at or after the policy date
            tu, tt = ucode[post], t_conv[post]
            o = np.lexsort((tt, tu))
            tu, tt = tu[o], tt[o]
            first = np.r_[True, tu[1:] != tu[:-1]] if len(tu) else np.zeros(0, dtype=bool)
            tu, tt = tu[first], tt[first]
            recent = np.zeros(len(data.user_ids), dtype=bool)
            recent[ucode[m & (t_conv >= data.policy_s - w)]] = True
            never = np.flatnonzero(~recent & has_imp)
            per_group = {}
            for g in glist:
                tg = labels[tu] == g
                cu = never[labels[never] == g]
                if tg.sum() == 0 or len(cu) == 0:
                    per_group[g] = None
                    continue
                ct = rng.choice(tt[tg], size=len(cu), replace=True)
                per_group[g] = (_deltas(data, tu[tg], tt[tg], cs, w), _deltas(data, cu, ct, cs, w))
            kind = (kinds or {}).get(c, "sensitive")
            for g in glist:
                rows.append(self._compare(c, kind, "matched", g, per_group[g], rng))
            if groups is None and did:
                pair = None
                if per_group["included"] is not None and per_group["excluded"] is not None:
                    pair = (per_group["included"][0], per_group["excluded"][0])
                rows.append(self._compare(c, kind, "did", "included_vs_excluded", pair, rng))
        t = pd.DataFrame(rows)
        t["p_bh"] = np.nan
        for (k, d, g), idx in t.groupby(["kind", "design", "region_group"]).groups.items():
            ok = t.loc[idx, "p_permutation"].notna()
            if ok.any():
                t.loc[ok[ok].index, "p_bh"] = multipletests(t.loc[ok[ok].index, "p_permutation"], method="fdr_bh")[1]
        t["detected"] = t["p_permutation"] < self.alpha
        return ExposureResult(t, self.alpha, self.window_days, self.min_users)

    def _compare(self, c, kind, design, group, pair, rng) -> dict:
        row = {"category": c, "kind": kind, "design": design, "region_group": group, "n_treated": 0, "n_control": 0}
        nan = dict.fromkeys(["mean_delta_treated", "mean_delta_control", "effect", "ci_low", "ci_high", "p_welch",
                             "p_permutation", "glm_log_or", "glm_odds_ratio", "glm_or_low", "glm_or_high", "p_glm"], np.nan)
        row.update(nan)
        if pair is None:
            return row
        (dt, ct), (dc, cc) = pair
        row.update({"n_treated": len(dt), "n_control": len(dc)})
        if len(dt) < self.min_users or len(dc) < self.min_users:
            return row
        from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

        cm = CompareMeans(DescrStatsW(dt), DescrStatsW(dc))
        lo, hi = cm.tconfint_diff(alpha=self.alpha, usevar="unequal")
        row.update({"mean_delta_treated": float(dt.mean()), "mean_delta_control": float(dc.mean()),
                    "effect": float(dt.mean() - dc.mean()), "ci_low": float(lo), "ci_high": float(hi),
                    "p_welch": float(cm.ttest_ind(alternative="larger", usevar="unequal")[1]),
                    "p_permutation": _perm_welch(dt, dc, self.n_permutations, rng)})
        if self.glm:
            row.update(_glm(ct, cc, self.alpha))
        return row


def _deltas(data: ExposureData, users: np.ndarray, t0: np.ndarray, cs: np.ndarray, w: int):
    """Per user with impressions in both windows: the change in share, and the window counts."""
    k = data.window_counts(users, t0, cs, w)
    ok = (k[:, 0] > 0) & (k[:, 2] > 0)
    k = k[ok]
    return k[:, 3] / k[:, 2] - k[:, 1] / k[:, 0], k


def _perm_welch(a: np.ndarray, b: np.ndarray, n_perm: int, rng) -> float:
    """One-sided permutation p-value of Welch's t (labels shuffled across users)."""
    x = np.concatenate([a, b])
    n1 = len(a)

    def welch(sel):  # sel: (B, n) bool, True = group 1
        s1, s2 = sel @ x, sel @ (x * x)
        t1, t2 = x.sum() - s1, (x * x).sum() - s2
        n0 = len(x) - n1
        m1, m0 = s1 / n1, t1 / n0
        v1 = (s2 - n1 * m1**2) / max(n1 - 1, 1)
        v0 = (t2 - n0 * m0**2) / max(n0 - 1, 1)
        return (m1 - m0) / np.sqrt(np.maximum(v1 / n1 + v0 / n0, 1e-300))

    obs = welch(np.r_[np.ones(n1, bool), np.zeros(len(b), bool)][None, :].astype(float))[0]
    base = np.r_[np.ones(n1), np.zeros(len(b))]
    perms = rng.permuted(np.tile(base, (n_perm, 1)), axis=1)
    null = welch(perms)
    return float((1 + (null >= obs - 1e-12).sum()) / (n_perm + 1))


def _glm(ct: np.ndarray, cc: np.ndarray, alpha: float) -> dict:
    """Binomial GLM of (user, window) ad counts: logit share ~ treated * after, cluster-robust by user."""
    import statsmodels.api as sm

    k = np.vstack([ct, cc])
    n = len(k)
    treated = np.r_[np.ones(len(ct)), np.zeros(len(cc))]
    endog = np.vstack([np.c_[k[:, 1], k[:, 0] - k[:, 1]], np.c_[k[:, 3], k[:, 2] - k[:, 3]]])
    after = np.r_[np.zeros(n), np.ones(n)]
    tr = np.r_[treated, treated]
    X = np.c_[np.ones(2 * n), tr, after, tr * after]
    groups = np.r_[np.arange(n), np.arange(n)]
    out = dict.fromkeys(["glm_log_or", "glm_odds_ratio", "glm_or_low", "glm_or_high", "p_glm"], np.nan)
    if endog[:, 0].sum() == 0:
        return out
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sm.GLM(endog, X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": groups})
        b, se = float(r.params[3]), float(r.bse[3])
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        return out
    if not (np.isfinite(b) and np.isfinite(se) and se > 0):
        return out
    z = stats.norm.ppf(1 - alpha / 2)
    return {"glm_log_or": b, "glm_odds_ratio": float(np.exp(b)), "glm_or_low": float(np.exp(b - z * se)),
            "glm_or_high": float(np.exp(b + z * se)), "p_glm": float(stats.norm.sf(b / se))}


# ------------------------------------------------------------------------------ violations


def regional_exposure(data: ExposureData, conversations: pd.DataFrame, conversation_nodes: pd.Series, *, window_days: float = 30.0,
                      n_permutations: int = 999, alpha: float = 0.05, min_users: int = 20, seed: int = 0) -> pd.DataFrame:
    """The matched exposure test within each excluded region on its own, over every chat topic at once,
    so that a violation confined to one country is not diluted by the others (design `region`,
    category `any_chat_topic`).

    Treated: a user's first conversation after the policy date whose topic maps to an IAB node
    (`conversation_nodes`: conversation_id -> node); outcome: the change in the share of their ads
    in that node. Controls: users of the same region given a pseudo (date, node) drawn from the
    treated ones, kept if they had no conversation about that node from (policy - w) on.
    BH across regions.
    """
    rng = np.random.default_rng(seed)
    w = int(window_days * 86400)
    conv = conversations.assign(conversation_id=conversations["conversation_id"].astype(str))
    node = conv["conversation_id"].map(conversation_nodes)
    ncode = data.nodes.get_indexer(pd.Index(node.astype(object).where(node.notna(), "")).astype(str))
    ucode = data.user_ids.get_indexer(conv["user_id"].astype(str))
    t = data.seconds(conv["started_at"])
    ok = (ncode >= 0) & (ucode >= 0)
    ucode, ncode, t = ucode[ok], ncode[ok], t[ok]
    K = np.int64(len(data.nodes) + 1)
    recent = np.unique(ucode[t >= data.policy_s - w].astype(np.int64) * K + ncode[t >= data.policy_s - w])
    post = t >= data.policy_s
    o = np.lexsort((t[post], ucode[post]))
    tu, tt, tn = ucode[post][o], t[post][o], ncode[post][o]
    first = np.r_[True, tu[1:] != tu[:-1]] if len(tu) else np.zeros(0, bool)
    tu, tt, tn = tu[first], tt[first], tn[first]
    has_imp = np.bincount((data.key >> _SHIFT).astype(np.int64), minlength=len(data.user_ids)) > 0
    cache: dict[int, np.ndarray] = {}

    def deltas(users, t0, nodes):
        k = np.zeros((len(users), 4), dtype=np.int64)
        for n in np.unique(nodes):
            if n not in cache:
                cache[n] = data.cumulative(np.arange(len(data.nodes)) == n)
            m = nodes == n
            k[m] = data.window_counts(users[m], t0[m], cache[n], w)
        keep = (k[:, 0] > 0) & (k[:, 2] > 0)
        k = k[keep]
        return k[:, 3] / k[:, 2] - k[:, 1] / k[:, 0], k

    test = ExposureTest(window_days, n_permutations, alpha, min_users, seed)
    rows = []
    for r in sorted(set(data.region[~data.included])):
        tr = data.region[tu] == r
        cu = np.flatnonzero((data.region == r) & has_imp)
        cu = cu[~np.isin(cu, tu[tr])]
        pair = None
        if tr.any() and len(cu):
            pick = rng.integers(0, tr.sum(), size=len(cu))
            ct, cn = tt[tr][pick], tn[tr][pick]
            clean = ~np.isin(cu.astype(np.int64) * K + cn, recent)
            pair = (deltas(tu[tr], tt[tr], tn[tr]), deltas(cu[clean], ct[clean], cn[clean]))
        rows.append(test._compare("any_chat_topic", "control", "region", r, pair, rng))
    out = pd.DataFrame(rows)
    out["p_bh"] = np.nan
    ok = out["p_permutation"].notna() if len(out) else pd.Series(dtype=bool)
    if len(out) and ok.any():
        out.loc[ok, "p_bh"] = multipletests(out.loc[ok, "p_permutation"], method="fdr_bh")[1]
    out["detected"] = out["p_bh"] < alpha
    return out


def primary_nodes(categories: pd.DataFrame) -> pd.Series:
    """conversation_id -> the first IAB node of the conversation's topics (from `iab_ids`/`iab_id`)."""
    col = next((c for c in ("iab_ids", "iab_id", "iab") if c in categories), None)
    idx = pd.Index(categories["conversation_id"].astype(str))
    if col is None:
        return pd.Series(dtype=object)
    v = [x[0] if isinstance(x, (list, tuple, np.ndarray)) and len(x) else (x if isinstance(x, str) and x else None) for x in categories[col]]
    return pd.Series(v, index=idx, dtype=object).dropna().astype(str)


def violations(data: ExposureData, exposure: ExposureResult | None = None, *, min_cell: int = 10, alpha: float = 0.05) -> pd.DataFrame:
    """Chat-derived ad signals in excluded regions, per region: impressions whose targeting sources
    include "ai_chat" (and the users they reached, small cells suppressed). A region is flagged when
    it has any, or when its own black-box exposure test (design `region`, chat topics pooled) is
    significant (BH across regions); the excluded group as a whole (row `ALL excluded`) also when a
    category's exposure test among all excluded-region users is (BH across categories)."""
    from analysis.privacy import suppress_small_cells

    users = (data.key >> _SHIFT).astype(np.int64)
    excl_imp = ~data.included[users]
    chat = data.chat if data.chat is not None else np.zeros(len(users), dtype=bool)
    sel = excl_imp & chat
    reg = data.region[users[sel]]
    t = pd.DataFrame({"region": reg, "user": users[sel]})
    g = t.groupby("region").agg(chat_impressions=("user", "size"), users=("user", "nunique"))
    all_excl = pd.Index(sorted(set(data.region[~data.included])), name="region")
    g = g.reindex(all_excl, fill_value=0).reset_index()
    g["impressions"] = pd.Series(data.region[users[excl_imp]]).value_counts().reindex(g["region"]).fillna(0).astype(int).to_numpy()
    g["exposure_effect"], g["exposure_p"] = np.nan, np.nan
    exp_sig = []
    if exposure is not None:
        e = exposure.table
        reg = e[(e["design"] == "region") & e["p_bh"].notna()].set_index("region_group")
        g["exposure_effect"] = g["region"].map(reg["effect"])
        g["exposure_p"] = g["region"].map(reg["p_bh"])
        e = e[(e["design"] == "matched") & (e["region_group"] == "excluded") & (e["p_bh"] < alpha)]
        exp_sig = sorted(e["category"])
    by_exposure = g["exposure_p"] < alpha
    g["flagged"] = (g["chat_impressions"] > 0) | by_exposure
    g["signal"] = ["; ".join(x for x in ("ai_chat targeting source" if c > 0 else "", "exposure effect" if b else "") if x)
                   for c, b in zip(g["chat_impressions"], by_exposure)]
    total = {"region": "ALL excluded", "chat_impressions": int(g["chat_impressions"].sum()), "users": int(len(np.unique(users[sel]))),
             "impressions": int(excl_imp.sum()), "flagged": bool(g["flagged"].any() or exp_sig),
             "signal": "; ".join(x for x in ("ai_chat targeting source" if g["chat_impressions"].sum() else "",
                                              "exposure effect in " + ", ".join(g.loc[by_exposure, "region"]) if by_exposure.any() else "",
                                              f"exposure effect (all excluded): {', '.join(exp_sig)}" if exp_sig else "") if x)}
    g = pd.concat([g, pd.DataFrame([total])], ignore_index=True)
    g = g.sort_values(["flagged", "chat_impressions"], ascending=False, kind="stable").reset_index(drop=True)
    return suppress_small_cells(g, ["users"], k=min_cell, complementary=False)


# ----------------------------------------------------------------------- sensitivity analyses


def filter_threshold_curve(score: pd.Series, member: pd.DataFrame, thresholds=None, alpha: float = 0.05) -> pd.DataFrame:
    """Leak rate per category if the filter blocked at score >= tau instead (Wilson CI), for tau in `thresholds`."""
    thresholds = np.asarray(thresholds if thresholds is not None else [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    s = score.reindex(member.index).to_numpy()
    ok = np.isfinite(s)
    M = member.to_numpy()[ok]
    s = s[ok]
    rows = []
    for tau in thresholds:
        P = s < tau
        for j, c in enumerate(member.columns):
            n, k = int(M[:, j].sum()), int((M[:, j] & P).sum())
            rows.append({"threshold": float(tau), "category": c, "n": n, "passed": k, "leak_rate": k / n if n else np.nan})
    t = pd.DataFrame(rows)
    t["wilson_low"], t["wilson_high"] = _binom_cis(t["passed"].to_numpy(), t["n"].to_numpy(), alpha, "wilson")
    return t


def detector_threshold_curve(passed: pd.Series, scores: pd.DataFrame, labels: pd.DataFrame, group: pd.Series,
                             thresholds=None, *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Raw and corrected leak rate per category as the detector's flagging threshold moves
    (validation recomputed on the labeled sample at each threshold; region group `all`)."""
    thresholds = np.asarray(thresholds if thresholds is not None else [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    est = CorrectedLeakage(alpha=alpha, n_boot=n_boot, seed=seed)
    lab_ids = pd.Index(labels["conversation_id"].astype(str))
    parts = []
    for tau in thresholds:
        flags = scores >= tau
        val = validation_counts(flags, labels)
        t = est.fit(passed, flags, val, group, exclude=lab_ids)
        parts.append(t[t["region_group"] == "all"].assign(threshold=float(tau)))
    cols = ["threshold", "category", "flagged", "raw_rate", "leak_rate", "ci_low", "ci_high", "sensitivity", "specificity"]
    return pd.concat(parts, ignore_index=True)[cols]


def fmt(df: pd.DataFrame | None, digits: int = 4) -> pd.DataFrame | None:
    """A table for the report: floats as strings with `digits` significant digits (NaN blank), so no
    long digit run (10.117560) is mistaken for a phone number by the report's privacy scan."""
    if df is None:
        return None
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = [("" if not np.isfinite(v) else f"{v:.{digits}g}") for v in out[c].to_numpy(dtype=float)]
    return out


# ----------------------------------------------------------------------------------- figures


def forest_plot(table: pd.DataFrame, ax=None, *, tolerance: float | None = None, others: dict | None = None, label: str = "estimate"):
    """Leak rate per category with its CI; other estimators (raw detector, corrected) offset beside; truth as x."""
    import matplotlib.pyplot as plt

    t = table.reset_index(drop=True)
    cats = list(t["category"])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.55 * len(cats) + 1.2))
    y = np.arange(len(cats))[::-1].astype(float)
    series = [(label, t, "wilson_low", "wilson_high", "tab:blue")]
    palette = iter(["tab:orange", "tab:purple", "tab:gray"])
    for name, o in (others or {}).items():
        o = o.set_index("category").reindex(cats).reset_index()
        lo, hi = ("ci_low", "ci_high") if "ci_low" in o else ("wilson_low", "wilson_high")
        series.append((name, o, lo, hi, next(palette)))
    step = 0.22
    for i, (name, s, lo, hi, col) in enumerate(series):
        yy = y + step * ((len(series) - 1) / 2 - i)
        est = s["leak_rate"].to_numpy(dtype=float)
        # a clipped point estimate can sit just outside its posterior interval: clip the bars, not the data
        err = [np.clip(est - s[lo].to_numpy(dtype=float), 0, None) * 100, np.clip(s[hi].to_numpy(dtype=float) - est, 0, None) * 100]
        ax.errorbar(est * 100, yy, xerr=np.nan_to_num(err),
                    fmt="o", color=col, ms=4, capsize=2, label=name)
    if "truth" in t and t["truth"].notna().any():
        ax.scatter(t["truth"] * 100, y, marker="x", color="k", s=40, zorder=4, label="truth (simulated)")
    if tolerance is not None:
        ax.axvline(tolerance * 100, color="tab:red", ls="--", lw=1, label=f"tolerance {tolerance:.0%}")
    ax.set_yticks(y, cats)
    ax.set_xlabel("leak rate: share of the category's conversations that passed the filter (%)")
    ax.set_xlim(left=0)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.figure.tight_layout()
    return ax


def plot_threshold_curves(filter_curve: pd.DataFrame | None, detector_curve: pd.DataFrame | None, *, actual_filter: float = 0.5):
    """Leak rate vs the filter's blocking threshold (left) and vs the detector's flagging threshold (right)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, df, est, title, mark in (
        (axes[0], filter_curve, "leak_rate", "vs the filter's blocking threshold (labels basis)", actual_filter),
        (axes[1], detector_curve, "leak_rate", "vs the detector's flagging threshold (corrected)", 0.5),
    ):
        if df is None or not len(df):
            ax.text(0.5, 0.5, "not available for these inputs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for c, g in df.groupby("category", sort=False):
            ax.plot(g["threshold"], g[est] * 100, marker="o", ms=3, label=c)
        ax.axvline(mark, color="k", ls=":", lw=1)
        ax.set_xlabel("threshold")
        ax.set_ylabel("leak rate (%)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------- the stage


@dataclass
class LeakageInputs:
    """What stage 03 reads from `run_dir/data/` (stage 00 and stage 02 outputs)."""

    conversations: pd.DataFrame
    users: pd.DataFrame
    categories: pd.DataFrame
    impressions: pd.DataFrame | None
    filter_decisions: pd.DataFrame | None
    labels: pd.DataFrame | None
    validation: pd.DataFrame | None

    @classmethod
    def read(cls, run_dir: str | Path, *, engine: str = "pandas", dask_scheduler: str | None = None) -> "LeakageInputs":
        d = Path(run_dir) / "data"
        need = {"conversations.parquet": "stage 00 (ingest)", "users.parquet": "stage 00 (ingest)",
                "conversation_categories.parquet": "stage 02 (sensitive-topic detection)"}
        missing = [f"{d / f} (written by {who})" for f, who in need.items() if not (d / f).exists()]
        if missing:
            raise FileNotFoundError("stage 03 needs " + "; ".join(missing) + ": run the earlier stages first")

        def opt(name, cols=None):
            p = d / name
            return pd.read_parquet(p, columns=cols) if p.exists() else None

        conv = pd.read_parquet(d / "conversations.parquet", columns=["conversation_id", "user_id", "region", "excluded", "started_at"])
        imp_path = d / "impressions.parquet"
        imp = None
        if imp_path.exists():
            from analysis import engine as eng
            from analysis.lift import read_impressions

            # dask: the lists of targeting sources become the chat flag on the workers
            imp = eng.read_impressions(imp_path, c=eng.client(dask_scheduler)) if eng.check_engine(engine) == "dask" else read_impressions(imp_path)
        return cls(conv, pd.read_parquet(d / "users.parquet", columns=["user_id", "region"]), pd.read_parquet(d / "conversation_categories.parquet"),
                   imp, opt("filter_decisions.parquet"), opt("labels.parquet"), opt("detector_validation.parquet"))


@dataclass
class LeakageReport:
    """Everything stage 03 estimates."""

    whitebox: LeakRateResult | None  # primary basis: labels when present, else detector flags
    whitebox_detector: LeakRateResult | None  # detector flags, uncorrected
    corrected: pd.DataFrame | None
    by_region: pd.DataFrame | None
    exposure: ExposureResult | None
    violations: pd.DataFrame | None
    filter_curve: pd.DataFrame | None
    detector_curve: pd.DataFrame | None
    differential: pd.DataFrame | None  # detector error by filter stratum (non-differential check)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def side_by_side(self, group: str = "all") -> pd.DataFrame:
        """Labels-based, raw detector and corrected leak rates with CIs (and truth) per category."""
        parts = []
        if self.whitebox is not None:
            w = self.whitebox.table
            w = w[w["region_group"] == group].set_index("category")
            parts.append(w[["n", "leak_rate", "wilson_low", "wilson_high", "cp_low", "cp_high"]].rename(columns=lambda c: f"{self.whitebox.basis}_{c}"))
        if self.corrected is not None:
            c = self.corrected[self.corrected["region_group"] == group].set_index("category")
            parts.append(c[["raw_rate", "raw_low", "raw_high"]].rename(columns=lambda x: "detector_" + x))
            parts.append(c[["leak_rate", "ci_low", "ci_high"]].rename(columns=lambda x: "corrected_" + x))
        out = pd.concat(parts, axis=1) if parts else pd.DataFrame()
        if self.whitebox is not None and "truth" in self.whitebox.table:
            w = self.whitebox.table
            out["truth"] = w[w["region_group"] == group].set_index("category")["truth"]
        out = out.reset_index()
        ncol = f"{self.whitebox.basis}_n" if self.whitebox is not None else None
        if ncol in out:
            from analysis.privacy import suppress_small_cells

            k = self.settings.get("min_cell_users", 10)
            out = suppress_small_cells(out, [ncol], k=k, complementary=False)
        return out

    def summary(self) -> pd.DataFrame:
        return self.side_by_side()

    def forest(self, group: str = "all", ax=None):
        """Forest plot of the primary white-box estimate with the raw and corrected detector-based ones beside."""
        if self.whitebox is None:
            return None
        others = {}
        if self.corrected is not None:
            raw = self.corrected.drop(columns=["leak_rate", "ci_low", "ci_high"]).rename(
                columns={"raw_rate": "leak_rate", "raw_low": "ci_low", "raw_high": "ci_high"})
            others["detector flags, uncorrected (Wilson)"] = raw[["category", "region_group", "leak_rate", "ci_low", "ci_high"]]
            others["detector flags, corrected"] = self.corrected
        return self.whitebox.plot(ax=ax, group=group, others=others)

    def to_frame(self) -> pd.DataFrame:
        return self.whitebox.to_frame() if self.whitebox is not None else pd.DataFrame()

    def record_metrics(self, run_dir: str | Path, ground_truth: dict | None = None):
        from analysis.metrics import MetricsRecorder

        m = MetricsRecorder(run_dir, "03_leakage")
        if self.whitebox is not None:
            for r in self.whitebox.table.itertuples():
                grp = {"category": r.category, "region_group": r.region_group, "basis": r.basis}
                truth = getattr(r, "truth", None)
                truth = None if truth is None or pd.isna(truth) else truth
                # headline CI: Wilson (coverage ~0.95 by simulation); Clopper-Pearson (exact, >= 0.95) beside
                m.add("leak_rate", r.leak_rate, group=grp, ci=(r.wilson_low, r.wilson_high), truth=truth, n=r.n)
                m.add("leak_rate_cp", r.leak_rate, group=grp, ci=(r.cp_low, r.cp_high), truth=truth, n=r.n)
                m.add("tolerance_p_value", r.p_tolerance, group=grp, n=r.n)
                m.add("tolerance_p_value_holm", r.p_holm, group=grp, n=r.n)
                m.add("tolerance_p_value_bh", r.p_bh, group=grp, n=r.n)
        if self.corrected is not None:
            for r in self.corrected.itertuples():
                truth = getattr(r, "truth", None)
                truth = None if truth is None or pd.isna(truth) else truth
                grp = {"category": r.category, "region_group": r.region_group}
                m.add("leak_rate_detector_raw", r.raw_rate, group=grp, ci=(r.raw_low, r.raw_high), truth=truth, n=r.flagged)
                m.add("leak_rate_corrected", r.leak_rate, group=grp, ci=(r.ci_low, r.ci_high), truth=truth, n=r.n)
        if self.exposure is not None:
            for r in self.exposure.table.itertuples():
                grp = {"category": r.category, "kind": r.kind, "design": r.design, "region_group": r.region_group}
                m.add("exposure_effect", r.effect, group=grp, ci=(r.ci_low, r.ci_high), n=r.n_treated)
                m.add("exposure_p_value", r.p_permutation, group=grp, n=r.n_treated)
                m.add("exposure_p_value_glm", r.p_glm, group=grp, n=r.n_treated)
        if self.violations is not None:
            byr = ((ground_truth or {}).get("violations") or {}).get("by_region") or {}
            for r in self.violations.itertuples():
                truth = sum(byr.values()) if r.region == "ALL excluded" else byr.get(r.region, 0)
                m.add("violation_impressions", r.chat_impressions, group={"region": r.region}, truth=truth if ground_truth else None)
                m.add("violation_flag", bool(r.flagged), group={"region": r.region})
        m.write()
        return m


def analyse(inputs: LeakageInputs, *, alpha: float = 0.05, tolerance: float = 0.01, min_cell_users: int = 10,
            policy_date: str = DEFAULT_POLICY_DATE, excluded_regions=None, exposure_window_days: float = 30.0,
            n_permutations: int = 999, n_boot: int = 4000, control_topics: dict | None = None, ad_nodes: dict | None = None,
            seed: int = 0, ground_truth: dict | None = None) -> LeakageReport:
    """Every estimator of the stage; parts the inputs cannot support are skipped with a note."""
    from analysis.taxonomy import category_ad_nodes

    notes = []
    excluded_regions = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    controls = dict(DEFAULT_CONTROLS if control_topics is None else control_topics)
    conv = inputs.conversations.assign(conversation_id=inputs.conversations["conversation_id"].astype(str)).set_index("conversation_id", drop=False)
    group = pd.Series(np.where(is_excluded(conv["region"], excluded_regions), "excluded", "included"), index=conv.index)
    flags = flag_matrix(inputs.categories).reindex(conv.index).fillna(False).astype(bool)
    truth = (ground_truth or {}).get("leakage")
    labels = inputs.labels
    lab_member = None
    if labels is not None and len(labels):
        labels = labels.assign(conversation_id=labels["conversation_id"].astype(str))
        labels = labels[labels["conversation_id"].isin(conv.index)].drop_duplicates("conversation_id")
        lab_member = pd.DataFrame(label_matrix(labels["art9"], ART9), index=pd.Index(labels["conversation_id"], name="conversation_id"), columns=list(ART9))
    else:
        notes.append("no labeled sample: the white-box leak rate rests on detector flags alone (biased by its errors, uncorrected)")

    wb = wb_det = corr = by_region = fcurve = dcurve = diff = None
    fd = inputs.filter_decisions
    if fd is not None and len(fd):
        fd = fd.assign(conversation_id=fd["conversation_id"].astype(str)).drop_duplicates("conversation_id").set_index("conversation_id")
        passed = (~fd["blocked"].astype(bool)).reindex(conv.index)
        est = WhiteBoxLeakage(alpha, tolerance, min_cell_users)
        wb_det = est.fit(passed, flags, group, basis="detector", truth=truth)
        if lab_member is not None:
            wb = est.fit(passed, lab_member, group, basis="labels", truth=truth)
            by_region = est.by_region(passed, lab_member, conv["region"])
        else:
            wb = wb_det
            by_region = est.by_region(passed, flags, conv["region"])
        # stage 02's validation is out of sample (labels it did not tune on); recompute from the labels
        # only when it is missing. Either way every labeled conversation is left out of the corrected
        # counts, so the counts and the detector's error rates rest on disjoint conversations.
        val = inputs.validation
        if val is None and lab_member is not None:
            val = validation_counts(flags, labels)
            notes.append("no detector_validation.parquet: detector error rates computed on labels.parquet "
                         "(optimistic if the detector was tuned on those labels)")
        if lab_member is not None:
            stratum = pd.Series(np.where(passed, "passed", "blocked"), index=conv.index)
            diff = _differential_check(validation_counts(flags, labels, stratum))
        if val is not None:
            corr = CorrectedLeakage(alpha, n_boot, seed, min_cell_users).fit(
                passed, flags, val, group, exclude=pd.Index(labels["conversation_id"]) if labels is not None else None, truth=truth)
        else:
            notes.append("no detector validation counts and no labels: misclassification correction skipped")
        if "score" in fd and fd["score"].notna().any():
            fcurve = filter_threshold_curve(fd["score"].reindex(conv.index), lab_member if lab_member is not None else flags, alpha=alpha)
        score_cols = [f"score_{c}" for c in ART9]
        if lab_member is not None and all(c in inputs.categories for c in score_cols):
            sc = inputs.categories.assign(conversation_id=inputs.categories["conversation_id"].astype(str)).set_index("conversation_id")[score_cols]
            sc.columns = list(ART9)
            dcurve = detector_threshold_curve(passed, sc.reindex(conv.index), labels, group, alpha=alpha, n_boot=min(n_boot, 1000), seed=seed)
    else:
        notes.append("no filter decisions: white-box leak rates skipped (black-box exposure test only)")

    exp = viol = None
    if inputs.impressions is not None and len(inputs.impressions):
        data = ExposureData.build(inputs.impressions, inputs.users, excluded_regions=excluded_regions, policy_date=policy_date)
        nodes = category_ad_nodes(ad_nodes)
        member = pd.concat([flags, iab_matrix(inputs.categories, controls).reindex(conv.index).fillna(False).astype(bool)], axis=1)
        if member.shape[1] == len(ART9):
            notes.append("conversation categories carry no iab_ids: positive controls skipped")
        kinds = {**{c: "sensitive" for c in ART9}, **{c: "control" for c in controls}}
        exp = ExposureTest(exposure_window_days, n_permutations, alpha, max(20, min_cell_users), seed).fit(
            data, conv.reset_index(drop=True), member, {**nodes, **controls}, kinds)
        regional = regional_exposure(data, conv.reset_index(drop=True), primary_nodes(inputs.categories),
                                     window_days=exposure_window_days, n_permutations=n_permutations, alpha=alpha,
                                     min_users=max(20, min_cell_users), seed=seed)
        exp.table = pd.concat([exp.table, regional], ignore_index=True)
        viol = violations(data, exp, min_cell=min_cell_users, alpha=alpha)
    else:
        notes.append("no impressions: black-box exposure test and violation check skipped")
    settings = {"alpha": alpha, "tolerance": tolerance, "min_cell_users": min_cell_users, "policy_date": policy_date,
                "exposure_window_days": exposure_window_days, "n_permutations": n_permutations, "n_boot": n_boot,
                "control_topics": controls}
    return LeakageReport(wb, wb_det, corr, by_region, exp, viol, fcurve, dcurve, diff, settings, notes)


def _differential_check(v: pd.DataFrame) -> pd.DataFrame:
    """Detector sensitivity and false-positive rate in the passed vs blocked strata, with Fisher exact
    p-values: Rogan–Gladen assumes they are equal (non-differential error)."""
    rows = []
    for c, g in v.groupby("category", sort=False):
        g = g.set_index("stratum")
        if not {"passed", "blocked"} <= set(g.index):
            continue
        p, b = g.loc["passed"], g.loc["blocked"]
        fpr_p = p.fp / (p.fp + p.tn) if p.fp + p.tn else np.nan
        fpr_b = b.fp / (b.fp + b.tn) if b.fp + b.tn else np.nan
        rows.append({
            "category": c,
            "sensitivity_passed": p.tp / (p.tp + p.fn) if p.tp + p.fn else np.nan,
            "sensitivity_blocked": b.tp / (b.tp + b.fn) if b.tp + b.fn else np.nan,
            "fpr_passed": fpr_p, "fpr_blocked": fpr_b,
            "p_sensitivity_differs": stats.fisher_exact([[p.tp, p.fn], [b.tp, b.fn]])[1],
            "p_fpr_differs": stats.fisher_exact([[p.fp, p.tn], [b.fp, b.tn]])[1],
        })
    return pd.DataFrame(rows)


def run_stage(run_dir: str | Path, input_dir: str | Path | None = None, **settings) -> tuple[LeakageReport, dict | None]:
    """Read stage 00/02 outputs, analyse, record metrics (with the truth beside them when simulated)."""
    from analysis.io import read_ground_truth

    inputs = LeakageInputs.read(run_dir, engine=settings.pop("engine", "pandas"), dask_scheduler=settings.pop("dask_scheduler", None))
    gt = read_ground_truth(input_dir) if input_dir and Path(input_dir).is_dir() else None
    report = analyse(inputs, ground_truth=gt, **settings)
    report.record_metrics(run_dir, gt)
    return report, gt


# ------------------------------------------------------------------------- validation by simulation


def inputs_from_world(world, *, sensitivity: float | dict = 0.9, specificity: float | dict = 0.995, seed: int = 0,
                      impressions: bool = True) -> LeakageInputs:
    """The stage's inputs built in memory from a simulated World, with `simulated_detector` standing in
    for stage 02 (tests and benchmarks; the stage itself reads run_dir/data)."""
    from analysis.regions import is_excluded as _excl

    ct = world.conversation_truth
    users = world.users[["user_id", "region"]]
    region = ct["user_id"].map(users.set_index("user_id")["region"])
    conv = pd.DataFrame({"conversation_id": ct["conversation_id"], "user_id": ct["user_id"], "region": region,
                         "excluded": _excl(region, world.config.excluded_regions), "started_at": ct["started_at"]})
    cats = simulated_detector(ct, sensitivity, specificity, seed=seed, topics=world.ground_truth["topics"])
    imp = None
    if impressions:
        from analysis.lift import _chat_flag

        imp = world.impressions[["user_id", "shown_at", "ad_category"]].assign(chat=_chat_flag(world.impressions["targeting_sources"]))
    return LeakageInputs(conv, users, cats, imp, world.filter_decisions, world.labels, None)


def validate_world(world_config: dict, *, sensitivity: float = 0.9, specificity: float = 0.995, alpha: float = 0.05,
                   exposure: bool = False, n_permutations: int = 199, n_boot: int = 2000, controls: dict | None = None) -> pd.DataFrame:
    """Simulate one world and compare the stage's estimates with its truth: one row per category
    (white-box CIs on the true categories of all conversations and on the labeled sample, the
    corrected CI with a simulated detector, and whether each covers the true leak rate), plus with
    `exposure` the black-box p-values per category, design and region group."""
    from analysis.simulate import simulate

    w = simulate(world_config)
    inp = inputs_from_world(w, sensitivity=sensitivity, specificity=specificity, seed=w.config.seed, impressions=exposure)
    truth = w.ground_truth["leakage"]
    conv = inp.conversations.set_index("conversation_id", drop=False)
    group = pd.Series(np.where(conv["excluded"], "excluded", "included"), index=conv.index)
    passed = pd.Series(~w.filter_decisions["blocked"].to_numpy(), index=w.filter_decisions["conversation_id"].astype(str)).reindex(conv.index)
    true_member = pd.DataFrame(label_matrix(w.conversation_truth["art9"], ART9), index=conv.index, columns=list(ART9))
    est = WhiteBoxLeakage(alpha)
    full = est.fit(passed, true_member, group, basis="truth", truth=truth).table
    lab = inp.labels.assign(conversation_id=inp.labels["conversation_id"].astype(str))
    lab_member = pd.DataFrame(label_matrix(lab["art9"], ART9), index=pd.Index(lab["conversation_id"]), columns=list(ART9))
    labeled = est.fit(passed, lab_member, group, basis="labels", truth=truth).table
    flags = flag_matrix(inp.categories).reindex(conv.index)
    corr = CorrectedLeakage(alpha, n_boot, w.config.seed).fit(passed, flags, validation_counts(flags, lab), group,
                                                               exclude=pd.Index(lab["conversation_id"]), truth=truth)
    key = ["category", "region_group"]
    out = full[key + ["n", "passed", "leak_rate", "truth", "covers_truth_cp", "covers_truth_wilson"]].copy()
    out["covers_truth_jeffreys"] = (full["jeffreys_low"] <= full["truth"]) & (full["truth"] <= full["jeffreys_high"])
    out = out.merge(labeled[key + ["n", "covers_truth_cp", "covers_truth_wilson"]].rename(
        columns={"n": "n_labeled", "covers_truth_cp": "labeled_covers_cp", "covers_truth_wilson": "labeled_covers_wilson"}), on=key)
    out = out.merge(corr[key + ["leak_rate", "ci_low", "ci_high", "covers_truth_ci"]].rename(
        columns={"leak_rate": "corrected", "ci_low": "corrected_low", "ci_high": "corrected_high", "covers_truth_ci": "corrected_covers"}), on=key)
    out["seed"], out["mode"] = w.config.seed, w.config.mode
    if exposure:
        data = ExposureData.build(inp.impressions, inp.users, excluded_regions=w.config.excluded_regions, policy_date=w.config.policy_date)
        from analysis.taxonomy import category_ad_nodes

        controls = dict(DEFAULT_CONTROLS if controls is None else controls)
        member = pd.concat([true_member, iab_matrix(inp.categories, controls).reindex(conv.index)], axis=1)
        kinds = {**{c: "sensitive" for c in ART9}, **{c: "control" for c in controls}}
        ex = ExposureTest(w.config.chat_window_days, n_permutations, alpha, seed=w.config.seed).fit(
            data, inp.conversations, member, {**category_ad_nodes(), **controls}, kinds).table
        reg = regional_exposure(data, inp.conversations, primary_nodes(inp.categories), window_days=w.config.chat_window_days,
                                n_permutations=n_permutations, alpha=alpha, seed=w.config.seed)
        ex = pd.concat([ex, reg], ignore_index=True)
        ex["seed"], ex["mode"] = w.config.seed, w.config.mode
        return out, ex
    return out
