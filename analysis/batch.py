"""Batch reruns: expand a parameter grid into runs, execute them in parallel with papermill,
skip runs already complete with the same parameters and inputs, keep failures, compare figures.

    python -m analysis batch --grid configs/grid.yaml [--workers N]
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import yaml

from analysis.pipeline import PROJECT_ROOT, fingerprint_inputs, load_config, run
from analysis.util.metrics import read_metrics
from analysis.util.storage import write_parquet, write_text


@dataclass
class Grid:
    """A base config, the parameters to vary (each a list of values) and where the runs go."""

    name: str
    base_config: str | None
    grid: dict[str, list]
    fixed: dict = field(default_factory=dict)
    stages: list[str] | None = None
    batch_dir: Path = PROJECT_ROOT / "reports" / "batches"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Grid":
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        grid = raw.get("grid") or {}
        if not grid:
            raise ValueError(f"{path}: 'grid' must map parameter names to lists of values")
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"{path}: grid parameter {k!r} must be a non-empty list, got {v!r}")
        name = raw.get("name") or path.stem
        bdir = Path(raw.get("batch_dir") or PROJECT_ROOT / "reports" / "batches" / name)
        return cls(name, raw.get("base_config"), grid, raw.get("fixed") or {}, raw.get("stages"), bdir if bdir.is_absolute() else PROJECT_ROOT / bdir)

    def expand(self) -> list[dict]:
        """One parameter set per grid point, in a stable order."""
        keys = list(self.grid)
        return [{**self.fixed, **dict(zip(keys, combo))} for combo in itertools.product(*(self.grid[k] for k in keys))]


def run_key(params: dict, stages, inputs: dict) -> str:
    """Identity of a run: its parameters, stages and input fingerprints."""
    blob = json.dumps({"params": params, "stages": stages, "inputs": inputs}, sort_keys=True, default=str)
    return "run-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class BatchResult:
    grid: Grid
    runs: pd.DataFrame  # one row per run: key, status, executed, seconds, error, parameters
    comparison: pd.DataFrame  # one row per run, key figures as columns

    @property
    def n_failed(self) -> int:
        return int((self.runs["status"] != "completed").sum())

    def summary(self) -> pd.DataFrame:
        return self.runs.copy()

    def to_markdown(self) -> str:
        n = len(self.runs)
        ex = int(self.runs["executed"].sum())
        return f"batch {self.grid.name}: {n} runs, {ex} executed, {n - ex} already complete, {self.n_failed} failed -> {self.grid.batch_dir / 'index.html'}"


def _execute(config, params, stages, reports_dir, run_id) -> dict:
    res = run(config, params, stages=stages, reports_dir=reports_dir, run_id=run_id, progress=False, update_latest=False)
    return {"status": res.status, "error": res.error, "seconds": sum(s.get("seconds", 0) for s in res.stages)}


def run_batch(grid: Grid | str | Path, *, workers: int = 2) -> BatchResult:
    """Run every grid point not yet complete; never stop on a failed run."""
    grid = grid if isinstance(grid, Grid) else Grid.from_yaml(grid)
    base = load_config(PROJECT_ROOT / grid.base_config if grid.base_config else None)
    rows, todo = [], []
    for point in grid.expand():
        params = {**base["params"], **point}
        input_dir = params.get("input_dir")
        if input_dir and not Path(str(input_dir)).is_absolute():
            input_dir = str(PROJECT_ROOT / str(input_dir))
        key = run_key(params, grid.stages, fingerprint_inputs(input_dir))
        manifest = grid.batch_dir / key / "manifest.json"
        done = manifest.exists() and json.loads(manifest.read_text()).get("status") == "completed"
        row = {"run": key, **{f"param.{k}": v for k, v in point.items()}, "executed": not done}
        rows.append(row)
        if done:
            row.update(status="completed", error=None, seconds=0.0)
        else:
            todo.append((row, params))
    grid.batch_dir.mkdir(parents=True, exist_ok=True)
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_execute, None, params, grid.stages, grid.batch_dir, row["run"]): row for row, params in todo}
            for fut in as_completed(futures):
                row = futures[fut]
                try:
                    row.update(fut.result())
                except Exception as e:  # a crash of the worker itself, not a failed stage
                    row.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=None)
                print(f"[batch {grid.name}] {row['run']}: {row['status']}" + (f" ({row['error']})" if row.get("error") else ""), flush=True)
    runs = pd.DataFrame(rows)
    comparison = compare_runs(grid.batch_dir, runs)
    write_parquet(comparison, grid.batch_dir / "comparison.parquet")
    write_text(comparison.to_csv(index=False), grid.batch_dir / "comparison.csv")
    write_index(grid, runs)
    return BatchResult(grid, runs, comparison)


def compare_runs(batch_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its parameters and status, then every key figure as a column."""
    out = []
    for row in runs.to_dict("records"):
        rec = {k: v for k, v in row.items() if k in ("run", "status") or k.startswith("param.")}
        m = read_metrics(batch_dir / row["run"]) if (batch_dir / row["run"] / "metrics").exists() else pd.DataFrame()
        for r in m.to_dict("records"):
            grp = ",".join(f"{k}={v}" for k, v in sorted((r["group"] or {}).items()))
            rec[f"{r['stage']}.{r['metric']}" + (f"[{grp}]" if grp else "")] = r["estimate"]
        out.append(rec)
    return pd.DataFrame(out)


def write_index(grid: Grid, runs: pd.DataFrame) -> Path:
    params = [c for c in runs.columns if c.startswith("param.")]
    head = "".join(f"<th>{html.escape(c[6:])}</th>" for c in params)
    body = []
    for r in runs.to_dict("records"):
        link = f'<a href="{r["run"]}/index.html">{r["run"]}</a>'
        cells = "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in params)
        err = html.escape(str(r.get("error") or ""))
        body.append(f"<tr><td>{link}</td>{cells}<td>{html.escape(r['status'])}</td><td>{err}</td></tr>")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>batch {html.escape(grid.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}} td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd}}</style></head>
<body><h1>Batch {html.escape(grid.name)}</h1><p>{len(runs)} runs; comparison of key figures: <a href="comparison.csv">comparison.csv</a>.</p>
<table><tr><th>run</th>{head}<th>status</th><th>reason</th></tr>{''.join(body)}</table></body></html>
"""
    return write_text(page, grid.batch_dir / "index.html")

