"""Leakage stage benchmark (run on demand; figures printed, nothing asserted).

    .venv/bin/python bench/leakage.py [--worlds 1000] [--null-worlds 200] [--skip-default]

1. The default audit world (configs/world/default.yaml): time to simulate and analyse, every
   category's leak rate (labeled sample, raw detector, corrected) beside its truth, and the
   positive controls' black-box effects.
2. The large version of tests/test_leakage_simulation.py: CI coverage of the true leak rate over
   `--worlds` small worlds (Clopper-Pearson, Wilson, Jeffreys; corrected) and the black-box
   false-positive rate over `--null-worlds` null worlds.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.contract.settings import LeakageSettings  # noqa: E402
from analysis.leakage.report import analyse  # noqa: E402
from analysis.simulate import WorldConfig, simulate  # noqa: E402
from analysis.validation.truth import evaluate_leakage  # noqa: E402
from analysis.validation.worlds import inputs_from_world, validate_leakage_world  # noqa: E402

COVERAGE_WORLD = {"n_users": 500, "n_conversations": 2000, "n_impressions": 10}
NULL_WORLD = {"mode": "null", "n_users": 1000, "n_conversations": 3000, "n_impressions": 50_000}


def default_world() -> None:
    t0 = time.perf_counter()
    w = simulate(WorldConfig.from_yaml(ROOT / "configs" / "world" / "default.yaml"))
    t1 = time.perf_counter()
    rep = analyse(inputs_from_world(w, seed=w.config.seed), LeakageSettings(excluded_regions=w.config.excluded_regions, seed=0))
    evaluate_leakage(rep, w.ground_truth)
    t2 = time.perf_counter()
    print(f"default world: simulate {t1 - t0:.1f} s, analyse {t2 - t1:.1f} s ({len(w.impressions):,} impressions)")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(rep.side_by_side("all").to_string(index=False))
        e = rep.exposure.table
        print(e[e["design"] != "region"][["category", "kind", "design", "region_group", "n_treated", "effect", "ci_low", "ci_high",
                                          "p_permutation", "p_glm"]].to_string(index=False))
        print(rep.violations.to_string(index=False))


def _cov(seed):
    return validate_leakage_world({**COVERAGE_WORLD, "seed": seed})


def _null(seed):
    return validate_leakage_world({**NULL_WORLD, "seed": seed}, exposure=True, n_permutations=199, n_boot=200)[1]


def studies(n_worlds: int, n_null: int) -> None:
    workers = min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, initializer=gc.freeze) as ex:
        t0 = time.perf_counter()
        cov = pd.concat(list(ex.map(_cov, range(100_000, 100_000 + n_worlds), chunksize=10)))
        t1 = time.perf_counter()
        print(f"coverage study: {n_worlds} worlds in {t1 - t0:.0f} s")
        cols = ["covers_truth_cp", "covers_truth_wilson", "covers_truth_jeffreys", "labeled_covers_cp", "labeled_covers_wilson", "corrected_covers"]
        print(cov.groupby("region_group")[cols].agg(lambda s: s.astype(float).mean()).round(3).to_string())
        a = cov[cov["region_group"] == "all"]
        print(a.groupby("category")[cols].agg(lambda s: s.astype(float).mean()).round(3).to_string())
        if n_null:
            nul = pd.concat(list(ex.map(_null, range(200_000, 200_000 + n_null), chunksize=4)))
            t = nul[nul["p_permutation"].notna()]
            print(f"null study: {n_null} worlds, {len(t)} tests in {time.perf_counter() - t1:.0f} s")
            print(t.groupby(["design", "kind"]).agg(tests=("p_permutation", "size"),
                                                    fpr_permutation=("p_permutation", lambda p: (p < 0.05).mean()),
                                                    fpr_glm=("p_glm", lambda p: (p.dropna() < 0.05).mean()),
                                                    median_treated=("n_treated", "median")).round(3).to_string())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, default=1000)
    ap.add_argument("--null-worlds", type=int, default=200)
    ap.add_argument("--skip-default", action="store_true")
    a = ap.parse_args()
    if not a.skip_default:
        default_world()
    studies(a.worlds, a.null_worlds)
