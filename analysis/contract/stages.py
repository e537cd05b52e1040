"""Stage ids: the names of the notebooks, of `metrics/<id>.json` and of everything keyed by stage."""

from __future__ import annotations

INGEST = "00_ingest"
TOPICS = "01_topics"
MAPPING = "02_ad_mapping"
LEAKAGE = "03_leakage"
LIFT = "04_engagement_lift"
SUMMARY = "05_summary"

STAGES = (INGEST, TOPICS, MAPPING, LEAKAGE, LIFT, SUMMARY)
TITLES = {
    INGEST: "ingest",
    TOPICS: "topics",
    MAPPING: "ad mapping and sensitive-topic detection",
    LEAKAGE: "leakage",
    LIFT: "engagement lift",
    SUMMARY: "summary",
}


def describe(stage: str) -> str:
    """'stage 02 (ad mapping and sensitive-topic detection)'."""
    return f"stage {stage[:2]} ({TITLES[stage]})"
