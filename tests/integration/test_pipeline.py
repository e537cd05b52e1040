"""The runner: stages run in order into a run folder with manifest, metrics and HTML; failures stop it clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nbformat
import pytest

from analysis.pipeline import PROJECT_ROOT, run
from analysis.util.metrics import read_metrics

pytestmark = pytest.mark.notebook


def test_ingest_stage_runs_and_records_its_figures(tiny_world_dir, tmp_path):
    res = run(None, {"input_dir": str(tiny_world_dir)}, reports_dir=tmp_path, stages=["00_ingest"], progress=False)
    assert res.ok, res.error
    d = res.run_dir
    for f in ("00_ingest.ipynb", "00_ingest.html", "index.html", "manifest.json", "data/conversations.parquet", "data/quarantine.parquet"):
        assert (d / f).exists(), f
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "completed" and man["stages"][0]["seconds"] > 0
    assert man["packages"]["pandas"] and "ground_truth.json" in man["inputs"]
    assert len(man["inputs"]["messages.parquet"]["sha256"]) == 64
    m = read_metrics(d, "00_ingest").set_index("metric")
    assert m.loc["conversations", "estimate"] == m.loc["conversations", "truth"] == 200
    assert (tmp_path / "latest").resolve() == d
    html = (d / "00_ingest.html").read_text()
    assert "Data quality" in html and "result = ingest.run(" not in html  # code hidden


def test_failing_stage_stops_the_run_with_its_reason(tiny_world_dir, tmp_path):
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "00_ingest.ipynb", nbdir)
    bad = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("run_dir = ''", metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell("raise RuntimeError('stage exploded')")],
        metadata={"kernelspec": {"name": "chat-ad-audit", "display_name": "Python (chat-ad-audit)", "language": "python"}},
    )
    nbformat.write(bad, nbdir / "01_boom.ipynb")
    nbformat.write(bad, nbdir / "02_never.ipynb")
    res = run(None, {"input_dir": str(tiny_world_dir)}, reports_dir=tmp_path / "r", notebook_dir=nbdir, progress=False)
    assert not res.ok
    assert res.error.startswith("stage 01_boom failed: RuntimeError: stage exploded")
    assert [s["stage"] for s in res.stages] == ["00_ingest", "01_boom"]
    # the failed notebook is kept for the analyst, not rendered or scanned as a report
    assert not (res.run_dir / "01_boom.html").exists() and "privacy" not in res.error
    saved = nbformat.read(res.run_dir / "01_boom.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in saved.cells for o in c.get("outputs", []))
    assert json.loads((res.run_dir / "manifest.json").read_text())["status"] == "failed"


def test_unknown_parameter_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['input_dri'\]"):
        run(None, {"input_dri": "x"}, reports_dir=tmp_path, stages=["00_ingest"])


def test_cli_run_exit_codes(tiny_world_dir, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "analysis", "run", "--stages", "00_ingest", "--set", f"input_dir={tiny_world_dir}", "--reports-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, cwd=PROJECT_ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "completed; report:" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "analysis", "run", "--stages", "00_ingest", "--set", f"input_dir={tmp_path / 'nowhere'}", "--reports-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, cwd=PROJECT_ROOT,
    )
    assert bad.returncode == 1
    assert "stage 00_ingest failed: DataError" in bad.stderr and "no messages table found" in bad.stderr

