"""One place for pins (pyproject); environment.yml and the notebooks agree with it."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from analysis.pipeline import KERNEL_NAME, PROJECT_ROOT, stage_notebooks

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_every_dependency_is_pinned_exactly():
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"] + PYPROJECT["tool"]["chat-ad-audit"]["no-deps"]
    for d in deps:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][0-9A-Za-z.+]*", d), f"not pinned with ==: {d}"
    assert PYPROJECT["project"]["dependencies"][0].startswith("torch==")


def test_environment_yml_is_consistent_with_pyproject():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    py_req = PYPROJECT["project"]["requires-python"]
    assert ">=3.11" in py_req and "<3.12" in py_req
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert pip[0] == torch_pin, "torch must come first and match pyproject's pin"
    assert pip[1] == "-e .[test]", "the pip section installs the project itself (pins come from pyproject)"
    # nothing else pinned a second time, so the two cannot drift apart
    assert len(pip) == 2


def test_notebooks_name_the_project_kernel_have_parameters_and_no_outputs():
    nbs = stage_notebooks()
    assert nbs and nbs[0].name == "00_ingest.ipynb"
    for p in nbs:
        nb = json.loads(p.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == KERNEL_NAME, p.name
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]), p.name
        assert not any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"), f"{p.name} has outputs"


def test_ci_calls_the_readme_test_command():
    assert "make test" in (PROJECT_ROOT / ".ci" / "run").read_text()
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make report" in readme and "make test" in readme
