"""Batch reruns: a grid runs in parallel, reruns execute nothing new, a failure does not stop the rest."""

from __future__ import annotations

import pandas as pd

from analysis.batch import Grid, run_batch

pytestmark = __import__("pytest").mark.notebook


def test_grid_runs_resumes_and_keeps_failures(tiny_world_dir, tmp_path):
    grid = Grid(
        name="t",
        base_config=None,
        grid={"input_dir": [str(tiny_world_dir), str(tmp_path / "missing")], "max_quarantine_share": [0.1, 0.3]},
        stages=["00_ingest"],
        batch_dir=tmp_path / "batch",
    )
    first = run_batch(grid, workers=2)
    runs = first.runs.set_index("param.input_dir")
    assert len(first.runs) == 4 and first.runs["executed"].all()
    assert (runs.loc[str(tiny_world_dir), "status"] == "completed").all()
    failed = runs.loc[str(tmp_path / "missing")]
    assert (failed["status"] == "failed").all() and failed["error"].str.contains("no messages table found").all()
    # the failed runs keep their notebook with the traceback
    for key in failed["run"]:
        assert (grid.batch_dir / key / "00_ingest.ipynb").exists()
    cmp = first.comparison.set_index("run")
    ok_runs = runs.loc[str(tiny_world_dir), "run"]
    assert (cmp.loc[ok_runs, "00_ingest.conversations"] == 200).all()
    assert (grid.batch_dir / "index.html").exists() and (grid.batch_dir / "comparison.csv").exists()

    second = run_batch(grid, workers=2)
    ex = second.runs.set_index("run")["executed"]
    assert not ex[ok_runs].any(), "complete runs must not execute again"
    assert ex[failed["run"]].all(), "failed runs are retried"
    assert pd.read_csv(grid.batch_dir / "comparison.csv").shape[0] == 4


def test_grid_yaml_expands_in_order(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\ngrid:\n  a: [1, 2]\n  b: [x, y, z]\nfixed:\n  c: 0\n")
    pts = Grid.from_yaml(p).expand()
    assert len(pts) == 6 and pts[0] == {"c": 0, "a": 1, "b": "x"} and pts[-1] == {"c": 0, "a": 2, "b": "z"}
