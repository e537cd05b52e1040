"""Command line: `python -m analysis {simulate,run}`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.batch import run_batch
from analysis.contract.schemas import DataError
from analysis.pipeline import StageFailed, _split_set, run, scan_run_report
from analysis.realchat import simulate_real_to
from analysis.simulate import simulate_to
from analysis.util.privacy import scan_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description="chat-ad-audit: audit chat-based ad personalization")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="generate a synthetic audit world with its ground truth (with --chats: around real chats)")
    s.add_argument("--config", help="world YAML (configs/world/*.yaml)")
    s.add_argument("--chats", help="real conversations (ShareGPT JSON, a ChatGPT export, or a messages table): a real-chat world")
    s.add_argument("--labels", nargs="+", help="hand-label files of those conversations (needed with --chats: they are the world's truth)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a world parameter")

    r = sub.add_parser("run", help="run the stage notebooks with papermill into reports/<run-id>/")
    r.add_argument("--config", default="configs/default.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter (value parsed as YAML)")
    r.add_argument("--stages", nargs="*", help="only these stages (e.g. 00_ingest 01 ...)")
    r.add_argument("--run-id")
    r.add_argument("--reports-dir")
    r.add_argument("--no-progress", action="store_true")

    sc = sub.add_parser("scan-report", help="check a rendered report for PII, small cells, raw text and external resources")
    sc.add_argument("path", nargs="+")
    sc.add_argument("--run-dir", help="the run the report belongs to: also check for its raw transcripts and user ids")
    sc.add_argument("--k", type=int, default=10, help="small-cell threshold (default 10)")

    b = sub.add_parser("batch", help="run a parameter grid in parallel (resumable), with a comparison table")
    b.add_argument("--grid", required=True, help="grid YAML (configs/grid.yaml)")
    b.add_argument("--workers", type=int, default=2)

    a = p.parse_args(argv)
    if a.command == "simulate":
        t0 = time.perf_counter()
        sets = dict(_split_set(x) for x in a.set)
        if a.chats:
            if not a.labels:
                p.error("--chats needs --labels: the hand labels are the real-chat world's truth")
            try:
                world = simulate_real_to(a.chats, a.labels, a.out, a.config, sets)
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        else:
            world = simulate_to(a.config, a.out, sets)
        c = world.ground_truth["counts"]
        print(
            f"world written to {a.out}: {c['users']:,} users, {c['conversations']:,} conversations, "
            f"{len(world.messages):,} messages, {c['impressions']:,} impressions "
            f"(generated in {world.ground_truth['generation_seconds']} s, written in {time.perf_counter() - t0:.1f} s)"
        )
        return 0
    if a.command == "run":
        try:
            res = run(a.config, a.set, stages=a.stages, run_id=a.run_id, reports_dir=a.reports_dir, progress=not a.no_progress)
        except (ValueError, StageFailed, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not res.ok:
            print(f"run {res.run_id} FAILED: {res.error}", file=sys.stderr)
            return 1
        final = next((s["html"] for s in reversed(res.stages) if s.get("html")), None)
        print(f"run {res.run_id} completed; report: {res.run_dir / final if final else res.run_dir} (also reports/latest/)")
        return 0
    if a.command == "batch":
        res = run_batch(a.grid, workers=a.workers)
        print(res.to_markdown())
        return 1 if res.n_failed else 0
    if a.command == "scan-report":
        bad = 0
        for path in a.path:
            res = scan_run_report(Path(path), Path(a.run_dir), k=a.k) if a.run_dir else scan_report(path, k=a.k)
            print(res.to_markdown())
            bad += not res.ok
        return 1 if bad else 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
