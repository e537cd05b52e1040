"""What the topic stage produced: tables, model, and the stakeholder views and figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import dendrogram, linkage

from analysis.contract.settings import TopicSettings
from analysis.topics.documents import Documents
from analysis.topics.model import TopicModel
from analysis.util.privacy import suppress_small_cells

# ------------------------------------------------------------------------------- result


@dataclass
class TopicsResult:
    """What the topic stage produced."""
    assignments: pd.DataFrame  # conversation_id, topic, topic_label, probability, similarity, assigned_by
    topic_info: pd.DataFrame  # topic, label, keywords, representation, size, share, npmi, representative_ids
    quality: pd.DataFrame  # tidy: metric, estimate, n, group
    model: TopicModel
    documents: Documents
    conversations: pd.DataFrame  # conversation_id, user_id, region, excluded, started_at (no text)
    timings: dict[str, float]
    settings: TopicSettings
    embed_stats: dict
    artifacts: dict[str, str] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """The headline numbers, one row each."""
        q = self.quality[self.quality["group"].map(lambda g: not ({"step", "removed"} & set(g)) or g.get("step") == "total")]
        return pd.DataFrame(
            {
                "metric": q["metric"].to_numpy(),
                "group": q["group"].map(lambda g: ", ".join(f"{k}={v}" for k, v in g.items())).to_numpy(),
                # counts as "1,600", rates to 3 decimals: long digit runs read like phone numbers to the report scan
                "estimate": [_fmt(v) for v in q["estimate"]],
                "n": pd.array([None if pd.isna(v) else int(v) for v in q["n"]], dtype="Int64"),
            }
        )

    def to_frame(self) -> pd.DataFrame:
        return self.assignments

    def topic_table(self, k: int = 10) -> pd.DataFrame:
        """Topics for stakeholders: label, keywords, size and share; sizes below k suppressed."""
        t = self.topic_info[["topic", "label", "keywords", "size", "share", "npmi"]].copy()
        t["keywords"] = t["keywords"].map(lambda ws: ", ".join(ws[:8]))
        t["npmi"] = t["npmi"].round(3)
        small = t["size"] < k
        t["share"] = t["share"].round(4).astype(object).where(~small, f"<{k}")
        return suppress_small_cells(t, ["size"], k=k)

    def over_time(self, freq: str = "W") -> pd.DataFrame:
        """Conversations per period and topic, and the topic's share of the period."""
        a = self.assignments.merge(self.conversations[["conversation_id", "started_at"]], on="conversation_id")
        a = a.dropna(subset=["started_at"])
        if not len(a):
            return pd.DataFrame(columns=["period", "topic", "topic_label", "conversations", "share"])
        period = a["started_at"].dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period(freq).dt.start_time
        g = a.assign(period=period).groupby(["period", "topic", "topic_label"]).size().rename("conversations").reset_index()
        g["share"] = g["conversations"] / g.groupby("period")["conversations"].transform("sum")
        return g

    def by_region(self, k: int = 10) -> pd.DataFrame:
        """Conversations and users per region and topic with the topic's share of the region;
        rows describing fewer than k users are suppressed (counts and share missing, `suppressed`)."""
        a = self.assignments.merge(self.conversations[["conversation_id", "user_id", "region", "excluded"]], on="conversation_id")
        g = (
            a.groupby(["region", "excluded", "topic", "topic_label"], dropna=False)
            .agg(conversations=("conversation_id", "size"), users=("user_id", "nunique"))
            .reset_index()
        )
        g["share"] = g["conversations"] / g.groupby("region")["conversations"].transform("sum")
        g["suppressed"] = g["users"] < k
        for c in ("conversations", "users"):
            g[c] = g[c].astype("Int64").mask(g["suppressed"])
        g["share"] = g["share"].mask(g["suppressed"])
        return g

    def by_region_group(self) -> pd.DataFrame:
        """Topic shares in included vs excluded regions (the policy's two populations)."""
        a = self.assignments.merge(self.conversations[["conversation_id", "excluded"]], on="conversation_id")
        a["region_group"] = np.where(a["excluded"].fillna(False).astype(bool), "excluded", "included")
        g = a.groupby(["region_group", "topic", "topic_label"]).size().rename("conversations").reset_index()
        g["share"] = g["conversations"] / g.groupby("region_group")["conversations"].transform("sum")
        return g

    # ---- figures
    def fig_sizes(self, top: int = 30):
        import matplotlib.pyplot as plt

        t = self.topic_info[self.topic_info["topic"] != -1].sort_values("size", ascending=False).head(top)
        fig, ax = plt.subplots(figsize=(8, max(3, 0.26 * len(t) + 1)))
        ax.barh([f"{r.topic}: {r.label}" for r in t.itertuples()][::-1], t["share"].to_numpy()[::-1])
        ax.set_xlabel("share of conversations")
        out = self.topic_info.loc[self.topic_info["topic"] == -1, "share"]
        ax.set_title(f"Topic sizes (top {len(t)}; outliers {float(out.iloc[0]) if len(out) else 0:.1%})", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_over_time(self, top: int = 8, freq: str = "W", policy_date: str | None = None):
        import matplotlib.pyplot as plt

        ot = self.over_time(freq)
        fig, ax = plt.subplots(figsize=(9, 3.6))
        if not len(ot):
            ax.text(0.5, 0.5, "no timestamps in this corpus", ha="center", va="center", transform=ax.transAxes)
            return fig
        keep = self.topic_info[self.topic_info["topic"] != -1].nlargest(top, "size")["topic"]
        wide = ot[ot["topic"].isin(keep)].pivot_table(index="period", columns="topic_label", values="share", fill_value=0)
        wide.plot(ax=ax, lw=1.3)
        if policy_date:
            ax.axvline(pd.Timestamp(policy_date), color="k", ls="--", lw=1)
        ax.set_ylabel("share of the week's conversations")
        ax.set_xlabel("")
        ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        return fig

    def fig_intertopic(self, annotate: int = 15):
        """Intertopic distance map: topic centroids placed by metric MDS of their cosine distances
        (seeded), circle area = topic size; the largest topics are labeled."""
        import matplotlib.pyplot as plt
        from sklearn.manifold import MDS

        ids, cent = self.model.topic_ids, self.model.centroids()
        d = np.clip(1 - cent @ cent.T, 0, 2)
        np.fill_diagonal(d, 0)
        xy = MDS(n_components=2, metric="precomputed", random_state=self.settings.topic_seed, n_init=1, init="classical_mds").fit_transform(d) if len(ids) > 2 else np.zeros((len(ids), 2))
        info = self.topic_info.set_index("topic")
        size = info["size"].reindex(ids).fillna(0).to_numpy()
        fig, ax = plt.subplots(figsize=(8, 6.5))
        ax.scatter(xy[:, 0], xy[:, 1], s=20 + 1200 * size / max(size.max(), 1), alpha=0.45, edgecolor="k", lw=0.5)
        for i in np.argsort(-size)[:annotate]:
            ax.annotate(f"{ids[i]}: {info.loc[ids[i], 'label']}", xy[i], fontsize=6.5, ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("Intertopic distance map (closer = more similar; area = size)", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_hierarchy(self):
        """Topic hierarchy: average-linkage clustering of the topic centroids (cosine distance)."""
        import matplotlib.pyplot as plt

        ids, cent = self.model.topic_ids, self.model.centroids()
        info = self.topic_info.set_index("topic")
        fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(ids) + 1)))
        if len(ids) > 1:
            z = linkage(cent.astype(np.float64), method="average", metric="cosine")
            dendrogram(z, labels=[f"{t}: {info.loc[t, 'label']}" for t in ids], orientation="left", ax=ax, leaf_font_size=6.5, color_threshold=0.7 * z[:, 2].max())
        ax.set_xlabel("cosine distance at which topics merge")
        ax.set_title("Topic hierarchy", fontsize=10)
        fig.tight_layout()
        return fig

    def fig_intertopic_interactive(self):
        """BERTopic's plotly intertopic map (for JupyterLab; plotly.js is large in HTML reports)."""
        return self.model.bertopic.visualize_topics(custom_labels=True)

    def fig_hierarchy_interactive(self):
        return self.model.bertopic.visualize_hierarchy(custom_labels=True, use_ctfidf=False)

    def fig_barchart(self, top: int = 12):
        return self.model.bertopic.visualize_barchart(top_n_topics=top, custom_labels=True)

def _fmt(v) -> str:
    if v is None or pd.isna(v):
        return ""
    v = float(v)
    if v.is_integer():
        return f"{int(v):,}"
    return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
