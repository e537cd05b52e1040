"""The stakeholder summary: sentences carry the stage outputs' numbers; the HTML renders in a browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pandas as pd
import pytest

from analysis.pipeline import run
from analysis.report import AuditSummary
from analysis.storage import write_json, write_parquet


def _metrics(run_dir, stage, records):
    write_json([{"group": {}, "ci_low": None, "ci_high": None, "truth": None, "n": None, **r} for r in records], run_dir / "metrics" / f"{stage}.json")


@pytest.fixture
def fake_run(tmp_path):
    _metrics(tmp_path, "03_leakage", [
        {"metric": "leak_rate", "group": {"category": "health", "region_group": "all"}, "estimate": 0.021, "ci_low": 0.016, "ci_high": 0.027},
        {"metric": "leak_rate", "group": {"category": "trade_union", "region_group": "all"}, "estimate": 0.122, "ci_low": 0.101, "ci_high": 0.145, "truth": 0.09},
        {"metric": "leak_rate", "group": {"category": "religion", "region_group": "all"}, "estimate": 0.009, "ci_low": 0.004, "ci_high": 0.018},
        {"metric": "violation_impressions", "group": {"region": "DE"}, "estimate": 1234},
        {"metric": "tolerance_p_value_holm", "group": {"category": "health", "region_group": "all"}, "estimate": 0.02},
        {"metric": "tolerance_p_value_holm", "group": {"category": "trade_union", "region_group": "all"}, "estimate": 0.0001},
        {"metric": "tolerance_p_value_holm", "group": {"category": "religion", "region_group": "all"}, "estimate": 0.7},
    ])
    _metrics(tmp_path, "04_engagement_lift", [
        {"metric": "did_rel_lift", "group": {"estimand": "included_post"}, "estimate": 0.045, "ci_low": 0.021, "ci_high": 0.069, "truth": 0.0451},
        {"metric": "ab_rel_lift", "group": {"estimand": "treatment_arm"}, "estimate": 0.05, "ci_low": -0.01, "ci_high": 0.11},
        {"metric": "ab_cuped_rel_lift", "group": {"estimand": "treatment_arm"}, "estimate": 0.052, "ci_low": 0.004, "ci_high": 0.1},
    ])
    write_parquet(pd.DataFrame({"topic": [-1, 0, 1, 2, 3], "label": ["outliers", "hiking boots", "sourdough baking", "job search", "tiny"],
                                "size": [50, 400, 300, 200, 4], "share": [50 / 954, 400 / 954, 300 / 954, 200 / 954, 4 / 954]}), tmp_path / "data" / "topic_info.parquet")
    return tmp_path


def test_sentences_carry_the_numbers_of_the_stage_outputs(fake_run):
    a = {x.key: x for x in AuditSummary(fake_run, tolerance=0.01).answers()}
    assert a["topics"].sentence.startswith("Across 954 conversations the analysis found 4 topics; the most common were hiking boots (41.9%), sourdough baking (31.4%) and job search (21.0%)")
    assert "tiny" not in a["topics"].sentence  # a topic of fewer than k conversations is not named
    assert a["leakage"].sentence.startswith("Trade-union conversations passed the filter 12.2% of the time (95% CI 10.1–14.5%), the highest")
    assert "2 of 3 categories leak significantly more than the 1% tolerance (one-sided exact test, Holm-adjusted" in a["leakage"].sentence
    assert "1,234 impressions carried a chat-derived signal" in a["leakage"].sentence
    assert "changed by +4.5% (95% CI 2.1–6.9%)" in a["lift"].sentence and "statistically significant lift" in a["lift"].sentence
    assert "randomized holdout comparison gives +5.2% (95% CI 0.4–10.0%; CUPED-adjusted" in a["lift"].sentence
    assert not a["ad_categories"].assessed and "did not run" in a["ad_categories"].sentence
    t = AuditSummary(fake_run).estimates_vs_truth().set_index("metric")
    assert bool(t.loc["did_rel_lift", "covers_truth"]) and not bool(t.loc["leak_rate", "covers_truth"])


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.notebook
def test_summary_report_renders_in_a_browser(tiny_world_dir, tmp_path):
    browser = _chromium()
    if not browser:
        pytest.skip("no Chromium on this machine and `make browser` could not install Debian's chromium (not root or no apt)")
    res = run(None, {"input_dir": str(tiny_world_dir)}, reports_dir=tmp_path, progress=False)
    assert res.ok, res.error
    page = res.run_dir / "05_summary.html"
    html = page.read_text()
    assert not re.search(r'<script[^>]+src="https?://', html), "the report must not load scripts from a CDN"
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    dom = r.stdout
    assert "<title>" in dom and "Chat-ad audit: summary" in dom
    for q in ("What do people talk about with the AI?", "Which ad categories do those topics feed?",
              "Do sensitive conversations leak past the filter into ad targeting?", "Does chat-based personalization lift engagement?"):
        assert q in dom
    assert dom.count('class="audit-answer"') == 4
    if len(res.stages) > 2:  # stages beyond ingest ran: their key figures are in the summary
        assert dom.count("<img") + dom.count('class="main-svg"') >= 1
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln]
    errors = [ln for ln in console if re.search(r"Uncaught|Error|Failed to load", ln)]
    assert not errors, errors
