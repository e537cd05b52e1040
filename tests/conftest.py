"""Shared fixtures: small simulated worlds, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.simulate import simulate

SMALL = {"seed": 7, "n_users": 400, "n_conversations": 1600, "n_impressions": 80_000}


@pytest.fixture(scope="session")
def small_world():
    return simulate(SMALL)


@pytest.fixture(scope="session")
def small_world_dir(small_world, tmp_path_factory) -> Path:
    return small_world.write(tmp_path_factory.mktemp("world_small"))


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    return simulate({"seed": 11, "n_users": 60, "n_conversations": 200, "n_impressions": 5000}).write(tmp_path_factory.mktemp("world_tiny"))
