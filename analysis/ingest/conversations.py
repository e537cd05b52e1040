"""One row per conversation: the user-side document, its opening, owner, region and times."""

from __future__ import annotations

import pandas as pd

from analysis.util.privacy import scrub_pii
from analysis.util.regions import DEFAULT_EXCLUDED, is_excluded

# --------------------------------------------------------------------------- conversations


def build_conversations(
    messages: pd.DataFrame,
    users: pd.DataFrame,
    *,
    excluded_regions=DEFAULT_EXCLUDED,
    policy_date: str | None = None,
) -> pd.DataFrame:
    """One row per conversation: the user-side document (user turns, one per line), its opening
    (the first user turn: what the conversation asks), the assistant's first reply (what it turned
    out to be about: stage 02's categorizer reads it; empty without one), owner, region, excluded
    flag, times, turns."""
    m = messages.sort_values(["conversation_id", "turn_index"])
    user_side = m[m["role"] == "user"]
    docs = user_side.groupby("conversation_id", sort=False)["text"].agg("\n".join)
    openings = user_side.groupby("conversation_id", sort=False)["text"].first()
    replies = m[m["role"] == "assistant"].groupby("conversation_id", sort=False)["text"].first()
    g = m.groupby("conversation_id", sort=False)
    conv = pd.DataFrame(
        {
            "user_id": g["user_id"].first(),
            "started_at": g["sent_at"].min(),
            "ended_at": g["sent_at"].max(),
            "n_turns": g.size(),
            "n_user_turns": user_side.groupby("conversation_id").size(),
            # modality is optional: without it, whether a conversation was spoken is unknown (NA), not "no"
            "voice": _voice(m),
        }
    )
    conv["n_user_turns"] = conv["n_user_turns"].fillna(0).astype("int64")
    conv["document"] = docs.reindex(conv.index).fillna("")
    conv["opening"] = openings.reindex(conv.index).fillna("")
    conv["first_reply"] = replies.reindex(conv.index).fillna("")
    conv = conv.reset_index().merge(users[["user_id", "region"]], on="user_id", how="left")
    conv["excluded"] = is_excluded(conv["region"], excluded_regions)
    if policy_date is not None:
        conv["after_policy"] = conv["started_at"] >= pd.Timestamp(policy_date, tz="UTC")
    conv["document_display"] = conv["document"].map(scrub_pii)
    cols = ["conversation_id", "user_id", "region", "excluded", "started_at", "ended_at", "n_turns", "n_user_turns", "voice"]
    cols += ["after_policy"] if policy_date is not None else []
    return conv[cols + ["document", "opening", "first_reply", "document_display"]]


def _voice(m: pd.DataFrame) -> pd.Series:
    """Was the conversation spoken? NA where the modality is unknown (modality is optional), never a silent "no"."""
    mod = m["modality"] if "modality" in m else pd.Series(pd.NA, index=m.index, dtype="string")
    g = m["conversation_id"]
    return (mod == "voice").fillna(False).groupby(g, sort=False).any().astype("boolean").where(mod.notna().groupby(g, sort=False).any(), pd.NA)
