"""The corpus of broken and unusual inputs (tests/data/inputs/, written by its make_corpus.py): each
case loads with every row accounted for (read = kept + quarantined, every quarantined row with its
reason), or stops with an error naming the file, the column or row, and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.contract.schemas import DataError
from analysis.ingest.inputs import load_inputs

CORPUS = Path(__file__).resolve().parents[1] / "data" / "inputs"

# case -> {table: (read, kept, quarantined)} and the quarantine reasons that must appear
LOADS = {
    "clean": ({"messages": (48, 48, 0), "users": (8, 8, 0), "impressions": (48, 48, 0), "filter_decisions": (16, 16, 0), "labels": (8, 8, 0)}, []),
    "bom_crlf": ({"messages": (48, 48, 0), "impressions": (48, 48, 0), "labels": (8, 8, 0)}, []),
    "naive_offsets_case_nul_long": ({"messages": (48, 48, 0)}, []),
    "duplicates_orphans": ({"messages": (49, 48, 1), "impressions": (49, 48, 1)}, ["duplicate key", "user_id not in users table"]),
    "unknown_ad_category": ({"impressions": (48, 46, 2)}, ["not an IAB 3.0 id"]),
    "jsonl_some_garbage": ({"impressions": (52, 48, 4)}, ["invalid JSON"]),
    "labels_names": ({"labels": (10, 8, 2)}, ["not an IAB 3.0 tier-1 id or name", "expected a list of Art. 9 categories"]),
    "no_filter_no_labels": ({"messages": (48, 48, 0), "impressions": (48, 48, 0)}, []),
    "no_optional_columns": ({"messages": (48, 48, 0), "impressions": (48, 48, 0)}, []),
    "arm_all_empty": ({"impressions": (48, 48, 0)}, []),
    "hive_partitioned": ({"impressions": (48, 48, 0)}, []),
    "sharegpt_system_empty": ({"messages": (27, 24, 3)}, ["expected one of user, assistant", "empty message text"]),
    "sharegpt_truncated": ({"messages": (23, 22, 1)}, ["file cut off"]),
    "chatgpt_export/export": ({"messages": (12, 12, 0), "users": (1, 1, 0)}, []),
    "chatgpt_export/export/conversations.json": ({"messages": (12, 12, 0)}, []),
    "chatgpt_export_numbered": ({"messages": (12, 12, 0)}, []),
    # P1 (2 conversations), P2 (.zip, 3, one before consent), P3 (2 parts); P4 broken, P5 no export, P9 no participant
    "donations": ({"messages": (14, 12, 2), "users": (3, 3, 0), "participants": (5, 3, 2), "exports": (5, 3, 2)},
                  ["export could not be read", "export without a participants row", "no export found", "before the participant's consent date"]),
}

# case -> (file the error names, pattern of the rest of the message)
FAILS = {
    "jsonl_half_garbage": ("impressions.jsonl", r"50% of rows quarantined .*invalid JSON"),
    "semicolon_messages": ("messages.csv", r"looks ';'-delimited"),
    "epoch_timestamps": ("messages.csv", r"column 'sent_at'.*Unix epoch"),
    "latin1_messages": ("messages.csv", r"not UTF-8: invalid byte 0xe9 .*line 5"),
    "empty_impressions": ("impressions.csv", r"empty file"),
    "missing_column": ("users.csv", r"column 'region': missing required column"),
}


def test_every_case_of_the_corpus_is_tested():
    cases = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    assert cases == {c.split("/")[0] for c in (*LOADS, *FAILS)}


@pytest.mark.parametrize("case", sorted(LOADS))
def test_case_loads_and_every_row_is_accounted_for(case):
    expected, reasons = LOADS[case]
    inp = load_inputs(CORPUS / case)
    q = inp.quality_summary().set_index("table")
    for t, (read, kept, quarantined) in expected.items():
        assert (q.loc[t, "rows_read"], q.loc[t, "rows_kept"], q.loc[t, "rows_quarantined"]) == (read, kept, quarantined), t
    for t in q.index:  # every table, not just the expected ones: nothing goes missing
        assert q.loc[t, "rows_read"] == q.loc[t, "rows_kept"] + q.loc[t, "rows_quarantined"], t
        assert q.loc[t, "distinct_bad_rows"] == q.loc[t, "rows_quarantined"], t
    found = inp.quarantine["reason"].astype(str)
    for r in reasons:
        assert found.str.contains(r, regex=False).any(), (r, sorted(set(found)))
    assert inp.quarantine["file"].notna().all() and inp.quarantine["row"].notna().all()


@pytest.mark.parametrize("case", sorted(FAILS))
def test_case_fails_naming_file_and_reason(case):
    file, pattern = FAILS[case]
    with pytest.raises(DataError, match=pattern) as e:
        load_inputs(CORPUS / case)
    assert Path(e.value.file).name == file


def test_labels_as_people_write_them():
    inp = load_inputs(CORPUS / "labels_names")
    lab = inp.labels.set_index("conversation_id")
    assert lab["iab_tier1"].to_dict() == {"c01": "483", "c02": "210", "c03": "653", "c04": "286", "c05": "596", "c06": "453", "c07": "422", "c08": "391"}
    assert list(lab.loc["c04", "art9"]) == ["health", "religion"] and list(lab.loc["c01", "art9"]) == []
    q = inp.quarantine.set_index("row")
    assert (q.loc[9, "column"], q.loc[9, "value"]) == ("iab_tier1", "Nonsense Category")
    assert (q.loc[10, "column"], q.loc[10, "value"]) == ("art9", "astrology")


def test_donations_are_one_pseudonymous_user_per_export():
    inp = load_inputs(CORPUS / "donations")
    assert len(inp.users) == 3 and set(inp.users["region"]) == {"US", "DE", "BR"}
    assert not inp.users["user_id"].str.contains("P1|P2|P3").any()  # keyed pseudonyms, never the participant id
    per_user = inp.messages.groupby("user_id")["conversation_id"].nunique().sort_values().tolist()
    assert per_user == [2, 2, 2]  # P2's first conversation predates its consent date


def test_unusual_inputs_keep_their_values():
    m = load_inputs(CORPUS / "naive_offsets_case_nul_long").messages
    assert set(m["role"]) == {"user", "assistant"}
    assert m["text"].str.len().max() > 200_000
    first = m.sort_values(["conversation_id", "turn_index"]).iloc[:2]["sent_at"].dt.strftime("%H:%M:%S").tolist()
    assert first == ["08:00:00", "10:00:05"]  # +02:00 converted to UTC; naive read as UTC
    assert "modality" not in load_inputs(CORPUS / "no_optional_columns").messages
    assert "arm" not in load_inputs(CORPUS / "arm_all_empty").impressions  # empty everywhere = absent
    imp = load_inputs(CORPUS / "hive_partitioned").impressions
    assert set(imp["impression_id"]) == {f"i{i:03d}" for i in range(1, 49)}
