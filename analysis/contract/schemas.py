"""The input tables' contract: columns, kinds, keys, and the error that names file, row, column and reason."""

from __future__ import annotations

from dataclasses import dataclass

QUARANTINE_COLUMNS = ["table", "file", "row", "column", "reason", "value"]

class DataError(ValueError):
    """An input that cannot be used: names the file, row, column and reason."""

    def __init__(self, file, reason: str, *, row: int | None = None, column: str | None = None):
        self.file, self.row, self.column, self.reason = str(file), row, column, reason
        where = ", ".join(x for x in (f"row {row}" if row is not None else "", f"column {column!r}" if column else "") if x)
        super().__init__(f"{file}: {where + ': ' if where else ''}{reason}")


# ----------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # id | int | text | str | timestamp | bool | enum | region | unit_float | art9_list | str_list | iab_id | iab_tier1
    required: bool = True  # the column must be present
    nullable: bool = False
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


SCHEMAS = {
    "messages": Schema(
        "messages",
        (
            Column("conversation_id", "id"),
            Column("user_id", "id"),
            Column("turn_index", "int"),
            Column("role", "enum", values=("user", "assistant")),
            Column("text", "text"),
            Column("sent_at", "timestamp"),
            Column("modality", "enum", required=False, nullable=True, values=("text", "voice")),
        ),
        key=("conversation_id", "turn_index"),
    ),
    "users": Schema(
        "users",
        (
            Column("user_id", "id"),
            Column("region", "region"),
            Column("age_band", "str", required=False, nullable=True),
            Column("signup_date", "timestamp", required=False, nullable=True),
        ),
        key=("user_id",),
    ),
    "impressions": Schema(
        "impressions",
        (
            Column("impression_id", "id"),
            Column("user_id", "id"),
            Column("shown_at", "timestamp"),
            Column("ad_category", "iab_id"),
            Column("clicked", "bool"),
            Column("placement", "str", required=False, nullable=True),
            Column("targeting_sources", "str_list", required=False, nullable=True),
            Column("arm", "enum", required=False, nullable=True, values=("treatment", "holdout")),
        ),
        key=("impression_id",),
    ),
    "filter_decisions": Schema(
        "filter_decisions",
        (Column("conversation_id", "id"), Column("blocked", "bool"), Column("score", "unit_float", required=False, nullable=True)),
        key=("conversation_id",),
    ),
    "labels": Schema(
        "labels",
        (Column("conversation_id", "id"), Column("art9", "art9_list"), Column("iab_tier1", "iab_tier1", required=False, nullable=True)),
        key=("conversation_id",),
    ),
    # data donations: one row per participant's export (analysis.ingest.donations)
    "participants": Schema(
        "participants",
        (Column("participant_id", "id"), Column("region", "region"), Column("consent_date", "timestamp", required=False, nullable=True)),
        key=("participant_id",),
    ),
}
REQUIRED_TABLES = ("messages", "users")
# without impressions the leakage and lift stages say why they cannot estimate (docs/data-contract.md)
OPTIONAL_TABLES = ("impressions", "filter_decisions", "labels")
