"""Benchmark: read, aggregate and analyse 10,000,000 impressions (stage 04) — time and peak memory.

    .venv/bin/python bench/lift.py [--impressions 10000000] [--users 25000] [--dir /tmp/bench_lift]

The impression log is generated directly with numpy in the data-contract form (user_id strings,
shown_at, ad_category ids, clicked, targeting_sources lists, arm) and written to Parquet: the full
simulator also writes conversation text and per-impression Python lists, which is far slower at this
size and not what is being measured. The analysis then runs in a fresh process, so its peak RSS is
the stage's own: read_impressions -> aggregate -> analyse (DiD, event study, region randomization
inference, CUPED, A/B with SRM / permutation / power, per-category lift) -> metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.simulate import EXCLUDED_REGIONS, GENERIC_AD_NODES, INCLUDED_REGIONS


def generate(out: Path, n_imp: int, n_users: int, seed: int = 1) -> dict:
    """A log with the simulator's structure: user CTR heterogeneity, category effects, seasonality,
    a 10% holdout arm, and after the policy date chat-targeted impressions (12% of treatment-arm
    impressions in included regions) with a 25% CTR lift."""
    rng = np.random.default_rng(seed)
    inc_r, inc_w = zip(*INCLUDED_REGIONS.items())
    exc_r, exc_w = zip(*EXCLUDED_REGIONS.items())
    excluded = rng.random(n_users) < 0.35
    region = np.where(excluded, rng.choice(exc_r, n_users, p=np.array(exc_w) / sum(exc_w)), rng.choice(inc_r, n_users, p=np.array(inc_w) / sum(inc_w)))
    holdout = (~excluded) & (rng.random(n_users) < 0.10)
    user_ids = np.array([f"u_{i:08x}" for i in rng.choice(2**32, n_users, replace=False)])
    user_ctr = 0.02 * rng.lognormal(-0.125, 0.5, n_users)
    activity = rng.lognormal(0, 0.7, n_users)

    u = np.sort(rng.choice(n_users, n_imp, p=activity / activity.sum())).astype(np.int32)
    start = pd.Timestamp("2025-09-01", tz="UTC").value
    span = (pd.Timestamp("2026-04-01", tz="UTC").value - start) // 10**9
    t_s = rng.integers(0, span, n_imp)
    policy_s = (pd.Timestamp("2025-12-16", tz="UTC").value - start) // 10**9
    nodes = np.array(GENERIC_AD_NODES + [str(x) for x in (159, 216, 225, 396, 425, 552, 653, 680, 1, 383)] * 1, dtype=object)
    cat_mult = rng.lognormal(-0.045, 0.3, len(nodes))
    cat = rng.integers(0, len(nodes), n_imp).astype(np.int16)
    chat = (~excluded[u]) & (~holdout[u]) & (t_s >= policy_s) & (rng.random(n_imp) < 0.12)
    doy = ((t_s // 86400) + 244) % 365
    season = 1 + 0.06 * np.sin(2 * np.pi * (doy - 80) / 365.25)
    p = np.clip(user_ctr[u] * cat_mult[cat] * season * np.where(chat, 1.25, 1.0), 0, 1)
    clicked = rng.random(n_imp) < p

    src_names = pa.array(["likes", "follows", "shares", "ai_chat"])
    n_src = np.where(chat, 1 + (rng.random(n_imp) < 0.3), 1 + (rng.random(n_imp) < 0.4)).astype(np.int32)
    first = np.where(chat, 3, rng.integers(0, 2, n_imp))
    second = np.where(chat, 0, 2)
    offsets = np.concatenate([[0], np.cumsum(n_src)]).astype(np.int32)
    vals = np.empty(offsets[-1], dtype=np.int8)
    vals[offsets[:-1]] = first
    two = n_src == 2
    vals[offsets[:-1][two] + 1] = second[two]
    sources = pa.ListArray.from_arrays(pa.array(offsets), pc.take(src_names, pa.array(vals)))
    arm = np.where(excluded, None, np.where(holdout, "holdout", "treatment"))
    table = pa.table(
        {
            "impression_id": pc.binary_join_element_wise("i_", pa.array(np.arange(n_imp).astype(str)), ""),
            "user_id": pa.DictionaryArray.from_arrays(pa.array(u), pa.array(user_ids)).cast(pa.string()),
            "shown_at": pa.array((start + t_s * 10**9).astype("datetime64[ns]"), pa.timestamp("ns", tz="UTC")),
            "ad_category": pa.DictionaryArray.from_arrays(pa.array(cat), pa.array(nodes.astype(str))).cast(pa.string()),
            "clicked": pa.array(clicked),
            "targeting_sources": sources,
            "arm": pa.DictionaryArray.from_arrays(pa.array(u), pa.array(arm.tolist(), pa.string())).cast(pa.string()),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "impressions.parquet")
    pd.DataFrame({"user_id": user_ids, "region": region}).to_parquet(out / "users.parquet", index=False)
    return {"impressions": n_imp, "users": n_users, "chat_targeted": int(chat.sum()), "clicks": int(clicked.sum())}


def analyse(d: Path) -> dict:
    from analysis import impressions
    from analysis.lift.ab import ABTest, Cuped
    from analysis.lift.categories import CategoryLift
    from analysis.lift.did import DiffInDiff, EventStudy, RegionRandomization

    times = {}
    t = time.perf_counter()
    imp = impressions.read_impressions(d / "impressions.parquet")
    users = pd.read_parquet(d / "users.parquet")
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    data = impressions.aggregate(imp, users)
    del imp
    times["aggregate"] = time.perf_counter() - t
    steps = {
        "did": lambda: DiffInDiff().fit(data),
        "event_study": lambda: EventStudy().fit(data),
        "randomization": lambda: RegionRandomization(n_permutations=5000).fit(data),
        "cuped": lambda: Cuped().fit_users(data.per_user(), data.per_user()["included"].to_numpy()),
        "ab": lambda: ABTest(n_permutations=2000).fit(data),
        "categories": lambda: CategoryLift().fit(data),
    }
    res = {}
    for name, f in steps.items():
        t = time.perf_counter()
        res[name] = f()
        times[name] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return {
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "user_weeks": len(data.user_week),
        "did_rel_lift": round(res["did"].rel_lift, 4),
        "did_rel_ci": [round(x, 4) for x in res["did"].rel_ci_delta],
        "cuped_variance_reduction": round(res["cuped"].variance_reduction, 3),
        "ab_rel_lift": round(res["ab"].plain.rel_lift, 4),
        "pretrend_p": round(res["event_study"].pretrend_p, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impressions", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=25_000)
    ap.add_argument("--dir")
    ap.add_argument("--analyse-only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.analyse_only:
        print(json.dumps(analyse(Path(a.analyse_only))))
        return
    d = Path(a.dir or tempfile.mkdtemp(prefix="bench_lift_"))
    t = time.perf_counter()
    info = generate(d, a.impressions, a.users)
    gen_s = time.perf_counter() - t
    r = subprocess.run([sys.executable, __file__, "--analyse-only", str(d)], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    s = res["seconds"]
    print(f"generated {info['impressions']:,} impressions of {info['users']:,} users in {gen_s:.1f} s ({d})")
    print("| impressions | users | user-weeks | read (s) | aggregate (s) | DiD | event study | RI | CUPED | A/B | categories | total (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {info['impressions']:,} | {info['users']:,} | {res['user_weeks']:,} | {s['read']} | {s['aggregate']} | {s['did']} | {s['event_study']} | "
          f"{s['randomization']} | {s['cuped']} | {s['ab']} | {s['categories']} | {s['total']} | {res['peak_rss_gib']} |")
    print({k: v for k, v in res.items() if k not in ("seconds", "peak_rss_gib", "user_weeks")})


if __name__ == "__main__":
    main()
