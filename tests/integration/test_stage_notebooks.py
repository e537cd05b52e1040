"""Stage notebooks run with papermill on a small world and record their figures with the truth beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.contract.art9 import ART9
from analysis.contract.settings import IngestSettings
from analysis.pipeline import PROJECT_ROOT
from analysis.stages import ingest
from analysis.validation.worlds import simulated_detector


def test_leakage_notebook_runs_on_a_small_world_and_records_metrics(small_world, small_world_dir, tmp_path):
    from analysis.util.metrics import read_metrics
    from analysis.util.storage import write_parquet

    run = tmp_path / "run"
    ingest.run(run, IngestSettings(input_dir=str(small_world_dir), policy_date=small_world.config.policy_date))
    cats = simulated_detector(small_world.conversation_truth, 0.9, 0.995, seed=0, topics=small_world.ground_truth["topics"])
    write_parquet(cats, run / "data" / "conversation_categories.parquet")
    out = tmp_path / "03.ipynb"
    r = subprocess.run(
        [str(Path(sys.executable).parent / "papermill"), str(PROJECT_ROOT / "notebooks" / "03_leakage.ipynb"), str(out),
         "-p", "run_dir", str(run), "-p", "exposure_permutations", "199",
         "-p", "n_boot", "1000", "--cwd", str(PROJECT_ROOT)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(run, "03_leakage")
    lr = m[(m["metric"] == "leak_rate") & m["group"].map(lambda g: g.get("region_group") == "all")]
    assert len(lr) == len(ART9) and lr["truth"].notna().all()
    assert {"leak_rate_corrected", "tolerance_p_value_holm", "exposure_effect", "violation_impressions"} <= set(m["metric"])
    nb = json.loads(out.read_text())
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.notebook
def test_lift_notebook_records_estimates_and_truth(small_world_dir, tmp_path):
    from analysis.pipeline import run
    from analysis.util.metrics import read_metrics

    res = run(None, {"input_dir": str(small_world_dir)}, reports_dir=tmp_path, stages=["00_ingest", "04_engagement_lift"], progress=False)
    assert res.ok, res.error
    m = read_metrics(res.run_dir, "04_engagement_lift").set_index("metric")
    for name in ("did_rel_lift", "region_did_rel_lift", "ab_rel_lift"):
        assert m.loc[name, "ci_low"] <= m.loc[name, "truth"] <= m.loc[name, "ci_high"], name
    html = (res.run_dir / "04_engagement_lift.html").read_text()
    assert "Event study" in html and "Observational" in html
