"""Validation over adversarial worlds (issue 14): coverage and false-positive rates per estimator,
per world kind and (leak rates) per category, with Monte Carlo SEs. Run on demand:

    .venv/bin/python bench/validation_worlds.py [--worlds 1000] [--workers 2] [--out rows.parquet]

Lift: every kind of `analysis.adversarial.LIFT_KINDS`, `--worlds` null worlds (false positives at
alpha 0.05) and `--worlds` worlds with a 5% lift (coverage of the true relative lift).
Leak: every kind of `LEAK_KINDS` with the default catch rates (coverage per category) and with
every true rate on the 1% tolerance (compliance: 'shown below' = false assurance, 'exceeds' =
false alarm). Worlds are drawn at the level of sufficient statistics (see analysis/adversarial.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis import validation_study as V  # noqa: E402
from analysis.adversarial import LEAK_KINDS, LIFT_KINDS  # noqa: E402


def _job(args):
    what, kind, seeds = args
    if what == "lift":
        return V.lift_rows(kind, seeds)
    if what == "leak":
        return V.leak_rows(kind, seeds)
    return V.leak_rows(kind, seeds, target_rate=0.01).assign(kind=f"{kind}@tolerance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="write every per-world row here (parquet)")
    a = ap.parse_args()
    chunks = [np.arange(i, min(i + a.chunk, a.worlds)) + 100_000 for i in range(0, a.worlds, a.chunk)]
    jobs = [("lift", k, c) for k in LIFT_KINDS for c in chunks]
    jobs += [("leak", k, c) for k in LEAK_KINDS for c in chunks]
    jobs += [("tolerance", k, c) for k in LEAK_KINDS for c in chunks]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as ex:
        out = list(ex.map(_job, jobs))
    secs = time.perf_counter() - t0
    lift = pd.concat([o for j, o in zip(jobs, out) if j[0] == "lift"], ignore_index=True)
    leak = pd.concat([o for j, o in zip(jobs, out) if j[0] == "leak"], ignore_index=True)
    tol = pd.concat([o for j, o in zip(jobs, out) if j[0] == "tolerance"], ignore_index=True)
    if a.out:
        pd.concat([lift.assign(study="lift"), leak.assign(study="leak"), tol.assign(study="tolerance")], ignore_index=True).to_parquet(a.out)
    f = {"floatfmt": ".3f", "index": False}
    print(f"# validation worlds: {a.worlds} per kind, {secs:.0f} s on {a.workers} workers\n")
    print("## Lift: false-positive rate (null worlds) and coverage of the true relative lift\n")
    print(V.summarize_lift(lift).to_markdown(**f))
    print(f"\nregion DiD df (median by kind): {lift.groupby('kind', sort=False)['region_did_df'].median().round(1).to_dict()}\n")
    print("## Leak rates: coverage of the true rate, all categories pooled\n")
    print(V.summarize_leak(leak, by_category=False).to_markdown(**f))
    print("\n## Leak rates: coverage per category\n")
    s = V.summarize_leak(leak).pivot_table(index=["kind", "category"], columns="estimator", values="coverage", sort=False).reset_index()
    print(s.to_markdown(**f))
    print(f"\nper-category MC SE at 0.95: {np.sqrt(0.95 * 0.05 / a.worlds):.3f}\n")
    print("## Mean interval width (all categories)\n")
    print(leak.groupby("kind", sort=False)[["clustered_width", "ppi_width"]].mean().reset_index().to_markdown(**f))
    print("\n## Compliance at the tolerance (every true rate = 1%)\n")
    print(V.summarize_compliance(tol).to_markdown(**f))
    print("\nper category:\n")
    print(V.summarize_compliance(tol, by_category=True).to_markdown(**f))


if __name__ == "__main__":
    main()
