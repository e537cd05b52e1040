"""Benchmark: time and peak memory to generate and write the default world.

    .venv/bin/python bench/simulate.py [--config configs/world/default.yaml] [--out /tmp/bench_world]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from analysis.simulate import WorldConfig, simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/world/default.yaml")
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = WorldConfig.from_yaml(a.config)
    t0 = time.perf_counter()
    world = simulate(cfg)
    t1 = time.perf_counter()
    out = a.out or tempfile.mkdtemp(prefix="bench_world_")
    world.write(out)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    c = world.ground_truth["counts"]
    print("| users | conversations | messages | impressions | generate (s) | write (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {c['users']:,} | {c['conversations']:,} | {len(world.messages):,} | {c['impressions']:,} | {t1 - t0:.1f} | {t2 - t1:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
