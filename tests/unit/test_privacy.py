"""What is published: no PII, no small cells (not even through totals), no raw ids or transcripts."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.pipeline import PROJECT_ROOT
from analysis.util.privacy import pseudonymize, scan_report, scrub_pii, suppress_counts_and_rates, suppress_small_cells, suppress_small_table


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to jane.doe42@gmail.com today", "EMAIL"),
        ("call +1 415 555 0199 after 5", "PHONE"),
        ("ring 07700 900123", "PHONE"),
        ("card 4111 1111 1111 1111 was charged", "CARD"),
        ("iban DE89 3704 0044 0532 0130 00 please", "IBAN"),
        ("my ssn is 123-45-6789", "SSN"),
        ("see https://example.com/u/jane?x=1", "URL"),
        ("server 192.168.10.20 is down", "IP"),
        ("follow @jane_doe42 for more", "HANDLE"),
    ],
)
def test_scrubber_removes_each_pii_type(text, kind):
    out = scrub_pii(text)
    assert f"[{kind}]" in out
    assert not re.search(r"\d{4}.?\d{4}|@\w|https?://", out)


@pytest.mark.parametrize(
    "text",
    ["I ran 5 km on 2025-12-16 in 42 minutes", "fix the race condition in my SQL UNION query", "budget is 1500 dollars for 3 days", "version 2.1.3 of the app"],
)
def test_scrubber_keeps_ordinary_text(text):
    assert scrub_pii(text) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), min_size=2, max_size=12), st.integers(min_value=2, max_value=20))
def test_suppressed_cells_cannot_be_recovered_from_the_total(counts, k):
    df = pd.DataFrame({"group": [f"g{i}" for i in range(len(counts))], "users": counts})
    out = suppress_small_cells(df, ["users"], k=k)
    hidden = out["users"] == f"<{k}"
    # every truly small cell is hidden
    assert hidden[(df["users"] > 0) & (df["users"] < k)].all()
    # and never alone: with a published total, one hidden cell would be total - visible
    assert hidden.sum() != 1 or len(df[df["users"] > 0]) == 1


def test_rows_of_few_users_are_suppressed_whole():
    df = pd.DataFrame({"region": ["US", "DE", "KR", "BR"], "users": [500, 40, 3, 60], "conversations": [2000, 160, 30, 240]})
    out = suppress_small_cells(df, ["users", "conversations"], k=10, by="users")
    kr = out.set_index("region").loc["KR"]
    assert kr["users"] == "<10" and kr["conversations"] == "<10"
    assert (out["users"] == "<10").sum() == 2 and (out["conversations"] == "<10").sum() == 2  # complementary


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=60), min_size=4, max_size=4), min_size=2, max_size=6))
def test_a_suppressed_table_cell_cannot_be_recovered_from_its_row_or_column_total(rows):
    table = pd.DataFrame(rows, columns=list("abcd"))
    out = suppress_small_table(table, k=10)
    hidden = (out == "<10").to_numpy()
    assert hidden[((table > 0) & (table < 10)).to_numpy()].all()
    assert not hidden[(table == 0).to_numpy()].any()
    for axis in (0, 1):  # labeled and predicted totals are published: never one hidden cell in a line
        assert (hidden.sum(axis=axis) != 1).all() or ((table > 0).sum(axis=axis).to_numpy()[hidden.sum(axis=axis) == 1] == 1).all()


def test_rates_resting_on_a_suppressed_count_are_blanked():
    df = pd.DataFrame({"tier1": ["A", "B", "C"], "labeled": [40, 30, 6], "correct": [30, 20, 5],
                       "recall": [0.75, 0.67, 0.83], "recall_low": [0.6, 0.5, 0.4], "recall_high": [0.86, 0.8, 0.97]})
    out = suppress_counts_and_rates(df, ["labeled", "correct"], {"recall": ("labeled", "correct")}, k=10).set_index("tier1")
    assert out.loc["C", "labeled"] == "<10" and pd.isna(out.loc["C", "recall"]) and pd.isna(out.loc["C", "recall_high"])
    assert out.loc["A", "labeled"] == 40 and out.loc["A", "recall"] == 0.75  # large cells keep their rate
    assert (out["labeled"] == "<10").sum() == 2  # complementary: C's count is not total - A - B


def test_pseudonyms_are_stable_keyed_and_opaque():
    ids = pd.Series(["u_1", "u_2", "u_1", None])
    a, b = pseudonymize(ids, key=b"k1"), pseudonymize(ids, key=b"k2")
    assert a[0] == a[2] and a[0] != a[1] and pd.isna(a[3])
    assert a[0] != b[0]
    assert not a.dropna().str.contains("u_").any()


LEAKY = """<!doctype html><html><head><script src="https://cdn.example.org/lib.js"></script></head><body>
<h1>Report</h1><p>Contact jane.doe@example.com or +1 415 555 0199. Only 3 users in KR.</p>
<table><tr><th>region</th><th>users</th></tr><tr><td>US</td><td>512</td></tr><tr><td>KR</td><td>4</td></tr></table>
<p>Example: i was just diagnosed with type 2 diabetes and need a meal plan for work</p><p>by u_deadbeef</p>
<script>var fig = {"data": [{"name": "topic about visa 4111 1111 1111 1111"}]};</script></body></html>"""


def test_scanner_fails_a_leaky_report(tmp_path):
    p = tmp_path / "leaky.html"
    p.write_text(LEAKY)
    res = scan_report(p, raw_texts=["i was just diagnosed with type 2 diabetes and need a meal plan for work"], raw_ids=["u_deadbeef"])
    kinds = set(res.to_frame()["kind"])
    assert {"EMAIL", "PHONE", "SMALL_CELL", "RAW_TEXT", "RAW_ID", "EXTERNAL_RESOURCE", "CARD"} <= kinds
    assert "jane.doe@example.com" not in res.to_markdown()  # findings are masked
    cli = subprocess.run([sys.executable, "-m", "analysis", "scan-report", str(p)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert cli.returncode == 1 and "finding(s)" in cli.stdout


def test_scanner_passes_a_clean_report(tmp_path):
    p = tmp_path / "clean.html"
    p.write_text("<html><body><h1>Report</h1><p>Health conversations passed the filter 2.1% of the time (95% CI 1.6–2.7%).</p>"
                 "<table><tr><th>region</th><th>users</th></tr><tr><td>US</td><td>512</td></tr><tr><td>KR</td><td>&lt;10</td></tr></table></body></html>")
    assert scan_report(p).ok


def test_scanner_ignores_element_ids_that_look_like_phone_numbers(tmp_path):
    """Plotly names each figure's div by a UUID; all-digit groups of one once failed a report."""
    p = tmp_path / "fig.html"
    p.write_text('<html><body><div id="b4955203-a4eb-4184-9477-123456789012"></div><script>'
                 'Plotly.newPlot("b4955203-a4eb-4184-9477-123456789012", [{"x": [1, 2]}]);</script>'
                 "<p>Call 020 7946 0958 for details.</p></body></html>")
    res = scan_report(p)
    assert list(res.to_frame()["kind"]) == ["PHONE"] and res.to_frame()["where"].iloc[0] == "text"


