"""Validation by simulation: over hundreds of small seeded worlds, A/A (null) worlds give ~5% false
positives and 95% CIs cover the true lift ~95% of the time (estimands as in analysis/lift.py)."""

from __future__ import annotations

import functools
import gc
import os
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
import pytest

from analysis.validation.worlds import validate_lift_world as validate_world

N_WORLDS = 300
# Small worlds (simulate ~0.15 s each). The holdout arm is 50% so that the A/B arm has ~130 users:
# at 10% (~20-40 users, a few dozen clicks) the delta-method CIs are measurably too narrow
# (docs/lift.md); the A/B result warns below 100 users or clicks per arm.
WORLD = {"n_users": 400, "n_conversations": 800, "n_impressions": 40_000, "holdout_share": 0.5}

pytestmark = pytest.mark.slow


def _run(mode: str, first_seed: int) -> pd.DataFrame:
    cfgs = [{**WORLD, "mode": mode, "seed": first_seed + i} for i in range(N_WORLDS)]
    workers = min(2, os.cpu_count() or 1)
    # gc.freeze: the forked workers inherit the xdist worker's heap; without it every full collection walks it
    with ProcessPoolExecutor(workers, initializer=gc.freeze) as ex:
        rows = list(ex.map(_one, cfgs, chunksize=10))
    return pd.DataFrame(rows)


def _one(cfg: dict) -> dict:
    import analysis.simulate as sim

    # the topic catalogue is re-parsed by every simulate(); parse it once per worker process
    if not hasattr(sim.load_catalog, "cache_info"):
        sim.load_catalog = functools.lru_cache(maxsize=2)(sim.load_catalog)
    return validate_world(cfg, expected_holdout_share=WORLD["holdout_share"])


@pytest.fixture(scope="module")
def null_worlds() -> pd.DataFrame:
    return _run("null", 0)


@pytest.fixture(scope="module")
def lift_worlds() -> pd.DataFrame:
    return _run("default", 10_000)


# The headline estimators (DiD, region CUPED, A/B: test and relative-lift CI) are held to the issue's
# bands. The other tests and intervals (absolute-lift CIs, which move with the relative ones;
# randomization inference; A/B permutation and CUPED; Fieller) are printed for docs/lift.md and held
# to a sanity band only: with 300 worlds each band check is a ~2.4-sigma test, and every extra one
# adds a chance of failing on noise alone whenever the simulator's random stream changes.
FPR_BAND, COVERAGE_BAND = (0.02, 0.08), (0.92, 0.98)
SANITY_FPR, SANITY_COVERAGE = (0.01, 0.10), (0.90, 0.99)


@pytest.mark.parametrize(
    "test,band",
    [("did_p", FPR_BAND), ("cuped_p", FPR_BAND), ("ab_p", FPR_BAND),
     ("ri_p", SANITY_FPR), ("ab_perm_p", SANITY_FPR), ("ab_cuped_p", SANITY_FPR)],
)
def test_aa_false_positive_rate(null_worlds, test, band):
    assert (null_worlds["truth_rel"] == 0).all()
    fpr = (null_worlds[test] < 0.05).mean()
    print(f"{test}: A/A false-positive rate {fpr:.3f} over {len(null_worlds)} worlds")
    assert band[0] <= fpr <= band[1]


@pytest.mark.parametrize(
    "ci,band",
    [("did_rel_cov", COVERAGE_BAND), ("cuped_rel_cov", COVERAGE_BAND), ("ab_rel_cov", COVERAGE_BAND),
     ("did_abs_cov", SANITY_COVERAGE), ("cuped_abs_cov", SANITY_COVERAGE), ("ab_abs_cov", SANITY_COVERAGE),
     ("did_rel_fieller_cov", SANITY_COVERAGE), ("cuped_rel_fieller_cov", SANITY_COVERAGE),
     ("ab_rel_fieller_cov", SANITY_COVERAGE), ("ab_cuped_abs_cov", SANITY_COVERAGE), ("ab_cuped_rel_cov", SANITY_COVERAGE)],
)
def test_ci_coverage_of_the_true_lift(lift_worlds, ci, band):
    assert (lift_worlds["truth_rel"] > 0).mean() > 0.9  # a real (if small) effect in these worlds
    cov = lift_worlds[ci].mean()
    print(f"{ci}: coverage {cov:.3f} over {len(lift_worlds)} worlds")
    assert band[0] <= cov <= band[1]


def test_cuped_reduces_variance(null_worlds, lift_worlds):
    both = pd.concat([null_worlds, lift_worlds])
    for col in ("cuped_vr", "ab_cuped_vr"):
        print(f"{col}: mean {both[col].mean():.3f}, median {both[col].median():.3f}, share > 0 {(both[col] > 0).mean():.3f}")
        assert both[col].mean() > 0.05 and both[col].median() > 0
    # the arms follow the promised split: SRM flags (p < 0.001) only at about their nominal rate
    print(f"SRM flag rate {both['srm_flag'].mean():.4f}")
    assert both["srm_flag"].mean() <= 0.01
