"""Importers for chat exports: ShareGPT-style JSON (salvaging a truncated file) and the OpenAI ChatGPT export."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.contract.schemas import DataError
from analysis.ingest.readers import decode_utf8
from analysis.util.privacy import pseudonymize

# ----------------------------------------------------------------------------- importers


@dataclass
class ImportResult:
    """Contract tables built from a chat export, with what could not be salvaged."""

    messages: pd.DataFrame
    users: pd.DataFrame
    source: str
    n_records: int
    n_skipped: int = 0
    bytes_lost: int = 0
    truncated: bool = False
    problems: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # rows read but not turns (row, reason): quarantined, counted

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"source": [self.source], "conversations": [self.n_records], "skipped": [self.n_skipped],
                             "truncated": [self.truncated], "bytes_lost": [self.bytes_lost]})

    def to_markdown(self) -> str:
        s = f"{self.source}: {self.n_records} conversations imported, {self.n_skipped} skipped"
        if self.truncated:
            s += f"; file cut off: {self.bytes_lost} trailing bytes (one partial record) lost"
        return s


def iter_json_array(text: str, path: str | Path):
    """Yield (index, record, end_offset) from a top-level JSON array, stopping cleanly at a truncation."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DataError(path, "not a JSON array (no '[' found)")
    i += 1
    k = 0
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the rest is an incomplete record: the caller reports the bytes lost
        k += 1
        yield k, obj, end
        i = end


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bing": "assistant", "bard": "assistant"}


def chat_of(conversation_ids: pd.Series) -> pd.Series:
    """ShareGPT splits a long chat into parts `<id>_<k>`: the chat is the id before the last '_'."""
    s = conversation_ids.astype(str)
    return s.where(~s.str.contains(r"_\d+$"), s.str.rsplit("_", n=1).str[0])


def import_sharegpt(path: str | Path, *, region: str = "ZZ", max_records: int | None = None) -> ImportResult:
    """ShareGPT-style JSON ([{id, conversations: [{from, value}]}]); tolerant of a file cut off mid-way.

    ShareGPT splits long chats into parts `<id>_0`, `<id>_1`, ...: parts of one chat share a
    pseudonymous user. There are no timestamps (sent_at is missing) and no region (ZZ). Every turn
    read becomes a row, its role mapped (human -> user, gpt -> assistant) or kept as written, so
    that ingest's check quarantines and counts system turns, unknown roles and empty turns; records
    that are not conversations and a record cut off at the end are counted as dropped rows.
    """
    path = Path(path)
    text = decode_utf8(path)
    rows, problems, dropped = [], [], []
    n = skipped = 0
    last_end = text.find("[") + 1
    for k, rec, end in iter_json_array(text, path):
        last_end = end
        if max_records is not None and n >= max_records:
            break
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not rec.get("id"):
            skipped += 1
            problems.append({"row": k, "reason": "record without 'id' or 'conversations' list"})
            dropped.append({"row": len(rows) + len(dropped) + 1, "reason": f"record {k}: no 'id' or 'conversations' list"})
            continue
        cid = str(rec["id"])
        user = cid.rsplit("_", 1)[0]  # pseudonymized below, once per distinct user
        usable = 0
        for t_i, t in enumerate(turns):
            who = t.get("from") if isinstance(t, dict) else None
            value = t.get("value") if isinstance(t, dict) else None
            role = _SHAREGPT_ROLES.get(str(who).lower(), None if who is None else str(who))
            text_ = value if isinstance(value, str) else None
            rows.append((cid, user, t_i, role, text_))
            usable += role in ("user", "assistant") and bool(text_ and text_.strip())
        if not usable:
            skipped += 1
            problems.append({"row": k, "reason": "conversation with no usable turns"})
            continue
        n += 1
    tail = text[last_end:].strip().lstrip(",").strip()
    truncated = max_records is None and bool(tail) and tail != "]"
    bytes_lost = len(text[last_end:].encode()) if truncated else 0
    if truncated:
        dropped.append({"row": len(rows) + len(dropped) + 1, "reason": f"file cut off mid-record: the last record ({bytes_lost} bytes) is lost"})
    messages = pd.DataFrame(rows, columns=["conversation_id", "user_id", "turn_index", "role", "text"])
    messages["sent_at"] = pd.Series(pd.NaT, index=messages.index, dtype="datetime64[ns, UTC]")
    messages["modality"] = "text"
    messages["user_id"] = pseudonymize(messages["user_id"])
    users = pd.DataFrame({"user_id": messages["user_id"].dropna().unique(), "region": region})
    return ImportResult(
        messages, users, f"ShareGPT JSON {path}", n, skipped,
        bytes_lost=bytes_lost, truncated=truncated, problems=problems, dropped=dropped,
    )


def chatgpt_export_files(path: str | Path) -> list[Path]:
    """The JSON files of a ChatGPT export: the file itself, or in its folder `conversations.json`
    or the parts `conversations-000.json`, `conversations-001.json`, ... (larger exports)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "conversations.json").is_file():
        return [path / "conversations.json"]
    parts = sorted(path.glob("conversations-*.json"))
    if not parts:
        raise DataError(path, "no ChatGPT export here: expected conversations.json or conversations-NNN.json")
    return parts


def import_chatgpt_export(path: str | Path, *, user_id: str = "export_user", region: str = "ZZ") -> ImportResult:
    """The OpenAI ChatGPT data export (`conversations.json`, its folder, or its `conversations-NNN.json`
    parts): follow each message tree from `current_node` back to the root. Every visible message of
    the active branch that carries text is a row, its role as written (ingest's check quarantines and
    counts system messages); textless nodes, tool messages and hidden context (custom instructions)
    are structure, not turns."""
    files = chatgpt_export_files(path)
    data = []
    for f in files:
        text = decode_utf8(f)
        try:
            part = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if not isinstance(part, list):
            raise DataError(f, "expected a JSON list of conversations")
        data += part
    uid = pseudonymize(pd.Series([user_id])).iloc[0]
    rows, problems, dropped = [], [], []
    n = skipped = 0
    for k, conv in enumerate(data, start=1):
        mapping = conv.get("mapping") if isinstance(conv, dict) else None
        if not isinstance(mapping, dict):
            skipped += 1
            problems.append({"row": k, "reason": "conversation without a 'mapping' tree"})
            dropped.append({"row": len(rows) + len(dropped) + 1, "reason": f"record {k}: conversation without a 'mapping' tree"})
            continue
        cid = str(conv.get("conversation_id") or conv.get("id") or f"chatgpt_{k}")
        node = conv.get("current_node") or _deepest_leaf(mapping)
        chain, seen = [], set()
        while node and node in mapping and node not in seen:
            seen.add(node)
            chain.append(mapping[node])
            node = mapping[node].get("parent")
        t_i = usable = 0
        for item in reversed(chain):
            msg = item.get("message") or {}
            role = (msg.get("author") or {}).get("role")
            if role == "tool" or (msg.get("metadata") or {}).get("is_visually_hidden_from_conversation"):
                continue  # tool input/output and hidden context (custom instructions) are not turns
            content = msg.get("content") or {}
            text_parts, voice = [], content.get("content_type") == "audio_transcription"
            for p in content.get("parts") or []:
                if isinstance(p, str):
                    text_parts.append(p)
                elif isinstance(p, dict) and isinstance(p.get("text"), str):
                    text_parts.append(p["text"])
                    voice = voice or p.get("content_type") == "audio_transcription"
            body = "\n".join(x for x in text_parts if x.strip())
            if not body:
                continue
            ts = msg.get("create_time") or conv.get("create_time")
            sent = pd.Timestamp(ts, unit="s", tz="UTC") if isinstance(ts, (int, float)) else pd.NaT
            rows.append((cid, uid, t_i, role, body, sent, "voice" if voice else "text"))
            t_i += 1
            usable += role in ("user", "assistant")
        if not usable:
            skipped += 1
            problems.append({"row": k, "reason": "conversation with no user or assistant text"})
            continue
        n += 1
    messages = pd.DataFrame(rows, columns=["conversation_id", "user_id", "turn_index", "role", "text", "sent_at", "modality"])
    messages["sent_at"] = pd.to_datetime(messages["sent_at"], utc=True)
    users = pd.DataFrame({"user_id": [uid], "region": region})
    where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} parts)"
    return ImportResult(messages, users, f"ChatGPT export {where}", n, skipped, problems=problems, dropped=dropped)


def _deepest_leaf(mapping: dict) -> str | None:
    leaves = [k for k, v in mapping.items() if not v.get("children")]
    return leaves[-1] if leaves else None


def detect_json_format(path: str | Path) -> str:
    """'sharegpt' or 'chatgpt_export', from the first record of a JSON array (a folder: a ChatGPT export's)."""
    if Path(path).is_dir():
        chatgpt_export_files(path)
        return "chatgpt_export"
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(200_000)
    for _, rec, _ in iter_json_array(head, path):
        if isinstance(rec, dict) and "mapping" in rec:
            return "chatgpt_export"
        if isinstance(rec, dict) and "conversations" in rec:
            return "sharegpt"
        break
    if '"mapping"' in head:
        return "chatgpt_export"
    if '"conversations"' in head:
        return "sharegpt"
    raise DataError(path, "unrecognized JSON: expected a ShareGPT array ({id, conversations}) or a ChatGPT export ({mapping})")
