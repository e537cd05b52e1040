"""Compare two runs' key figures: `python bench/compare_metrics.py OLD NEW [--rtol 1e-9]`.

OLD and NEW are run folders (reports/<run-id>) or folders of `metrics/<stage>.json` files. Records
are matched by (stage, metric, group); estimate, ci_low, ci_high, truth and n must agree to `rtol`
(relative) — timings (`seconds`, `docs_per_second`) and the embedding-cache counts, which depend on
the machine and the cache, are listed apart and never count as differences. Exit code 1 if any
record differs or exists on one side only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FIELDS = ("estimate", "ci_low", "ci_high", "truth", "n")
VOLATILE = {"seconds", "docs_per_second", "embeddings_computed", "embeddings_cached"}


def load(folder: Path) -> dict:
    d = folder / "metrics" if (folder / "metrics").is_dir() else folder
    out = {}
    for p in sorted(d.glob("*.json")):
        for rec in json.loads(p.read_text()):
            key = (p.stem, rec["metric"], json.dumps(rec.get("group") or {}, sort_keys=True))
            if key in out:  # the same metric and group twice in a stage: keep them apart by order
                key = key + (sum(k[:3] == key for k in out),)
            out[key] = rec
    return out


def same(a, b, rtol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def compare(old: dict, new: dict, rtol: float) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new), key=str):
        stage, metric, group = key[:3]
        if metric in VOLATILE:
            continue
        where = f"{stage} {metric} {group}"
        if key not in new:
            diffs.append(f"only in OLD: {where} = {old[key].get('estimate')}")
        elif key not in old:
            diffs.append(f"only in NEW: {where} = {new[key].get('estimate')}")
        else:
            bad = [f"{f}: {old[key].get(f)} -> {new[key].get(f)}" for f in FIELDS if not same(old[key].get(f), new[key].get(f), rtol)]
            if bad:
                diffs.append(f"{where}: " + "; ".join(bad))
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rtol", type=float, default=1e-9)
    a = p.parse_args(argv)
    old, new = load(a.old), load(a.new)
    diffs = compare(old, new, a.rtol)
    n = sum(1 for k in set(old) & set(new) if k[1] not in VOLATILE)
    for d in diffs:
        print(d)
    print(f"{n} records compared ({len(old)} old, {len(new)} new; timings and cache counts skipped): {len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
