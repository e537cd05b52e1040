"""What is published: no PII, no small cells (not even through totals), no raw ids or transcripts."""

from __future__ import annotations

import re

from analysis.pipeline import run
from analysis.simulate import simulate
from analysis.util.privacy import scan_report


def test_report_of_a_world_with_planted_pii_contains_none_of_it(tmp_path):
    world = simulate({"seed": 21, "n_users": 120, "n_conversations": 400, "n_impressions": 8000, "p_pii": 0.5})
    d = world.write(tmp_path / "world")
    user_text = " ".join(world.messages.loc[world.messages["role"] == "user", "text"])
    planted = set(re.findall(r"[\w.]+@gmail\.com|\+1 415 555 \d{4}|4111 1111 1111 \d{4}|@[a-z]+_[a-z]+\d+", user_text))
    assert len(planted) > 20
    res = run(None, {"input_dir": str(d)}, reports_dir=tmp_path / "reports", progress=False)
    assert res.ok, res.error
    for page in res.run_dir.glob("*.html"):
        text = page.read_text()
        assert not [p for p in planted if p in text], page.name
        assert scan_report(page).ok
