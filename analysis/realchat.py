"""A real-chat audit world: real conversation texts with hand labels, everything around them simulated.

The conversations (ShareGPT JSON, a ChatGPT export or a messages table) are real; only those with a
hand label are kept, because the labels are the world's truth: a conversation is about an Art. 9
category iff its label says so, and its ad interest is its labeled IAB tier-1. Around them the
generator draws users and regions (parts of one ShareGPT chat share a user), times, the platform's
filter (per-category catch rates), and an ad log in which, after the policy date and in included
regions, ads follow the user's most recent unblocked chat (its tier-1) with a CTR lift. The audit
sees a `label_share` sample of the labels, as people wrote them (tier-1 names); `ground_truth.json`
holds every parameter and realized truth in the simulator's format, `truth/` the per-conversation
and per-impression truth the stages never read.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml
from scipy.stats import norm

from analysis.contract.art9 import ART9
from analysis.contract.schemas import DataError
from analysis.ingest.importers import chat_of
from analysis.ingest.inputs import load_inputs
from analysis.mapping.labels import read_labels
from analysis.simulate import EXCLUDED_REGIONS, GENERIC_AD_NODES, INCLUDED_REGIONS, World, lift_truth
from analysis.util.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE
from analysis.util.taxonomy import load_taxonomy


@dataclass
class RealWorldConfig:
    """Every knob of the real-chat world; all of it goes to ground_truth.json."""

    seed: int = 20251216
    start: str = "2025-09-01"
    end: str = "2026-03-31"  # inclusive
    policy_date: str = DEFAULT_POLICY_DATE
    chats_per_user: float = 3.0  # mean number of chats (all parts of one ShareGPT chat count once) per user
    excluded_share: float = 0.35
    excluded_regions: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED))
    violation_regions: list[str] = field(default_factory=list)
    max_conversations: int | None = None  # a seeded sample of the labeled conversations (tests)
    label_share: float = 0.5  # share of conversations whose hand labels the audit sees
    p_voice: float = 0.1
    filter_catch: dict[str, float] = field(
        default_factory=lambda: {
            "health": 0.85, "religion": 0.9, "politics": 0.8, "sexual_orientation": 0.9,
            "ethnicity": 0.85, "philosophical_beliefs": 0.75, "trade_union": 0.8,
        }
    )
    filter_false_block: float = 0.02
    impressions_per_user: float = 150.0
    p_chat_target: float = 0.5
    chat_window_days: float = 30.0
    p_likes_interest: float = 0.3
    base_ctr: float = 0.02
    ctr_user_sigma: float = 0.5
    ctr_category_sigma: float = 0.3
    lift_matched: float = 0.40
    lift_heterogeneity: float = 0.3
    holdout_share: float = 0.0  # 0: no `arm` column, as in most external audits

    @classmethod
    def from_dict(cls, d: dict | None) -> "RealWorldConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown real-world parameter(s): {sorted(unknown)}")
        cfg = cls(**d)
        for name in ("excluded_share", "label_share", "p_voice", "p_chat_target", "holdout_share", "filter_false_block"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")
        missing = set(ART9) - set(cfg.filter_catch)
        if missing:
            raise ValueError(f"filter_catch lacks {sorted(missing)}")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict | None = None) -> "RealWorldConfig":
        raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        return cls.from_dict({**raw.get("world", raw), **(overrides or {})})


def read_chats(path: str | Path) -> pd.DataFrame:
    """The conversations' turns (conversation_id, turn_index, role, text) through ingest's readers and importers."""
    p = Path(path)
    return load_inputs(p).messages[["conversation_id", "turn_index", "role", "text"]]


def simulate_real(chats: str | Path, labels: list[str | Path], cfg: RealWorldConfig | dict | None = None) -> World:
    """The real-chat world of `chats` (path) and `labels` (label files), seeded by `cfg.seed`."""
    if not isinstance(cfg, RealWorldConfig):
        cfg = RealWorldConfig.from_dict(cfg)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    lab = read_labels(labels)
    msgs = read_chats(chats)
    keep = lab["conversation_id"].astype(str).isin(set(msgs["conversation_id"]))
    if not keep.any():
        raise DataError(chats, f"none of the {len(lab)} labeled conversations is in the chats")
    lab = lab[keep].sort_values("conversation_id").reset_index(drop=True)
    if cfg.max_conversations is not None and len(lab) > cfg.max_conversations:
        lab = lab.iloc[np.sort(rng.choice(len(lab), cfg.max_conversations, replace=False))].reset_index(drop=True)
    conv_ids = lab["conversation_id"].astype(str).to_numpy()
    msgs = msgs[msgs["conversation_id"].isin(set(conv_ids))]
    tax = load_taxonomy()
    # read_labels resolved tier-1 names to ids already; labels without the column have no tier-1
    tier1 = lab["iab_tier1"] if "iab_tier1" in lab else pd.Series(pd.NA, index=lab.index, dtype="string")
    tier1 = tier1.astype(object).where(tier1.notna(), None).to_numpy()
    name_of = dict(zip(tax["id"], tax["label"]))

    start = pd.Timestamp(cfg.start, tz="UTC")
    end = pd.Timestamp(cfg.end, tz="UTC") + pd.Timedelta(days=1)
    policy = pd.Timestamp(cfg.policy_date, tz="UTC")
    span_s = (end - start).total_seconds()

    # ---- users: chats dealt to users (parts of a chat together), users to regions
    chat = chat_of(pd.Series(conv_ids)).to_numpy()
    chats_u, chat_idx = np.unique(chat, return_inverse=True)
    nu = max(2, int(round(len(chats_u) / cfg.chats_per_user)))
    activity = rng.lognormal(0, 0.8, size=nu)
    chat_user = rng.choice(nu, size=len(chats_u), p=activity / activity.sum())
    conv_user = chat_user[chat_idx]
    user_ids = np.array([f"u_{x:08x}" for x in rng.choice(2**32, size=nu, replace=False)])
    excluded_user = rng.random(nu) < cfg.excluded_share
    inc_r, inc_w = zip(*INCLUDED_REGIONS.items())
    exc_r, exc_w = zip(*EXCLUDED_REGIONS.items())
    region = np.where(excluded_user, rng.choice(exc_r, size=nu, p=np.array(exc_w) / sum(exc_w)),
                      rng.choice(inc_r, size=nu, p=np.array(inc_w) / sum(inc_w)))
    users = pd.DataFrame({"user_id": user_ids, "region": region})
    in_scope = ~np.isin(region, cfg.excluded_regions) | np.isin(region, cfg.violation_regions)
    arm = np.where(~np.isin(region, cfg.excluded_regions), np.where(rng.random(nu) < cfg.holdout_share, "holdout", "treatment"), None)

    # ---- times: a start per conversation, turns a few seconds to minutes apart
    nc = len(conv_ids)
    conv_start = start + pd.to_timedelta(rng.random(nc) * span_s, unit="s")
    voice = rng.random(nc) < cfg.p_voice
    pos = pd.Index(conv_ids).get_indexer(msgs["conversation_id"])
    m = msgs.assign(_c=pos).sort_values(["_c", "turn_index"])
    gap = rng.uniform(5, 240, size=len(m))
    offset = pd.Series(gap).groupby(m["_c"].to_numpy()).cumsum().to_numpy() - gap
    messages = pd.DataFrame({
        "conversation_id": m["conversation_id"].to_numpy(),
        "user_id": user_ids[conv_user[m["_c"].to_numpy()]],
        "turn_index": m["turn_index"].to_numpy(dtype="int64"),
        "role": m["role"].to_numpy(),
        "text": m["text"].to_numpy(),
        "sent_at": conv_start[m["_c"].to_numpy()] + pd.to_timedelta(offset, unit="s"),
        "modality": np.where(voice[m["_c"].to_numpy()], "voice", "text"),
    })

    # ---- the platform's filter: blocked iff score >= 0.5, score = Phi(max_c z_c), z_c ~ N(Phi^-1(catch_c), 1)
    sens = np.zeros((nc, len(ART9)), dtype=bool)
    for i, v in enumerate(lab["art9"]):
        for c in v:
            sens[i, ART9.index(c)] = True
    catch = np.array([cfg.filter_catch[c] for c in ART9])
    z = np.where(sens, rng.normal(size=sens.shape) + norm.ppf(catch)[None, :], -np.inf).max(axis=1)
    z = np.where(sens.any(axis=1), z, rng.normal(size=nc) + norm.ppf(cfg.filter_false_block))
    score = norm.cdf(z)
    blocked = score >= 0.5
    p_pass = np.where(sens, 1 - catch[None, :], 1.0).prod(axis=1)
    filter_decisions = pd.DataFrame({"conversation_id": conv_ids, "blocked": blocked, "score": np.round(score, 6)})

    # ---- the labels the audit sees: a sample, exactly as the label files wrote them
    shown = rng.random(nc) < cfg.label_share
    labels = pd.DataFrame({"conversation_id": conv_ids[shown], "art9": lab.loc[shown, "art9"].map(";".join).to_numpy(),
                           "iab_tier1": [name_of[t] if t else "none" for t in tier1[shown]]})

    # ---- impressions: baseline ads, and after the policy date chat-targeted ones (the labeled tier-1)
    ad_nodes = sorted(set(GENERIC_AD_NODES) | {t for t in tier1 if t})
    node_idx = {n: i for i, n in enumerate(ad_nodes)}
    chat_node = np.array([node_idx[t] if t else -1 for t in tier1])
    ni = int(round(cfg.impressions_per_user * nu))
    ad_activity = rng.lognormal(0, 0.7, size=nu)
    user_ctr = cfg.base_ctr * rng.lognormal(-cfg.ctr_user_sigma**2 / 2, cfg.ctr_user_sigma, size=nu)
    imp_user = np.sort(rng.choice(nu, size=ni, p=ad_activity / ad_activity.sum()))
    shown_s = rng.random(ni) * span_s
    order = np.lexsort((shown_s, imp_user))
    imp_user, shown_s = imp_user[order], shown_s[order]
    shown_at = start + pd.to_timedelta(shown_s, unit="s")
    node_w = rng.lognormal(0, 0.6, size=len(ad_nodes))
    cat_mult = rng.lognormal(-cfg.ctr_category_sigma**2 / 2, cfg.ctr_category_sigma, size=len(ad_nodes))
    lift_by_node = cfg.lift_matched * rng.lognormal(-cfg.lift_heterogeneity**2 / 2, cfg.lift_heterogeneity, size=len(ad_nodes))
    base_cat = rng.choice(len(ad_nodes), size=ni, p=node_w / node_w.sum())
    # interest-based ads (likes/follows): a non-sensitive chat of the same user, any time
    interest = (~sens.any(axis=1)) & (chat_node >= 0)
    by_user = pd.Series(chat_node[interest]).groupby(conv_user[interest]).agg(list)
    pick = np.array([rng.choice(by_user[u]) if u in by_user.index else -1 for u in imp_user]) if len(by_user) else np.full(ni, -1)
    base_cat = np.where((rng.random(ni) < cfg.p_likes_interest) & (pick >= 0), pick, base_cat)
    conv_s = (conv_start - start).total_seconds().to_numpy()
    usable = (~blocked) & (chat_node >= 0)
    uc = np.flatnonzero(usable)
    ckey = conv_user[uc].astype(np.float64) * 1e9 + conv_s[uc]
    corder = np.argsort(ckey, kind="stable")
    uc, ckey = uc[corder], ckey[corder]
    posi = np.searchsorted(ckey, imp_user.astype(np.float64) * 1e9 + shown_s, side="right") - 1
    cand = uc[np.maximum(posi, 0)] if len(uc) else np.zeros(ni, dtype=int)
    has_recent = (posi >= 0) & (len(uc) > 0) & (conv_user[cand] == imp_user) & (shown_s - conv_s[cand] <= cfg.chat_window_days * 86400)
    eligible = in_scope[imp_user] & (shown_at >= policy) & (arm[imp_user] != "holdout")
    chat_targeted = eligible & has_recent & (rng.random(ni) < cfg.p_chat_target)
    final_cat = np.where(chat_targeted, chat_node[cand], base_cat)
    doy = shown_at.dayofyear.to_numpy()
    season = 1 + 0.06 * np.sin(2 * np.pi * (doy - 80) / 365.25)
    p0 = np.clip(user_ctr[imp_user] * cat_mult[base_cat] * season, 0, 1)
    p1 = np.clip(user_ctr[imp_user] * cat_mult[final_cat] * season * (1 + np.where(chat_targeted, lift_by_node[final_cat], 0.0)), 0, 1)
    clicked = rng.random(ni) < p1
    patterns = [["likes"], ["follows"], ["likes", "shares"], ["ai_chat"], ["ai_chat", "likes"]]
    src = np.where(chat_targeted, np.where(rng.random(ni) < 0.3, 4, 3), rng.integers(0, 3, size=ni))
    node_arr = np.array(ad_nodes, dtype=object)
    imp_ids = np.char.add("i_", np.char.zfill(np.arange(ni).astype(str), 9))
    impressions = pd.DataFrame({
        "impression_id": imp_ids,
        "user_id": user_ids[imp_user],
        "shown_at": shown_at,
        "ad_category": node_arr[final_cat],
        "clicked": clicked,
        "targeting_sources": pd.Series(pa.array([patterns[k] for k in src], pa.list_(pa.string())).to_pandas(), dtype=object),
    })
    if cfg.holdout_share > 0:
        impressions["arm"] = arm[imp_user]
    impression_truth = pd.DataFrame({
        "impression_id": imp_ids, "chat_targeted": chat_targeted,
        "source_conversation_id": np.where(chat_targeted, conv_ids[cand], None),
        "baseline_category": node_arr[base_cat], "p_click": p1, "p_click_counterfactual": p0,
    })
    art9_lists = [list(v) for v in lab["art9"]]
    conversation_truth = pd.DataFrame({
        "conversation_id": conv_ids, "user_id": user_ids[conv_user], "topic": None, "topic_b": None, "kind": np.where(sens.any(axis=1), "sensitive", "ad"),
        "iab_id": tier1, "iab_tier1": tier1, "art9": art9_lists, "p_pass": p_pass, "started_at": conv_start, "blocked": blocked,
    })
    gt = _ground_truth(cfg, users, conversation_truth, sens, blocked, p_pass, impressions, impression_truth, region[imp_user],
                       arm[imp_user], policy, lift_by_node, node_idx, len(msgs), shown)
    gt["generation_seconds"] = round(time.perf_counter() - t0, 2)
    return World(users, messages, impressions, filter_decisions, labels, conversation_truth, impression_truth, gt, cfg)


def _ground_truth(cfg, users, conv, sens, blocked, p_pass, imp, itruth, region_i, arm_i, policy, lift_by_node, node_idx, n_messages, shown) -> dict:
    excl_user = users["region"].isin(cfg.excluded_regions).to_numpy()
    conv_excl = excl_user[pd.Index(users["user_id"]).get_indexer(conv["user_id"])]
    leak = {}
    for j, c in enumerate(ART9):
        has = sens[:, j]
        row = {
            "filter_catch": cfg.filter_catch[c], "leak_rate_param": 1 - cfg.filter_catch[c],
            # the estimand: the expected pass probability over this world's conversations about c
            "leak_rate": float(p_pass[has].mean()) if has.any() else None,
            "leak_rate_realized": float((~blocked[has]).mean()) if has.any() else None,
            "n_conversations": int(has.sum()), "n_passed": int((~blocked[has]).sum()),
            "n_labeled_shown": int((has & shown).sum()), "by_region_group": {},
        }
        for g, mask in (("included", ~conv_excl), ("excluded", conv_excl)):
            mm = has & mask
            row["by_region_group"][g] = {"leak_rate": float(p_pass[mm].mean()) if mm.any() else None,
                                         "leak_rate_realized": float((~blocked[mm]).mean()) if mm.any() else None,
                                         "n_conversations": int(mm.sum())}
        leak[c] = row
    excl_i = np.isin(region_i, cfg.excluded_regions)
    inc_post = (~excl_i) & (imp["shown_at"] >= policy).to_numpy()
    ct = itruth["chat_targeted"].to_numpy()
    return {
        "world_version": 1,
        "world_kind": "real_chats",
        "config": dataclasses.asdict(cfg),
        "counts": {
            "users": int(len(users)), "users_excluded": int(excl_user.sum()), "conversations": int(len(conv)),
            "messages": int(n_messages), "conversations_sensitive": int(sens.any(axis=1).sum()),
            "labels_shown": int(shown.sum()), "impressions": int(len(imp)), "impressions_chat_targeted": int(ct.sum()),
            "clicks": int(imp["clicked"].sum()),
        },
        "topics": [],
        "leakage": leak,
        "lift": lift_truth(itruth, inc_post, arm_i, lift_by_node, node_idx, cfg.lift_matched,
                           note="as in the simulated world (analysis.simulate): expected CTR with the policy vs the baseline ad without chat lift"),
        "violations": {
            "violation_regions": cfg.violation_regions,
            "chat_targeted_impressions_in_excluded_regions": int((ct & excl_i).sum()),
            "by_region": {r: int(v) for r, v in pd.Series(region_i[ct & excl_i]).value_counts().items()},
        },
    }


def simulate_real_to(chats: str | Path, labels: list[str | Path], out_dir: str | Path, config_path: str | Path | None = None,
                     overrides: dict | None = None) -> World:
    world = simulate_real(chats, labels, RealWorldConfig.from_yaml(config_path, overrides))
    world.write(out_dir)
    return world
