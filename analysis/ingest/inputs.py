"""Find, read, check and cross-check an audit's input tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.schemas import (
    OPTIONAL_TABLES,
    QUARANTINE_COLUMNS,
    REQUIRED_TABLES,
    SCHEMAS,
    DataError,
)
from analysis.ingest.check import Checked, check_table, quarantine_rows
from analysis.ingest.donations import import_donations, participants_file
from analysis.ingest.importers import (
    ImportResult,
    detect_json_format,
    import_chatgpt_export,
    import_sharegpt,
)
from analysis.ingest.readers import read_table

# ------------------------------------------------------------------------------- the inputs


@dataclass
class Inputs:
    """Checked input tables of one audit, the quarantine and where each came from."""

    messages: pd.DataFrame
    users: pd.DataFrame
    impressions: pd.DataFrame | None
    filter_decisions: pd.DataFrame | None
    labels: pd.DataFrame | None
    quarantine: pd.DataFrame
    sources: dict[str, str]
    n_read: dict[str, int]
    imports: list[ImportResult] = field(default_factory=list)
    n_kept: dict[str, int] = field(default_factory=dict)  # tables that are not attributes (donations: participants, exports)

    def quality_summary(self) -> pd.DataFrame:
        """Rows read, kept and quarantined per table."""
        out = []
        for t, n in self.n_read.items():
            q = int((self.quarantine["table"] == t).sum()) if len(self.quarantine) else 0
            q_rows = len(self.quarantine.loc[self.quarantine["table"] == t, ["file", "row"]].drop_duplicates()) if len(self.quarantine) else 0
            kept = self.n_kept[t] if t in self.n_kept else (len(getattr(self, t)) if getattr(self, t) is not None else 0)
            out.append({"table": t, "file": self.sources.get(t), "rows_read": n, "rows_kept": kept, "rows_quarantined": n - kept, "problems": q, "distinct_bad_rows": q_rows})
        return pd.DataFrame(out)

    def quarantine_reasons(self) -> pd.DataFrame:
        if not len(self.quarantine):
            return pd.DataFrame(columns=["table", "column", "reason", "rows"])
        r = self.quarantine.assign(reason=self.quarantine["reason"].str.replace(r", first seen at row \d+", "", regex=True))
        return r.groupby(["table", "column", "reason"], dropna=False).size().rename("rows").reset_index().sort_values("rows", ascending=False)


def find_input(input_dir: Path, table: str) -> Path | None:
    for name in (f"{table}.parquet", f"{table}.csv", f"{table}.jsonl", f"{table}.ndjson", table):
        p = input_dir / name
        if p.exists():
            return p
    if table == "messages":
        for name in ("conversations.json", "sharegpt.json", "messages.json"):
            if (input_dir / name).exists():
                return input_dir / name
        if any(input_dir.glob("conversations-*.json")):  # a larger ChatGPT export, in parts
            return input_dir
    return None


def _no_messages(input_dir: Path | None) -> DataError:
    """The error for a folder without a messages table, naming what the folder looks like."""
    if input_dir is not None and input_dir.is_dir():
        subs = [p for p in input_dir.iterdir() if p.is_dir() and ((p / "conversations.json").exists() or any(p.glob("conversations-*.json")))]
        if subs:
            return DataError(input_dir, f"holds {len(subs)} ChatGPT export folder(s) ({subs[0].name}, ...) but no messages table: "
                             "point input_dir at one export, or add participants.csv (participant_id, region) to import them as data donations")
    return DataError(input_dir or "<no input_dir>", "no messages table found (messages.parquet/.csv/.jsonl, a ShareGPT JSON, "
                     "a ChatGPT export's conversations.json or its folder, or a donations folder with participants.csv)")


def load_inputs(
    input_dir: str | Path | None = None,
    *,
    paths: dict[str, str | Path] | None = None,
    max_quarantine_share: float = 0.2,
    require: tuple[str, ...] = REQUIRED_TABLES,
) -> Inputs:
    """Find, read, check and cross-check the audit's input tables.

    `input_dir` is a folder of tables, a chat export (a ShareGPT / ChatGPT JSON file or an export's
    folder) or a donations folder (`participants.csv` beside many exports); `paths` overrides the
    file of any table. Every row read is kept or quarantined with its reason (rows that never became
    a row, such as unparsable JSON lines or records cut off, included). Raises DataError if a required
    table is missing or unusable, or if a table loses more than `max_quarantine_share` of its rows.
    """
    input_dir = Path(input_dir) if input_dir else None
    if input_dir is not None and input_dir.is_file():  # a chat export or a messages file named directly
        paths, input_dir = {"messages": input_dir, **(paths or {})}, None
    found: dict[str, Path] = {}
    for t in REQUIRED_TABLES + OPTIONAL_TABLES:
        p = Path(paths[t]) if paths and t in paths else (find_input(input_dir, t) if input_dir else None)
        if p is not None:
            found[t] = p
    imports: list[ImportResult] = []
    checked: dict[str, Checked] = {}
    extra_q: list[pd.DataFrame] = []
    extra_read: dict[str, int] = {}
    n_kept: dict[str, int] = {}
    pfile = participants_file(input_dir) if input_dir is not None and "messages" not in found else None
    if pfile is not None:  # data donations: many exports, one pseudonymous user each
        don = import_donations(input_dir)
        imports += don.imports
        extra_q.append(don.quarantine[don.quarantine["table"] != "messages"])
        extra_read.update(don.n_read)
        n_kept.update(don.n_kept)
        mdf = don.messages.assign(_row=np.arange(1, len(don.messages) + 1))
        mdf.attrs["bad_lines"] = [{"row": len(mdf) + i + 1, "reason": f"{r.file}: {r.reason}"}
                                  for i, r in enumerate(don.quarantine[don.quarantine["table"] == "messages"].itertuples())]
        checked["messages"] = check_table("messages", mdf, input_dir, allow_missing_time=True)
        if "users" not in found:
            checked["users"] = check_table("users", don.users.assign(_row=np.arange(1, len(don.users) + 1)), pfile)
        found["messages"] = input_dir
    if "messages" not in found:
        raise _no_messages(input_dir)
    msg_path = found["messages"]
    if "messages" not in checked and (msg_path.suffix.lower() == ".json" or (msg_path.is_dir() and find_input(msg_path, "messages") == msg_path)):
        fmt = detect_json_format(msg_path)
        imp = import_sharegpt(msg_path) if fmt == "sharegpt" else import_chatgpt_export(msg_path)
        imports.append(imp)
        allow_missing_time = imp.messages["sent_at"].isna().any()
        mdf = imp.messages.assign(_row=np.arange(1, len(imp.messages) + 1))
        mdf.attrs["bad_lines"] = imp.dropped
        checked["messages"] = check_table("messages", mdf, msg_path, allow_missing_time=allow_missing_time)
        if "users" not in found:
            checked["users"] = check_table("users", imp.users.assign(_row=np.arange(1, len(imp.users) + 1)), f"{msg_path} (users)")
    for t in REQUIRED_TABLES + OPTIONAL_TABLES:
        if t in checked:
            continue
        if t not in found:
            if t in require:
                raise DataError(input_dir or "<no input_dir>", f"required table {t!r} not found ({t}.parquet, .csv or .jsonl)")
            continue
        checked[t] = check_table(t, read_table(found[t]), found[t])

    qs = [v.quarantine for v in checked.values()] + extra_q
    tables = {t: v.data for t, v in checked.items()}
    # cross-table checks: every reference must resolve
    users = tables["users"]
    known_users = set(users["user_id"])
    msgs = tables["messages"]
    orphan = ~msgs["user_id"].isin(known_users)
    if orphan.any():
        qs.append(quarantine_rows("messages", checked["messages"].file, msgs.loc[orphan, "_row"], "user_id", "user_id not in users table", msgs.loc[orphan, "user_id"].tolist()))
        msgs = msgs[~orphan]
    n_owner = msgs.groupby("conversation_id")["user_id"].transform("nunique")
    if (n_owner > 1).any():
        bad = n_owner > 1
        qs.append(quarantine_rows("messages", checked["messages"].file, msgs.loc[bad, "_row"], "user_id", "conversation has turns from more than one user_id", msgs.loc[bad, "conversation_id"].tolist()))
        msgs = msgs[~bad]
    tables["messages"] = msgs
    conv_ids = set(msgs["conversation_id"])
    if "impressions" in tables:
        imp = tables["impressions"]
        orphan = ~imp["user_id"].isin(known_users)
        if orphan.any():
            qs.append(quarantine_rows("impressions", checked["impressions"].file, imp.loc[orphan, "_row"], "user_id", "user_id not in users table", imp.loc[orphan, "user_id"].tolist()))
            tables["impressions"] = imp[~orphan]
    for t in ("filter_decisions", "labels"):  # tables keyed by conversation
        if t in tables:
            d = tables[t]
            orphan = ~d["conversation_id"].isin(conv_ids)
            if orphan.any():
                qs.append(quarantine_rows(t, checked[t].file, d.loc[orphan, "_row"], "conversation_id", "conversation_id not in messages", d.loc[orphan, "conversation_id"].tolist()))
                tables[t] = d[~orphan]
    quarantine = pd.concat([q for q in qs if len(q)], ignore_index=True) if any(len(q) for q in qs) else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    n_read = {t: v.n_read for t, v in checked.items()} | extra_read
    for t, df in tables.items():
        lost = 1 - len(df) / n_read[t]
        if lost > max_quarantine_share:
            top = quarantine[quarantine["table"] == t]["reason"].value_counts().head(3)
            raise DataError(
                checked[t].file,
                f"{lost:.0%} of rows quarantined (limit {max_quarantine_share:.0%}); top reasons: "
                + "; ".join(f"{r} ({c})" for r, c in top.items()),
            )
    for t, df in tables.items():  # an optional column empty everywhere is an absent column: what it turns on stays off
        empty = [c.name for c in SCHEMAS[t].columns if not c.required and c.name in df and df[c.name].isna().all()]
        tables[t] = df.drop(columns=empty)
    return Inputs(
        messages=tables["messages"].drop(columns="_row").reset_index(drop=True),
        users=tables["users"].drop(columns="_row").reset_index(drop=True),
        impressions=tables["impressions"].drop(columns="_row").reset_index(drop=True) if "impressions" in tables else None,
        filter_decisions=tables["filter_decisions"].drop(columns="_row").reset_index(drop=True) if "filter_decisions" in tables else None,
        labels=tables["labels"].drop(columns="_row").reset_index(drop=True) if "labels" in tables else None,
        quarantine=quarantine,
        sources={t: str(p) for t, p in found.items()},
        n_read=n_read,
        imports=imports,
        n_kept=n_kept,
    )
