"""The stakeholder summary renders in a browser: plotly figures draw, nothing loads from the network."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest

from analysis.pipeline import run


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
