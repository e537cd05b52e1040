"""What is published, on one full default run of a world with planted PII: no PII, no small cells
(not even through totals), no raw ids or transcripts; and the summary renders in a browser with its
plotly figures drawn and nothing loaded from the network."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest

from analysis.pipeline import run
from analysis.simulate import simulate
from analysis.util.privacy import scan_report

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def pii_run(tmp_path_factory):
    """All six stages with default settings on a small world where half the users leak PII into chat."""
    tmp = tmp_path_factory.mktemp("pii")
    world = simulate({"seed": 21, "n_users": 120, "n_conversations": 400, "n_impressions": 8000, "p_pii": 0.5})
    d = world.write(tmp / "world")
    user_text = " ".join(world.messages.loc[world.messages["role"] == "user", "text"])
    planted = set(re.findall(r"[\w.]+@gmail\.com|\+1 415 555 \d{4}|4111 1111 1111 \d{4}|@[a-z]+_[a-z]+\d+", user_text))
    res = run(None, {"input_dir": str(d)}, reports_dir=tmp / "reports", progress=False)
    return res, planted


def test_report_of_a_world_with_planted_pii_contains_none_of_it(pii_run):
    res, planted = pii_run
    assert len(planted) > 20
    assert res.ok, res.error
    pages = list(res.run_dir.glob("*.html"))
    assert len(pages) >= 6
    for page in pages:
        text = page.read_text()
        assert not [p for p in planted if p in text], page.name
        assert scan_report(page).ok


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_summary_report_renders_in_a_browser(pii_run):
    browser = _chromium()
    if not browser:
        pytest.skip("no Chromium on this machine and `make browser` could not install Debian's chromium (not root or no apt)")
    res, _ = pii_run
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
    assert dom.count("<img") + dom.count('class="main-svg"') >= 1  # the later stages' key figures are drawn
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln]
    errors = [ln for ln in console if re.search(r"Uncaught|Error|Failed to load", ln)]
    assert not errors, errors
