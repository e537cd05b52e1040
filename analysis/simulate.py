"""A seeded synthetic audit world whose ground truth is known.

Users in included and excluded regions talk with the AI assistant about ad-relevant topics,
sensitive (GDPR Art. 9) topics and noise; the platform's filter blocks some sensitive
conversations; after the policy date, in included regions only (plus any `violation_regions`),
ads shift toward users' recent unblocked chat topics and chat-matched ads get a CTR lift.
Every parameter and every realized truth goes to `ground_truth.json`; per-conversation and
per-impression truths go to `truth/`, which the audit stages never read.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from scipy.stats import norm

from analysis.contract.art9 import ART9
from analysis.util.regions import DEFAULT_EXCLUDED, DEFAULT_POLICY_DATE
from analysis.util.storage import atomic_path, write_json, write_parquet
from analysis.util.taxonomy import load_taxonomy

INCLUDED_REGIONS = {"US": 30, "IN": 15, "BR": 12, "MX": 8, "ID": 8, "PH": 7, "CA": 7, "AU": 7, "NG": 6}
EXCLUDED_REGIONS = {"DE": 18, "FR": 15, "GB": 12, "IT": 12, "ES": 10, "PL": 8, "NL": 7, "KR": 6, "SE": 5, "IE": 4, "NO": 3}

# Ads that exist without any chat signal (beyond the topics' own nodes): shopping, news, tech, ...
GENERIC_AD_NODES = ["473", "210", "596", "483", "52", "1", "653", "552", "274", "JLBCU7", "132", "391"]

PRESETS = {
    "default": {},
    # A/A world: no chat-based targeting at all, so no lift and no leakage.
    "null": {"p_chat_target": 0.0, "lift_matched": 0.0, "filter_catch": {c: 1.0 for c in ART9}},
    # An excluded region gets chat-based targeting anyway.
    "violation": {"violation_regions": ["DE"]},
    # No chat flow at all, but interest that rises with a chat comes from outside it: the platform sees
    # the same interest through other signals at the same time (issue 14). A black-box test that
    # compares users before and after a chat reports flow that is not leakage.
    "outside_interest": {"p_chat_target": 0.0, "lift_matched": 0.0, "filter_catch": {c: 1.0 for c in ART9},
                         "outside_interest": 0.3},
}


@dataclass
class WorldConfig:
    """Every knob of the simulated world; all of it is written to ground_truth.json."""

    seed: int = 20251216
    mode: str = "default"  # default | null | violation (a preset applied over the fields below)
    n_users: int = 6000
    n_conversations: int = 24000
    n_impressions: int = 2_400_000
    start: str = "2025-09-01"
    end: str = "2026-03-31"  # inclusive
    policy_date: str = DEFAULT_POLICY_DATE
    excluded_share: float = 0.35
    excluded_regions: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED))
    violation_regions: list[str] = field(default_factory=list)
    # conversations
    p_sensitive: float = 0.22
    p_noise: float = 0.18
    p_mixed: float = 0.15
    p_favorite: float = 0.6
    n_favorites: int = 3
    p_voice: float = 0.15
    typo_rate: float = 0.25
    p_pii: float = 0.02
    label_share: float = 0.25
    # the platform's sensitive filter: probability that a conversation about c is blocked
    filter_catch: dict[str, float] = field(
        default_factory=lambda: {
            "health": 0.97,
            "religion": 0.985,
            "politics": 0.95,
            "sexual_orientation": 0.93,
            "ethnicity": 0.96,
            "philosophical_beliefs": 0.90,
            "trade_union": 0.88,
        }
    )
    filter_false_block: float = 0.02
    # ads
    p_chat_target: float = 0.5  # share of eligible impressions that use a recent chat topic
    chat_window_days: float = 30.0
    p_likes_interest: float = 0.3  # baseline ads drawn from the user's (non-sensitive) interests
    base_ctr: float = 0.02
    ctr_user_sigma: float = 0.5
    ctr_category_sigma: float = 0.3
    lift_matched: float = 0.40  # relative CTR lift of chat-matched ads
    lift_heterogeneity: float = 0.3  # lognormal sigma of the per-category lift multiplier
    holdout_share: float = 0.10
    # outside interest: for chat_window_days after a conversation about a topic with an IAB node (any region,
    # blocked or not), this share of the user's non-chat ads goes to that node through other signals
    # (likes, follows): interest caused outside the chat with the chat's timing. 0 = off.
    outside_interest: float = 0.0
    outside_interest_since: str | None = None  # the outside signal exists from this date on (None: the whole period)

    @classmethod
    def from_dict(cls, d: dict | None) -> "WorldConfig":
        d = dict(d or {})
        mode = d.get("mode", "default")
        if mode not in PRESETS:
            raise ValueError(f"unknown world mode {mode!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown world parameter(s): {sorted(unknown)}")
        merged = {**PRESETS[mode], **d}
        cfg = cls(**merged)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "WorldConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict({**raw.get("world", raw), **(overrides or {})})

    def validate(self) -> None:
        if self.n_users < 10 or self.n_conversations < 10 or self.n_impressions < 10:
            raise ValueError("a world needs at least 10 users, conversations and impressions")
        for name in ("p_sensitive", "p_noise", "p_mixed", "p_voice", "p_chat_target", "holdout_share", "label_share", "outside_interest"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.p_sensitive + self.p_noise > 1:
            raise ValueError("p_sensitive + p_noise must be at most 1")
        missing = set(ART9) - set(self.filter_catch)
        if missing:
            raise ValueError(f"filter_catch lacks {sorted(missing)}")


def load_catalog(path: str | Path | None = None) -> list[dict]:
    """The topic catalogue: phrasings, slots and the IAB node each topic feeds."""
    src = Path(path) if path else resources.files("analysis") / "data" / "world_topics.yaml"
    text = src.read_text(encoding="utf-8")
    topics = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["topics"]  # libyaml: ~10x faster
    for t in topics:
        for key in ("openers", "followups", "assistant"):
            for tpl in t[key]:
                for slot in re.findall(r"\{(\w+)\}", tpl):
                    if slot not in t.get("slots", {}):
                        raise ValueError(f"world_topics.yaml: topic {t['key']}: template uses undefined slot {{{slot}}}")
    return topics


# --------------------------------------------------------------------------------------- text

_SLOT = re.compile(r"\{(\w+)\}")
_TRANSITIONS = ["also, ", "unrelated but ", "different question: ", "btw ", "oh and ", "another thing, ", "separately, "]
_BOILERPLATE = ["continue", "go on", "thanks!", "ok", "keep going", "thank you so much", "can you make it shorter", "more", "ok thx"]
_PII = [
    "my email is {first}.{last}{n}@gmail.com if you need it",
    "you can reach me at +1 415 555 {n4}",
    "my card 4111 1111 1111 {n4} was charged twice",
    "call me on 07700 900{n3}",
    "my iban is DE89 3704 0044 0532 0130 00",
    "follow me @{first}_{last}{n}",
    "here is the link https://example.com/u/{first}{n}",
]
_FIRST = ["anna", "james", "maria", "wei", "fatima", "li", "carlos", "priya", "tom", "olga"]
_LAST = ["smith", "garcia", "chen", "okafor", "nguyen", "kowalski", "silva", "khan", "brown", "ito"]


class _TextMaker:
    def __init__(self, catalog: list[dict], rnd: random.Random, cfg: WorldConfig):
        self.cat = catalog
        self.rnd = rnd
        self.cfg = cfg

    def fill(self, tpl: str, slots: dict) -> str:
        return _SLOT.sub(lambda m: self.rnd.choice(slots[m.group(1)]), tpl)

    def typo(self, s: str) -> str:
        r = self.rnd
        chars = list(s)
        for _ in range(r.randint(1, 3)):
            if len(chars) < 4:
                break
            i = r.randrange(1, len(chars) - 1)
            if not chars[i].isalpha():
                continue
            op = r.random()
            if op < 0.4:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            elif op < 0.7:
                del chars[i]
            else:
                chars.insert(i, chars[i])
        return "".join(chars)

    def style(self, s: str) -> str:
        r = self.rnd
        if r.random() < self.cfg.typo_rate:
            s = self.typo(s)
        if r.random() < 0.3:
            s = s.lower()
        if r.random() < 0.15:
            s = s.rstrip("?.!")
        return s

    def user_turn(self, t: dict, first: bool) -> str:
        r = self.rnd
        slots = t.get("slots", {})
        s = self.fill(r.choice(t["openers"] if first else t["followups"]), slots)
        if r.random() < 0.2:  # long message: several thoughts at once
            s = s + " " + self.fill(r.choice(t["followups"]), slots)
        if r.random() < self.cfg.p_pii:
            s = s + ". " + self.pii()
        return self.style(s)

    def pii(self) -> str:
        r = self.rnd
        return r.choice(_PII).format(
            first=r.choice(_FIRST), last=r.choice(_LAST), n=r.randint(1, 99), n4=f"{r.randint(0, 9999):04d}", n3=f"{r.randint(0, 999):03d}"
        )

    def assistant_turn(self, t: dict) -> str:
        return self.fill(self.rnd.choice(t["assistant"]), t.get("slots", {}))

    def conversation(self, a: int, b: int, n_user: int) -> list[tuple[str, str]]:
        """Alternating (role, text) turns; topic b (if >= 0) enters in one later user turn."""
        r = self.rnd
        ta = self.cat[a]
        turns: list[tuple[str, int]] = [("open", a)] + [("follow", a)] * (n_user - 1)
        if b >= 0:
            pos = r.randint(1, len(turns))
            turns.insert(pos, ("switch", b))
        out = []
        for kind, k in turns:
            t = self.cat[k]
            if kind == "switch":
                text = self.style(r.choice(_TRANSITIONS) + self.fill(r.choice(t["openers"]), t.get("slots", {})))
            else:
                text = self.user_turn(t, first=kind == "open")
            out.append(("user", text))
            out.append(("assistant", self.assistant_turn(t)))
            if r.random() < 0.08:
                out.append(("user", r.choice(_BOILERPLATE)))
                out.append(("assistant", self.assistant_turn(ta)))
        return out


# ------------------------------------------------------------------------------------ world


@dataclass
class World:
    """The tables of the data contract plus the truths behind them."""

    users: pd.DataFrame
    messages: pd.DataFrame
    impressions: pd.DataFrame
    filter_decisions: pd.DataFrame
    labels: pd.DataFrame
    conversation_truth: pd.DataFrame
    impression_truth: pd.DataFrame
    ground_truth: dict
    config: WorldConfig

    def write(self, out_dir: str | Path) -> Path:
        """Write every table atomically; ground_truth.json last, so its presence marks a complete world."""
        out = Path(out_dir)
        write_parquet(self.users, out / "users.parquet")
        write_parquet(self.messages, out / "messages.parquet")
        _write_impressions(self.impressions, out / "impressions.parquet")
        write_parquet(self.filter_decisions, out / "filter_decisions.parquet")
        write_parquet(self.labels, out / "labels.parquet")
        write_parquet(self.conversation_truth, out / "truth" / "conversations.parquet")
        write_parquet(self.impression_truth, out / "truth" / "impressions.parquet")
        write_json(self.ground_truth, out / "ground_truth.json")
        return out


def _write_impressions(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def simulate(cfg: WorldConfig | dict | None = None, *, text: bool = True) -> World:
    """Generate a world from its config (seeded: the same config gives the same world). `text=False`
    leaves the messages' text out (an empty messages table; everything else identical, as the text has its
    own random stream): studies of the ad log over thousands of worlds do not read it."""
    if not isinstance(cfg, WorldConfig):
        cfg = WorldConfig.from_dict(cfg)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    rnd = random.Random(cfg.seed)
    catalog = load_catalog(os.environ.get("CHAT_AD_AUDIT_TOPICS"))
    tax = load_taxonomy()
    tier1 = tax.set_index("id")["tier1_id"]

    start = pd.Timestamp(cfg.start, tz="UTC")
    end = pd.Timestamp(cfg.end, tz="UTC") + pd.Timedelta(days=1)
    policy = pd.Timestamp(cfg.policy_date, tz="UTC")
    span_s = (end - start).total_seconds()

    # ---- users
    nu = cfg.n_users
    user_ids = np.array([f"u_{x:08x}" for x in rng.choice(2**32, size=nu, replace=False)])
    excluded_user = rng.random(nu) < cfg.excluded_share
    inc_r, inc_w = zip(*INCLUDED_REGIONS.items())
    exc_r, exc_w = zip(*EXCLUDED_REGIONS.items())
    region = np.where(
        excluded_user,
        rng.choice(exc_r, size=nu, p=np.array(exc_w) / sum(exc_w)),
        rng.choice(inc_r, size=nu, p=np.array(inc_w) / sum(inc_w)),
    )
    age_band = rng.choice(["18-24", "25-34", "35-44", "45-54", "55+"], size=nu, p=[0.24, 0.31, 0.2, 0.14, 0.11])
    signup = start - pd.to_timedelta(rng.integers(30, 3 * 365, size=nu), unit="D")
    users = pd.DataFrame({"user_id": user_ids, "region": region, "age_band": age_band, "signup_date": signup.normalize()})
    chat_activity = rng.lognormal(0, 0.8, size=nu)
    ad_activity = rng.lognormal(0, 0.7, size=nu)
    user_ctr = cfg.base_ctr * rng.lognormal(-cfg.ctr_user_sigma**2 / 2, cfg.ctr_user_sigma, size=nu)
    in_scope = ~np.isin(region, cfg.excluded_regions) | np.isin(region, cfg.violation_regions)
    arm = np.where(~np.isin(region, cfg.excluded_regions), np.where(rng.random(nu) < cfg.holdout_share, "holdout", "treatment"), None)

    # ---- topic draw
    kinds = np.array([t["kind"] for t in catalog])
    cats = np.array([t.get("category") or "" for t in catalog])
    iab = np.array([t.get("iab_id") or "" for t in catalog], dtype=object)
    topic_p = np.zeros(len(catalog))
    p_ad = 1 - cfg.p_sensitive - cfg.p_noise
    for i, t in enumerate(catalog):
        if t["kind"] == "ad":
            topic_p[i] = p_ad / (kinds == "ad").sum()
        elif t["kind"] == "noise":
            topic_p[i] = cfg.p_noise / (kinds == "noise").sum()
        else:  # sensitive: equal per category, then per sub-topic
            topic_p[i] = cfg.p_sensitive / len(ART9) / (cats == t["category"]).sum()
    topic_p /= topic_p.sum()
    favorites = np.stack([rng.choice(len(catalog), size=cfg.n_favorites, replace=False, p=topic_p) for _ in range(nu)])

    nc = cfg.n_conversations
    conv_user = rng.choice(nu, size=nc, p=chat_activity / chat_activity.sum())
    conv_start = start + pd.to_timedelta(np.sort(rng.random(nc)) * span_s, unit="s")
    fav = rng.random(nc) < cfg.p_favorite
    topic_a = np.where(fav, favorites[conv_user, rng.integers(0, cfg.n_favorites, size=nc)], rng.choice(len(catalog), size=nc, p=topic_p))
    topic_b = np.where(rng.random(nc) < cfg.p_mixed, rng.choice(len(catalog), size=nc, p=topic_p), -1)
    topic_b = np.where(topic_b == topic_a, -1, topic_b)
    n_user_turns = np.minimum(1 + rng.geometric(0.45, size=nc) - 1, 8)
    voice = rng.random(nc) < cfg.p_voice
    conv_ids = np.array([f"c_{x:010x}" for x in rng.choice(2**40, size=nc, replace=False)])

    # ---- messages
    maker = _TextMaker(catalog, rnd, cfg)
    m_conv, m_turn, m_role, m_text, m_off = [], [], [], [], []
    for ci in range(nc if text else 0):
        offset = 0.0
        for ti, (role, text) in enumerate(maker.conversation(int(topic_a[ci]), int(topic_b[ci]), int(n_user_turns[ci]))):
            m_conv.append(ci)
            m_turn.append(ti)
            m_role.append(role)
            m_text.append(text)
            m_off.append(offset)
            offset += rnd.uniform(5, 240)
    m_conv = np.array(m_conv, dtype=np.int64)
    messages = pd.DataFrame(
        {
            "conversation_id": conv_ids[m_conv],
            "user_id": user_ids[conv_user[m_conv]],
            "turn_index": np.array(m_turn, dtype="int64"),
            "role": m_role,
            "text": m_text,
            "sent_at": conv_start[m_conv] + pd.to_timedelta(np.array(m_off), unit="s"),
            "modality": np.where(voice[m_conv], "voice", "text"),
        }
    )

    # ---- sensitive categories per conversation and the platform's filter
    sens = np.zeros((nc, len(ART9)), dtype=bool)
    for j, c in enumerate(ART9):
        sens[:, j] = (cats[topic_a] == c) | ((topic_b >= 0) & (cats[np.maximum(topic_b, 0)] == c))
    catch = np.array([cfg.filter_catch[c] for c in ART9])
    # Blocked iff score >= 0.5; score = Phi(z), z ~ N(Phi^-1(catch), 1) per present category (max).
    z_cat = rng.normal(size=(nc, len(ART9))) + norm.ppf(catch)[None, :]
    z_cat = np.where(sens, z_cat, -np.inf)
    z_clean = rng.normal(size=nc) + norm.ppf(cfg.filter_false_block)
    z = np.where(sens.any(axis=1), z_cat.max(axis=1), z_clean)
    score = norm.cdf(z)
    blocked = score >= 0.5
    filter_decisions = pd.DataFrame({"conversation_id": conv_ids, "blocked": blocked, "score": np.round(score, 6)})
    p_pass = np.where(sens, 1 - catch[None, :], 1.0).prod(axis=1)  # exact, given the categories present

    # ---- labels (validation sample) and per-conversation truth
    art9_lists = [[c for j, c in enumerate(ART9) if sens[i, j]] for i in range(nc)]
    primary_iab = iab[topic_a]
    tier1_primary = pd.Series(primary_iab).replace("", None).map(tier1).to_numpy()
    lab = rng.random(nc) < cfg.label_share
    labels = pd.DataFrame(
        {"conversation_id": conv_ids[lab], "art9": [art9_lists[i] for i in np.flatnonzero(lab)], "iab_tier1": tier1_primary[lab]}
    )
    keys = np.array([t["key"] for t in catalog])
    conversation_truth = pd.DataFrame(
        {
            "conversation_id": conv_ids,
            "user_id": user_ids[conv_user],
            "topic": keys[topic_a],
            "topic_b": np.where(topic_b >= 0, keys[np.maximum(topic_b, 0)], None),
            "kind": kinds[topic_a],
            "iab_id": np.where(primary_iab == "", None, primary_iab),
            "iab_tier1": tier1_primary,
            "art9": art9_lists,
            "p_pass": p_pass,
            "started_at": conv_start,
        }
    )

    # ---- impressions
    ni = cfg.n_impressions
    imp_user = np.sort(rng.choice(nu, size=ni, p=ad_activity / ad_activity.sum()))
    shown_s = rng.random(ni) * span_s
    order = np.lexsort((shown_s, imp_user))
    imp_user, shown_s = imp_user[order], shown_s[order]
    shown_at = start + pd.to_timedelta(shown_s, unit="s")

    ad_nodes = sorted(set(GENERIC_AD_NODES) | {x for x in iab if x})
    node_idx = {n: i for i, n in enumerate(ad_nodes)}
    node_w = rng.lognormal(0, 0.6, size=len(ad_nodes))
    sensitive_nodes = {iab[i] for i in range(len(catalog)) if kinds[i] == "sensitive"}
    node_w[[node_idx[n] for n in sensitive_nodes]] *= 0.3
    cat_mult = rng.lognormal(-cfg.ctr_category_sigma**2 / 2, cfg.ctr_category_sigma, size=len(ad_nodes))
    lift_by_node = cfg.lift_matched * rng.lognormal(-cfg.lift_heterogeneity**2 / 2, cfg.lift_heterogeneity, size=len(ad_nodes))

    base_cat = rng.choice(len(ad_nodes), size=ni, p=node_w / node_w.sum())
    # interest-based (likes/follows) ads from the user's non-sensitive favourite topics
    fav_iab = np.vectorize(lambda k: node_idx.get(iab[k], -1) if kinds[k] == "ad" else -1)(favorites)
    pick = fav_iab[imp_user, rng.integers(0, cfg.n_favorites, size=ni)]
    use_interest = (rng.random(ni) < cfg.p_likes_interest) & (pick >= 0)
    base_cat = np.where(use_interest, pick, base_cat)
    outside = np.zeros(ni, dtype=bool)
    if cfg.outside_interest > 0:  # drawn only when on, so other worlds keep their random stream
        outside = _outside_interest(cfg, rng, conv_user, (conv_start - start).total_seconds().to_numpy(), topic_a, iab, node_idx,
                                    imp_user, shown_s, shown_at, start)
        base_cat = np.where(outside >= 0, outside, base_cat)
        outside = outside >= 0

    # chat targeting: the most recent usable conversation of the same user within the window
    chat_topic = np.where((topic_b >= 0) & (rng.random(nc) < 0.5), topic_b, topic_a)
    chat_topic = np.where(iab[chat_topic] == "", topic_a, chat_topic)
    chat_node = np.array([node_idx.get(iab[k], -1) for k in chat_topic])
    usable = (~blocked) & (chat_node >= 0)
    conv_s = (conv_start - start).total_seconds().to_numpy()
    uc = np.flatnonzero(usable)
    ckey = conv_user[uc].astype(np.float64) * 1e9 + conv_s[uc]
    corder = np.argsort(ckey, kind="stable")
    uc, ckey = uc[corder], ckey[corder]
    ikey = imp_user.astype(np.float64) * 1e9 + shown_s
    pos = np.searchsorted(ckey, ikey, side="right") - 1
    cand = uc[np.maximum(pos, 0)]
    has_recent = (
        (pos >= 0)
        & (conv_user[cand] == imp_user)
        & (shown_s - conv_s[cand] <= cfg.chat_window_days * 86400)
    )
    eligible = in_scope[imp_user] & (shown_at >= policy) & (arm[imp_user] != "holdout")
    chat_targeted = eligible & has_recent & (rng.random(ni) < cfg.p_chat_target)
    final_cat = np.where(chat_targeted, chat_node[cand], base_cat)
    source_conv = np.where(chat_targeted, cand, -1)

    doy = shown_at.dayofyear.to_numpy()
    season = 1 + 0.06 * np.sin(2 * np.pi * (doy - 80) / 365.25) + 0.08 * np.asarray((shown_at.month == 12) & (shown_at.day >= 10))
    p0 = np.clip(user_ctr[imp_user] * cat_mult[base_cat] * season, 0, 1)
    p1 = np.clip(user_ctr[imp_user] * cat_mult[final_cat] * season * (1 + np.where(chat_targeted, lift_by_node[final_cat], 0.0)), 0, 1)
    clicked = rng.random(ni) < p1

    src_patterns = [["likes"], ["follows"], ["likes", "shares"], ["follows", "likes"]]
    base_src = rng.integers(0, len(src_patterns), size=ni)
    chat_src = np.where(rng.random(ni) < 0.3, 5, 4)  # ["ai_chat"] or ["ai_chat", "likes"]
    src_patterns += [["ai_chat"], ["ai_chat", "likes"]]
    src = np.where(chat_targeted, chat_src, base_src)
    lengths = np.array([len(p) for p in src_patterns])[src]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.array(p, dtype=object) for p in src_patterns])
    starts = np.concatenate([[0], np.cumsum([len(p) for p in src_patterns])])[src]
    values = flat[(np.repeat(starts, lengths) + np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))]
    targeting = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.tolist(), pa.string()))
    imp_ids = np.char.add("i_", np.char.zfill(np.arange(ni).astype(str), 9))
    node_arr = np.array(ad_nodes, dtype=object)
    impressions = pd.DataFrame(
        {
            "impression_id": imp_ids,
            "user_id": user_ids[imp_user],
            "shown_at": shown_at,
            "ad_category": node_arr[final_cat],
            "clicked": clicked,
            "placement": rng.choice(["feed", "stories", "reels", "search"], size=ni, p=[0.5, 0.2, 0.2, 0.1]),
            "targeting_sources": pd.Series(targeting.to_pandas(), dtype=object),
            "arm": arm[imp_user],
        }
    )
    impression_truth = pd.DataFrame(
        {
            "impression_id": imp_ids,
            "chat_targeted": chat_targeted,
            "source_conversation_id": np.where(source_conv >= 0, conv_ids[np.maximum(source_conv, 0)], None),
            "baseline_category": node_arr[base_cat],
            "p_click": p1,
            "p_click_counterfactual": p0,
        }
    )

    gt = _ground_truth(
        cfg, catalog, users, conversation_truth, sens, blocked, p_pass, impressions, impression_truth,
        in_scope[imp_user], policy, lift_by_node, node_idx, region[imp_user], arm[imp_user], int(outside.sum()),
    )
    gt["generation_seconds"] = round(time.perf_counter() - t0, 2)
    return World(users, messages, impressions, filter_decisions, labels, conversation_truth, impression_truth, gt, cfg)


def _outside_interest(cfg, rng, conv_user, conv_s, topic_a, iab, node_idx, imp_user, shown_s, shown_at, start) -> np.ndarray:
    """Per impression, the node an outside interest sends it to (-1: none): the user's most recent
    conversation with an IAB topic within chat_window_days before the impression, any region and
    filter decision, taken with probability `outside_interest` (from `outside_interest_since` on)."""
    node = np.array([node_idx.get(iab[k], -1) for k in topic_a])
    uc = np.flatnonzero(node >= 0)
    ckey = conv_user[uc].astype(np.float64) * 1e9 + conv_s[uc]
    o = np.argsort(ckey, kind="stable")
    uc, ckey = uc[o], ckey[o]
    pos = np.searchsorted(ckey, imp_user.astype(np.float64) * 1e9 + shown_s, side="right") - 1
    cand = uc[np.maximum(pos, 0)]
    recent = (pos >= 0) & (conv_user[cand] == imp_user) & (shown_s - conv_s[cand] <= cfg.chat_window_days * 86400)
    if cfg.outside_interest_since is not None:
        recent &= np.asarray(shown_at >= pd.Timestamp(cfg.outside_interest_since, tz="UTC"))
    hit = recent & (rng.random(len(imp_user)) < cfg.outside_interest)
    return np.where(hit, node[cand], -1)


LIFT_ESTIMAND_NOTE = (
    "Impression-weighted expected CTR with the policy vs. the same impressions without it "
    "(counterfactual: the baseline ad category, no chat lift). 'included_post' is the policy's "
    "effect on included-region impressions after the policy date (intent-to-treat over arms); "
    "'treatment_arm' restricts to the treatment arm (the A/B estimand); 'chat_matched' is the "
    "CTR lift of chat-targeted impressions themselves."
)


def lift_truth(itruth: pd.DataFrame, inc_post: np.ndarray, arm: np.ndarray, lift_by_node: np.ndarray, node_idx: dict,
               lift_matched: float, note: str = LIFT_ESTIMAND_NOTE) -> dict:
    """The ground truth's `lift` block: expected CTR with vs without the policy (`itruth`'s p_click and
    p_click_counterfactual) over included post-policy impressions, per arm, and chat-targeted ones."""
    p1_all, p0_all = itruth["p_click"].to_numpy(), itruth["p_click_counterfactual"].to_numpy()

    def ratio(mask):
        if not mask.any():
            return {"abs": None, "rel": None, "ctr_treated": None, "ctr_counterfactual": None, "n_impressions": 0}
        p1, p0 = p1_all[mask], p0_all[mask]
        return {"abs": float(p1.mean() - p0.mean()), "rel": float(p1.mean() / p0.mean() - 1),
                "ctr_treated": float(p1.mean()), "ctr_counterfactual": float(p0.mean()), "n_impressions": int(mask.sum())}

    return {
        "estimand_note": note,
        "lift_matched_param": lift_matched,
        "included_post": ratio(inc_post),
        "treatment_arm": ratio(inc_post & (arm == "treatment")),
        "holdout_arm": ratio(inc_post & (arm == "holdout")),
        "chat_matched": ratio(itruth["chat_targeted"].to_numpy()),
        "by_category_matched_lift": {n: float(lift_by_node[i]) for n, i in node_idx.items()},
    }


def _ground_truth(cfg, catalog, users, conv, sens, blocked, p_pass, imp, itruth, scope_i, policy, lift_by_node, node_idx, region_i, arm_i,
                  n_outside: int = 0) -> dict:
    excl_user = users["region"].isin(cfg.excluded_regions).to_numpy()
    uidx = pd.Index(users["user_id"])
    conv_excl = excl_user[uidx.get_indexer(conv["user_id"])]
    post = (imp["shown_at"] >= policy).to_numpy()
    excl_i = np.isin(region_i, cfg.excluded_regions)

    leak = {}
    for j, c in enumerate(ART9):
        has = sens[:, j]
        row = {
            "filter_catch": cfg.filter_catch[c],
            "leak_rate_param": 1 - cfg.filter_catch[c],
            # expected pass probability over this world's conversations about c: the estimand
            "leak_rate": float(p_pass[has].mean()) if has.any() else None,
            "leak_rate_realized": float((~blocked[has]).mean()) if has.any() else None,
            "n_conversations": int(has.sum()),
            "n_passed": int((~blocked[has]).sum()),
            "by_region_group": {},
        }
        for g, mask in (("included", ~conv_excl), ("excluded", conv_excl)):
            m = has & mask
            row["by_region_group"][g] = {
                "leak_rate": float(p_pass[m].mean()) if m.any() else None,
                "leak_rate_realized": float((~blocked[m]).mean()) if m.any() else None,
                "n_conversations": int(m.sum()),
            }
        leak[c] = row

    inc_post = (~excl_i) & post
    ct = itruth["chat_targeted"].to_numpy()
    lift = lift_truth(itruth, inc_post, arm_i, lift_by_node, node_idx, cfg.lift_matched)
    kinds = {t["key"]: t["kind"] for t in catalog}
    src = itruth.loc[ct, "source_conversation_id"]
    src_topics = conv.set_index("conversation_id").loc[src, "topic"].to_numpy() if len(src) else np.array([])
    by_topic = pd.Series(src_topics).value_counts()
    violations = {
        "violation_regions": cfg.violation_regions,
        "chat_targeted_impressions_in_excluded_regions": int((ct & excl_i).sum()),
        "by_region": {r: int(v) for r, v in pd.Series(region_i[ct & excl_i]).value_counts().items()},
    }
    return {
        "world_version": 1,
        "config": dataclasses.asdict(cfg),
        "counts": {
            "users": int(len(users)),
            "users_excluded": int(excl_user.sum()),
            "conversations": int(len(conv)),
            "conversations_sensitive": int(sens.any(axis=1).sum()),
            "conversations_mixed": int(conv["topic_b"].notna().sum()),
            "impressions": int(len(imp)),
            "impressions_chat_targeted": int(ct.sum()),
            "impressions_outside_interest": int(n_outside),
            "clicks": int(imp["clicked"].sum()),
        },
        "topics": [
            {"key": t["key"], "kind": t["kind"], "category": t.get("category"), "iab_id": t.get("iab_id"), "label": t.get("label")}
            for t in catalog
        ],
        "leakage": leak,
        "chat_targeted_impressions_by_topic": {k: int(v) for k, v in by_topic.items()},
        "chat_targeted_impressions_sensitive": int(sum(v for k, v in by_topic.items() if kinds.get(k) == "sensitive")),
        "lift": lift,
        "violations": violations,
    }


def simulate_to(config_path: str | Path | None, out_dir: str | Path, overrides: dict | None = None) -> World:
    cfg = WorldConfig.from_yaml(config_path, overrides) if config_path else WorldConfig.from_dict(overrides)
    world = simulate(cfg)
    world.write(out_dir)
    return world
