"""Validation over adversarial worlds (issue 14): coverage and false-positive rates per estimator,
per world kind and (leak rates) per category, with Monte Carlo SEs. Run on demand:

    .venv/bin/python bench/validation_worlds.py [--worlds 1000] [--workers 2] [--rows DIR]

Per-chunk rows are written to --rows as they finish (a rerun skips the chunks already there); each
study's rows are then written to bench/results/validation_<study>.csv.gz (committed: the docs' tables
come from them) and the tables are printed from those files (with no chunks present, from the committed
ones: `--only none` reprints the docs' tables).

Lift: every kind of `analysis.validation.adversarial.LIFT_KINDS`, `--worlds` null worlds (false positives at
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

from analysis.validation import studies as V  # noqa: E402
from analysis.validation.adversarial import LEAK_KINDS, LIFT_KINDS, WEEKLY_KINDS  # noqa: E402


def _job(args):
    what, kind, seeds, path = args
    if what == "lift":
        out = V.lift_rows(kind, seeds)
    elif what == "leak":
        out = V.leak_rows(kind, seeds)
    elif what == "pretrend":  # the user-clustered F (the comparison, ~10x the cost) on the first chunk only
        out = V.pretrend_rows(kind, seeds, user_f=int(seeds[0]) % 100_000 < 100)
    elif what == "budget":
        out = V.budget_rows(kind, seeds)
    elif what == "category":  # full simulator, default-world sizes: per-category observational lifts
        from analysis.validation.worlds import category_lift_rows

        out = pd.concat([category_lift_rows({"seed": int(s)}) for s in seeds], ignore_index=True).assign(kind=kind)
    else:
        out = V.leak_rows(kind, seeds, target_rate=0.01, n_boot=0).assign(kind=f"{kind}@tolerance")
    out.to_parquet(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--tolerance-worlds", type=int, default=1000, help="worlds per kind with every rate on the tolerance")
    ap.add_argument("--pretrend-worlds", type=int, default=1000, help="weekly worlds per kind for the pre-trend tests")
    ap.add_argument("--budget-worlds", type=int, default=40, help="pilot + labeled worlds per kind for the label budget's power")
    ap.add_argument("--category-worlds", type=int, default=30, help="default-size simulated worlds for the per-category lifts")
    ap.add_argument("--only", default="lift,leak,tolerance,pretrend,budget,category", help="comma-separated studies to run (tables print from every row present)")
    ap.add_argument("--rows", type=Path, default=ROOT / "bench" / "out" / "validation_worlds", help="per-chunk rows (parquet)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where each study's rows are committed")
    ap.add_argument("--seed-base", type=int, default=100_000, help="world seeds are seed-base + 0 .. worlds - 1 (lift, leak, tolerance, pretrend, budget)")
    a = ap.parse_args()
    a.rows.mkdir(parents=True, exist_ok=True)
    chunks = [(i, np.arange(i, min(i + a.chunk, a.worlds)) + a.seed_base) for i in range(0, a.worlds, a.chunk)]
    # chunk-major order: every kind advances together, so a run cut short still covers each kind alike
    jobs = [(what, k, c, a.rows / f"{what}_{k}_{i:05d}_{len(c)}.parquet") for what, kinds in
            (("lift", LIFT_KINDS), ("leak", LEAK_KINDS)) for i, c in chunks for k in kinds]
    jobs += [("tolerance", k, c, a.rows / f"tolerance_{k}_{i:05d}_{len(c)}.parquet") for i, c in chunks for k in LEAK_KINDS
             if i < a.tolerance_worlds]
    jobs += [("pretrend", k, c, a.rows / f"pretrend_{k}_{i:05d}_{len(c)}.parquet") for i, c in chunks for k in WEEKLY_KINDS
             if i < a.pretrend_worlds]
    jobs += [("budget", k, c[: a.budget_worlds - i], a.rows / f"budget_{k}_{i:05d}_{min(len(c), a.budget_worlds - i)}.parquet")
             for i, c in chunks for k in ("benign", "correlated_detector") if i < a.budget_worlds]
    jobs += [("category", "default", np.arange(i, min(i + 5, a.category_worlds)) + 400_000, a.rows / f"category_default_{i:05d}.parquet")
             for i in range(0, a.category_worlds, 5)]
    only = set(a.only.split(","))
    todo = [j for j in jobs if not j[3].exists() and j[0] in only]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as ex:
        for path in ex.map(_job, todo):
            print(f"{time.perf_counter() - t0:7.0f} s  {path.name}", file=sys.stderr, flush=True)
    secs = time.perf_counter() - t0

    def read(what):
        """The study's rows: from this run's chunks (then written to bench/results/validation_<what>.csv.gz, the
        committed rows the docs cite), else from the committed file."""
        paths = [j[3] for j in jobs if j[0] == what and j[3].exists()]
        out = a.results / f"validation_{what}.csv.gz"
        if paths:
            df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
            a.results.mkdir(parents=True, exist_ok=True)
            df.to_csv(out, index=False, float_format="%.6g")
            return pd.read_csv(out)
        return pd.read_csv(out) if out.exists() else None

    f = {"floatfmt": ".3f", "index": False}
    pre = read("pretrend")
    if pre is not None:
        print(f"## Pre-trend tests ({pre.groupby('kind')['seed'].nunique().to_dict()} weekly worlds; no effect; "
              "region_trend: included regions drift 0.5%/week)\n")
        print(V.summarize_pretrend(pre).to_markdown(**f) + "\n")
        print(f"user-clustered F on {pre.groupby('kind')['user_f_p'].count().to_dict()} worlds per kind\n")
    c = read("category")
    if c is not None:
        print(f"## Per-category observational lift ({c['seed'].nunique()} default-size worlds, {len(c)} category CIs)\n")
        cols = [k for k in ("covers", "covers_df_min", "covers_fieller") if k in c]
        print(c[cols].mean().to_frame("pooled coverage").T.to_markdown(**f) + "\n")
        per = c.groupby("ad_category").agg(worlds=("covers", "size"), users_chat=("users_chat", "median"),
                                           bias=("rel_lift", "mean"), truth=("truth", "mean"), **{k: (k, "mean") for k in cols})
        per["bias"] = per["bias"] - per["truth"]
        print(per.sort_values("covers").reset_index().to_markdown(**f) + "\n")
    b = read("budget")
    if b is not None:
        print("## Label budget: share 'shown below' when labeled at the budget (true rate 2%, tolerance 5%, planned power 0.8)\n")
        g = b.groupby(["kind", "basis"], sort=False)
        out = g.agg(verdicts=("shown_below", "size"), power=("shown_below", "mean"), median_labels=("labels_needed", "median"),
                    median_variance_factor_ppi=("variance_factor_ppi", "median"), median_deff=("deff", "median"),
                    capped=("capped", "mean")).reset_index()
        out["mc_se"] = np.sqrt(out["power"] * (1 - out["power"]) / out["verdicts"])
        print(out.to_markdown(**f) + "\n")
    print(f"({len(todo)} chunks run now in {secs:.0f} s on {a.workers} workers)\n")
    lift = read("lift")
    if lift is not None:
        print(f"## Lift: false-positive rate (null worlds) and coverage of the true relative lift "
              f"({lift.groupby('kind')['seed'].nunique().to_dict()} seeds per kind)\n")
        print(V.summarize_lift(lift).to_markdown(**f))
        print(f"\nregion DiD df (median by kind): {lift.groupby('kind', sort=False)['region_did_df'].median().round(1).to_dict()}\n")
    leak = read("leak")
    if leak is not None:
        print(f"## Leak rates: coverage of the true rate, all categories pooled ({leak.groupby('kind')['seed'].nunique().to_dict()} worlds)\n")
        print(V.summarize_leak(leak, by_category=False).to_markdown(**f))
        print("\n## Leak rates: coverage per category\n")
        s = V.summarize_leak(leak).pivot_table(index=["kind", "category"], columns="estimator", values="coverage", sort=False).reset_index()
        print(s.to_markdown(**f))
        print(f"\nper-category MC SE at 0.95: {np.sqrt(0.95 * 0.05 / leak.groupby('kind')['seed'].nunique().min()):.3f}\n")
        print("## Mean interval width (all categories)\n")
        print(leak.groupby("kind", sort=False)[["clustered_width", "ppi_width"]].mean().reset_index().to_markdown(**f))
    tol = read("tolerance")
    if tol is not None:
        print(f"\n## Compliance at the tolerance (every true rate = 1%; {tol.groupby('kind')['seed'].nunique().to_dict()} worlds)\n")
        print(V.summarize_compliance(tol).to_markdown(**f))
        print("\nper category:\n")
        print(V.summarize_compliance(tol, by_category=True).to_markdown(**f))

if __name__ == "__main__":
    main()
