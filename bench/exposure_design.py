"""The black-box exposure design in simulated worlds (issue 14): placebo windows, negative controls and
the "outside interest" world. Run on demand:

    .venv/bin/python bench/exposure_design.py [--worlds 1000] [--outside-worlds 30] [--workers 1] [--rows DIR]

Worlds (the three share their pre-policy data seed by seed, so placebo rates are read off `default`; full simulator,
2,000 users / 8,000 conversations / 200,000 impressions; the design is run on the true sensitive categories by
`analysis.validation.worlds.exposure_world_rows`, as stage 03 runs it: sequential permutation tests of at most 9,999
draws; `--worlds` default worlds, `--outside-worlds` of each outside-interest kind):

  default                       chat -> ad flow in included regions after the policy date only
  outside_interest              no chat flow; for 30 days after a conversation 30% of the user's other ads
                                follow its topic through other signals (every region, the whole period)
  outside_interest_from_policy  the same, but the outside signal starts on the policy date

Per-chunk rows go to --rows (a rerun skips chunks already there); then every chunk present is written to
bench/results/validation_exposure_{tests,checks,violations}.csv.gz (committed; the docs' tables come from them) and
the tables are printed from those files (with no chunks present, from the committed ones).
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

from analysis.util.regions import DEFAULT_POLICY_DATE  # noqa: E402
from analysis.validation.worlds import exposure_world_rows  # noqa: E402

SIZE = {"n_users": 2000, "n_conversations": 8000, "n_impressions": 200_000}
KINDS = {
    "default": {"mode": "default"},
    "outside_interest": {"mode": "outside_interest"},
    "outside_interest_from_policy": {"mode": "outside_interest", "outside_interest_since": DEFAULT_POLICY_DATE},
}


def _job(args):
    kind, seeds, path = args
    ex, ch, vi = [], [], []
    for s in seeds:
        e, c, v = exposure_world_rows({**SIZE, **KINDS[kind], "seed": int(s)})
        ex.append(e.assign(world=kind))
        ch.append(c.assign(world=kind))
        vi.append(v.assign(world=kind))
    cols = ["category", "kind", "window", "design", "region_group", "n_treated", "n_control", "effect", "p_permutation", "seed", "world"]
    pd.concat(ex)[cols].to_parquet(path.with_suffix(".exposure.parquet"))
    pd.concat(ch).drop(columns=["significant"]).to_parquet(path.with_suffix(".checks.parquet"))
    vi = pd.concat(vi)
    vi[["region", "flagged", "exposure_p", "seed", "world"]].assign(flagged=vi["flagged"].astype(bool)).to_parquet(path.with_suffix(".violations.parquet"))
    return path


def rate(x) -> str:
    x = np.asarray(x, float)
    p = x.mean()
    return f"{p:.3f} ± {np.sqrt(p * (1 - p) / len(x)):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=40, help="default worlds")
    ap.add_argument("--outside-worlds", type=int, default=30, help="worlds of each outside-interest kind")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--rows", type=Path, default=ROOT / "bench" / "out" / "exposure_design")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the rows are committed")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated world kinds to run (tables print from every row present)")
    a = ap.parse_args()
    a.rows.mkdir(parents=True, exist_ok=True)
    def chunks(n):
        return [(i, np.arange(i, min(i + a.chunk, n)) + 300_000) for i in range(0, n, a.chunk)]
    jobs = [(k, c, a.rows / f"{k}_{i:05d}_{len(c)}") for k in KINDS if k in a.kinds.split(",")
            for i, c in chunks(a.worlds if k == "default" else a.outside_worlds)]
    todo = [j for j in jobs if not j[2].with_suffix(".checks.parquet").exists()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as ex:
        for path in ex.map(_job, todo):
            print(f"{time.perf_counter() - t0:7.0f} s  {path.name}", file=sys.stderr, flush=True)
    def read(sfx, name):
        """This run's chunks (then written to bench/results/validation_exposure_<name>.csv.gz, the committed rows
        the docs cite), else the committed file."""
        paths = [j[2].with_suffix(sfx) for j in jobs if j[2].with_suffix(sfx).exists()]
        out = a.results / f"validation_exposure_{name}.csv.gz"
        if paths:
            a.results.mkdir(parents=True, exist_ok=True)
            pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True).to_csv(out, index=False, float_format="%.6g")
        return pd.read_csv(out, dtype={"category": str, "region": str})

    e, c, v = read(".exposure.parquet", "tests"), read(".checks.parquet", "checks"), read(".violations.parquet", "violations")
    print(f"# exposure design: worlds per kind {c.groupby('world')['seed'].nunique().to_dict()} "
          f"({len(todo)} chunks run now in {time.perf_counter() - t0:.0f} s)\n")
    t = e[e["p_permutation"].notna()].copy()
    t["design"] = t["design"].where(t["design"] != "region", "region (excluded)")
    t["rejects"] = t["p_permutation"] < 0.05
    g = t.groupby(["world", "window", "kind", "design"], sort=False)
    out = g.agg(tests=("rejects", "size"), median_treated=("n_treated", "median"), mean_effect=("effect", "mean"))
    out["rejection rate"] = g["rejects"].apply(rate)
    print("## Rejection rate per test (one-sided permutation p < 0.05)\n")
    print(out.reset_index().to_markdown(index=False, floatfmt=".3f"))
    print("\n## Design checks: share of worlds in which the check failed (Holm within the check, alpha 0.05)\n")
    cc = c.groupby(["world", "check"], sort=False).agg(worlds=("failed", "size"), tests=("tests", "median"),
                                                       can_fail=("can_fail", "mean"))
    cc["failed"] = c.groupby(["world", "check"], sort=False)["failed"].apply(rate)
    print(cc.reset_index().to_markdown(index=False, floatfmt=".3f"))
    print("\n## Violations: share of worlds with a flag by the exposure tests (one Holm family; no world here violates)\n")
    v["by_test"] = v["exposure_p"] < 0.05  # the family's adjusted p; ai_chat sources (none in these worlds) flag apart
    fam = v.groupby(["world", "seed"])["by_test"].any().groupby("world")
    one = v[v["region"] != "ALL excluded"].groupby(["world", "seed"])["by_test"].any().groupby("world")
    vv = pd.DataFrame({"worlds": fam.size(), "any flag (family-wise false alarm)": fam.apply(rate),
                       "a single region flagged": one.apply(rate)})
    print(vv.reset_index().to_markdown(index=False))


if __name__ == "__main__":
    main()
