"""What the ad-mapping stage produced: mappings, detection, validation, and their stakeholder views."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9
from analysis.mapping.mapper import TopicMapping
from analysis.mapping.overrides import UNMAPPED
from analysis.util.privacy import scrub_pii, suppress_counts_and_rates, suppress_small_cells, suppress_small_table

# ------------------------------------------------------------------------------- the stage


@dataclass
class AdMappingResult:
    """What stage 02 produced."""
    topic_categories: pd.DataFrame
    conversation_categories: pd.DataFrame
    mapping: TopicMapping
    detection: object  # analysis.sensitive.Detection
    validation: object | None  # analysis.sensitive.Validation on the held-out labeled conversations
    params_source: str
    tier1_accuracy: dict | None
    conversations: pd.DataFrame
    artifacts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    min_cell_users: int = 10
    conversation_tier1_accuracy: dict | None = None  # the per-conversation categorizer against tier-1 labels
    tier1_confusion: pd.DataFrame | None = None  # per labeled tier-1: labeled, correct, recall, precision
    tier1_confusion_table: pd.DataFrame | None = None  # label x categorized tier-1 (names)
    categorizer_source: str = ""
    conversation_overrides_applied: list = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        c = self.conversation_categories
        rows = [
            ("topics", len(self.topic_categories)),
            ("topics mapped by similarity", int((self.topic_categories["source"] == "similarity").sum())),
            ("topics overridden", int((self.topic_categories["source"] == "override").sum())),
            ("topics unmapped", int((self.topic_categories["source"] == UNMAPPED).sum())),
            ("conversations", len(c)),
            ("conversations with an IAB category", int(c["iab_id"].notna().sum())),
            ("conversations flagged sensitive", int(c["any_sensitive"].sum())),
            ("detector parameters", self.params_source),
        ]
        return pd.DataFrame(rows, columns=["item", "value"])

    def to_frame(self) -> pd.DataFrame:
        return self.conversation_categories.copy()

    def topic_table(self) -> pd.DataFrame:
        """Topic -> category with sizes; topics of fewer than k conversations show "<k"."""
        t = self.topic_categories.copy()
        size = self.conversation_categories.groupby("topic").size()
        users = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id"]], on="conversation_id").groupby("topic")["user_id"].nunique()
        t["conversations"] = t["topic"].map(size).fillna(0).astype(int)
        t["users"] = t["topic"].map(users).fillna(0).astype(int)
        t["topic_label"] = t["topic_label"].astype(str).map(scrub_pii)
        for c in ("readable_label", "readable_name"):
            if c in t:
                t[c] = t[c].astype(str).map(scrub_pii)
        t["top3"] = t["top3"].map(lambda x: "; ".join(x) if isinstance(x, (list, np.ndarray)) else x)
        cols = ["topic", "topic_label", "readable_label", "conversations", "users", "category_mix", "iab_id", "path", "score", "source", "art9_node", "sensitive_share",
                "top3"]
        t = t.sort_values("conversations", ascending=False)[[c for c in cols if c in t]]
        return suppress_small_cells(t, ["conversations", "users"], k=self.min_cell_users, by="users")

    def tier1_shares(self, level: str = "conversation") -> pd.DataFrame:
        """Share of conversations by IAB tier-1 category, small cells suppressed: each conversation's own
        category (`level="conversation"`, "none" included) or its topic's (`"topic"`, unmapped included)."""
        c = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id"]], on="conversation_id")
        if level == "conversation" and "conv_tier1_label" in c:
            c = c.assign(tier1=c["conv_tier1_label"].fillna("none"))
        else:
            c = c.assign(tier1=c["tier1_label"].fillna("(unmapped)"))
        g = c.groupby("tier1").agg(conversations=("conversation_id", "size"), users=("user_id", "nunique")).reset_index()
        g["share"] = g["conversations"] / max(len(c), 1)
        g = g.sort_values("conversations", ascending=False)
        return suppress_small_cells(g, ["conversations", "users"], k=self.min_cell_users, by="users")

    def topic_tier1_mix(self, top: int = 8) -> pd.DataFrame:
        """Topic x tier-1: the share of each topic's conversations per own (per-conversation) tier-1,
        for the `top` most frequent tier-1s overall, the rest as `other` and `none`; largest topics
        first, with their readable labels. Privacy: a topic of fewer than k users shows no shares,
        and a share resting on fewer than k conversations is blank (NaN)."""
        c = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id"]], on="conversation_id")
        if "conv_tier1_label" not in c:
            return pd.DataFrame()
        t1 = c["conv_tier1_label"].fillna("none")
        keep = [v for v in t1[t1 != "none"].value_counts().index[:top]]
        c = c.assign(tier1=np.where(t1.isin(keep) | (t1 == "none"), t1, "other"), topic=c["topic"].astype(str))
        counts = pd.crosstab(c["topic"], c["tier1"]).reindex(columns=[*keep, "other", "none"], fill_value=0)
        size = counts.sum(axis=1)
        users = c.groupby("topic")["user_id"].nunique().reindex(counts.index)
        k = self.min_cell_users
        shares = counts.div(size, axis=0).where(counts >= k).where(users >= k, axis=0).round(3)
        labels = self.topic_categories.assign(topic=self.topic_categories["topic"].astype(str)).set_index("topic")
        lab = labels["readable_label"].astype(str).map(scrub_pii) if "readable_label" in labels else labels["topic_label"].astype(str)
        out = pd.DataFrame({"topic": counts.index, "readable_label": lab.reindex(counts.index).to_numpy(), "conversations": size.to_numpy(),
                            "users": users.to_numpy()}).reset_index(drop=True)
        out = pd.concat([out, shares.reset_index(drop=True)], axis=1).sort_values("conversations", ascending=False)
        return suppress_small_cells(out, ["conversations", "users"], k=k, by="users").reset_index(drop=True)

    def prevalence_by_region(self) -> pd.DataFrame:
        """Flagged share per category and region (cells of fewer than k users suppressed)."""
        c = self.conversation_categories.merge(self.conversations[["conversation_id", "user_id", "region", "excluded"]], on="conversation_id")
        rows = []
        for (region, excl), g in c.groupby(["region", "excluded"], dropna=False):
            row = {"region": region, "excluded": bool(excl), "users": g["user_id"].nunique(), "conversations": len(g)}
            for cat in ART9:
                row[cat] = int(g[f"flag_{cat}"].sum())
            rows.append(row)
        out = pd.DataFrame(rows).sort_values(["excluded", "conversations"], ascending=[True, False])
        shares = out.copy()
        for cat in ART9:
            shares[f"{cat}_share"] = out[cat] / out["conversations"].where(out["conversations"] > 0)
        sup = suppress_small_cells(shares, ["users", "conversations", *ART9], k=self.min_cell_users, by="users")
        for cat in ART9:
            sup[f"{cat}_share"] = sup[f"{cat}_share"].where(shares["users"] >= self.min_cell_users)
        return sup

    def tier1_validation_tables(self) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        """The categorizer against tier-1 labels, as published: per labeled tier-1 (counts of fewer than
        k conversations as "<k", a rate blank where a count it rests on is) and the label x categorized
        table (small cells suppressed along rows and columns). None without labels."""
        if self.tier1_confusion is None:
            return None
        k = self.min_cell_users
        per = self.tier1_confusion.copy()
        per["most_confused_with"] = per["most_confused_with"].astype(str).str.replace(
            r"\((\d+)\)$", lambda m: f"({m.group(1)})" if int(m.group(1)) >= k else f"(<{k})", regex=True)
        per = suppress_counts_and_rates(per, ["labeled", "categorized_as", "correct"],
                                        {"recall": ("labeled", "correct"), "precision": ("categorized_as", "correct")}, k=k)
        return per, suppress_small_table(self.tier1_confusion_table, k=k)

    def detector_validation_tables(self) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        """The detector against labels, as published: per category counts and rates with CIs (counts of
        fewer than k conversations as "<k", rates resting on them blank) and the label x flag table
        (small cells suppressed). None without labels."""
        if self.validation is None:
            return None
        cols = ["category", "positives", "flagged", "tp", "fp", "fn", "precision", "precision_low", "precision_high",
                "recall", "recall_low", "recall_high", "specificity", "f1", "f1_low", "f1_high"]
        v = self.validation.to_frame()
        per = suppress_counts_and_rates(v[[c for c in cols if c in v]], ["positives", "flagged", "tp", "fp", "fn"],
                                        {"precision": ("tp", "flagged"), "recall": ("tp", "positives"), "f1": ("tp", "fp", "fn"), "specificity": ("fp",)},
                                        k=self.min_cell_users)
        return per, suppress_small_table(self.validation.confusion, k=self.min_cell_users)

    def fig_tier1(self, top: int = 15):
        import matplotlib.pyplot as plt

        t = self.tier1_shares()
        t = t[pd.to_numeric(t["conversations"], errors="coerce").notna()].head(top)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(t) + 1))
        ax.barh(t["tier1"][::-1], t["share"][::-1])
        ax.set_xlabel("share of conversations")
        fig.tight_layout()
        return fig

    def fig_prevalence(self):
        import matplotlib.pyplot as plt

        p = self.detection.prevalence()
        p = p[p["category"] != "any"]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(p["category"][::-1], p["share"][::-1])
        ax.set_xlabel("share of conversations flagged")
        fig.tight_layout()
        return fig

    def fig_validation(self):
        import matplotlib.pyplot as plt

        v = self.detector_validation_tables()[0]
        v = v[v["category"].isin(self.validation.per_category["category"]) & v["precision"].notna() & v["recall"].notna()]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        y = np.arange(len(v))
        for off, m, col in ((-0.15, "precision", "C0"), (0.15, "recall", "C1")):
            est = v[m].to_numpy(dtype=float)
            lo = np.clip(np.nan_to_num(est - v[f"{m}_low"].to_numpy(dtype=float)), 0, None)
            hi = np.clip(np.nan_to_num(v[f"{m}_high"].to_numpy(dtype=float) - est), 0, None)
            ax.errorbar(est, y + off, xerr=[lo, hi], fmt="o", color=col, label=m, capsize=3)
        ax.set_yticks(y, v["category"])
        ax.axvline(0.9, color="k", ls=":", lw=1)
        ax.set_xlim(0, 1.02)
        ax.legend(frameon=False, loc="lower left")
        ax.set_xlabel("estimate with 95% CI (held-out labeled conversations)")
        fig.tight_layout()
        return fig
