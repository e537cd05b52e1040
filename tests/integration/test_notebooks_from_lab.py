"""Notebooks as JupyterLab runs them: the kernel's working directory is `notebooks/` and the paths
are the relative ones of the configs. Every stage notebook runs there, in order, on a tiny world,
with relative `input_dir` and `run_dir` resolved against the project root. Each runs by the papermill
command, as a user runs one notebook on its own (the runner, `analysis.pipeline.run`, is tested in
test_pipeline.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.pipeline import PROJECT_ROOT, stage_notebooks
from analysis.simulate import simulate

pytestmark = pytest.mark.notebook

WORLD = Path("data/world/_test_notebooks_from_lab")  # relative, as configs write it (data/world/ is git-ignored)
RUN = Path("reports/_test_notebooks_from_lab")
FAST = {  # the tiny world's settings: only speed, no different path handling (fit_categorizer: the categorizer refitted on
    # the static backend, not the shipped MiniLM one loaded: a MiniLM pass of the world less)
    "02_ad_mapping": {"detector_backend": "student", "mapping_backend": "static", "cv_folds": 1, "fit_categorizer": True},
    "03_leakage": {"exposure_permutations": 49, "n_boot": 100},
    "04_engagement_lift": {"lift_permutations": 49},
}


@pytest.fixture
def relative_world():
    simulate({"seed": 5, "n_users": 60, "n_conversations": 240, "n_impressions": 6000}).write(PROJECT_ROOT / WORLD)
    try:
        yield
    finally:
        shutil.rmtree(PROJECT_ROOT / WORLD, ignore_errors=True)
        shutil.rmtree(PROJECT_ROOT / RUN, ignore_errors=True)


def test_every_notebook_runs_with_its_working_directory_in_notebooks(relative_world, tmp_path):
    papermill = Path(sys.executable).parent / "papermill"
    for nb in stage_notebooks():
        params = {"run_dir": str(RUN), **({"input_dir": str(WORLD)} if nb.stem == "00_ingest" else {}), **FAST.get(nb.stem, {})}
        args = [x for k, v in params.items() for x in ("-p", k, str(v))]
        r = subprocess.run([str(papermill), str(nb), str(tmp_path / nb.name), *args, "--cwd", str(PROJECT_ROOT / "notebooks")],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{nb.name}: {r.stderr[-3000:]}"
    run = PROJECT_ROOT / RUN
    assert not (PROJECT_ROOT / "notebooks" / RUN).exists()  # nothing written relative to the kernel's cwd
    for stage in ("00_ingest", "01_topics", "02_ad_mapping", "03_leakage", "04_engagement_lift"):
        assert (run / "metrics" / f"{stage}.json").exists(), stage
    assert (run / "truth" / "ground_truth.json").exists() and (run / "data" / "conversations.parquet").exists()
