"""Stage 00's figure: conversations per period, by region group, with the policy date marked."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def plot_timeline(conversations: pd.DataFrame, policy_date: str | None = None, *, freq: str = "W"):
    """Conversations per week, included vs excluded regions, with the policy date marked."""
    c = conversations.dropna(subset=["started_at"])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    if len(c):
        grp = c.assign(group=c["excluded"].map({True: "excluded regions", False: "included regions"}))
        weekly = grp.set_index("started_at").groupby("group").resample(freq).size().unstack(0).fillna(0)
        weekly.plot(ax=ax)
    else:
        ax.text(0.5, 0.5, "no timestamps in this corpus", ha="center", va="center", transform=ax.transAxes)
    if policy_date:
        ax.axvline(pd.Timestamp(policy_date, tz="UTC"), color="k", ls="--", lw=1)
    ax.set_xlabel("")
    ax.set_ylabel("conversations per week")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig
