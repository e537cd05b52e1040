"""What a static -> MiniLM cascade and int8 MiniLM would buy (issue 15, speed), measured on the gold set.

    .venv/bin/python bench/detector_cascade.py

1. Cascade: stage A = the detector's heads on the *static* backend's features, stage B = the same
   heads on MiniLM features (the shipped design), both refitted per fold of the train split (5
   folds grouped by chat) and calibrated/thresholded as shipped (`bench/detector_finetune.py`).
   A conversation goes to MiniLM only if a stage-A score clears its category's cut; the cut keeps
   a share r of stage B's out-of-fold *true-positive flags* on train. Printed: the share of
   conversations that would need MiniLM (train, and its random stratum = the corpus), the B flags
   lost on train, and on the frozen TEST split the cascade's macro-F1(4) beside stage B alone.
2. int8: MiniLM with `torch.ao.quantization.quantize_dynamic` on its Linear layers vs fp32 on 512
   random gold segments (one torch thread): segments/s and the cosine between the two vectors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data" / "labels"))

SHARES = (0.9, 0.95, 0.98)


def main() -> None:
    import fit_defaults
    import torch
    from detector_finetune import FOUR, SEED, calibrate, lr_oof

    from analysis.contract.art9 import ART9, label_matrix
    from analysis.detector.evaluation import evaluate_detector
    from analysis.detector.model import REAL_CHAT_FITTING, _head_matrix

    torch.set_num_threads(1)
    lab = fit_defaults.load_labels()
    docs = fit_defaults.load_documents(lab).tolist()
    Y = label_matrix(lab["art9"], ART9).astype(np.float32)
    tr = (lab["split"] == "train").to_numpy()
    trn, tst = np.flatnonzero(tr), np.flatnonzero(~tr)
    folds = np.full(len(lab), -1)
    folds[tr] = fit_defaults.grouped_folds(lab[tr].reset_index(drop=True))
    z = {}
    for be in ("static", "minilm"):
        det = fit_defaults.detector_to_fit(be)  # only its features are read: unfitted params for `static`, which has no entry
        H = _head_matrix(det.features(docs, head=False, vote=False), det.cats)  # the session-5 study: segments, lexicon, prototypes
        z[be], fit = lr_oof(H, Y, folds, trn, REAL_CHAT_FITTING.head_C, SEED)
        z[be][tst] = fit(tst)
    cal = {be: calibrate(z[be][trn], Y[trn]) for be in z}

    def scored(be):
        from analysis.detector.model import _platt

        s, f = np.zeros_like(z[be]), np.zeros(z[be].shape, dtype=bool)
        for j, (ab, t) in cal[be].items():
            s[:, j] = _platt(ab, 1 / (1 + np.exp(-z[be][:, j])))
            f[:, j] = s[:, j] >= t
        return s, f

    sa, _ = scored("static")
    _, fb = scored("minilm")
    rnd = tr & (lab["stratum"] == "random").to_numpy()
    lte = lab["art9"].iloc[tst].reset_index(drop=True)

    def macro(f):
        v = evaluate_detector(pd.DataFrame(f[tst], columns=list(ART9)), lte).per_category.set_index("category")
        return v.loc[list(FOUR), "f1"].fillna(0).mean(), v

    base, _ = macro(fb)
    print(f"stage B alone (MiniLM heads refitted on train): TEST macro-F1(4) {base:.3f}")
    print("| keep share of B's train TP flags | MiniLM needed: train | random stratum (corpus) | B TP flags lost on train (4 cats) | TEST macro-F1(4) | TEST B flags dropped |")
    for r in SHARES:
        cand = np.zeros(len(lab), dtype=bool)
        for j in cal["minilm"]:
            tp = fb[trn, j] & (Y[trn, j] > 0)
            if tp.any():
                cand |= sa[:, j] >= np.quantile(sa[trn][tp, j], 1 - r)
        lost = {c: int((fb[trn, ART9.index(c)] & (Y[trn, ART9.index(c)] > 0) & ~cand[trn]).sum()) for c in FOUR}
        fc = fb & cand[:, None]
        m, _ = macro(fc)
        print(f"| {r} | {cand[trn].mean():.3f} | {cand[rnd].mean():.3f} | {lost} | {m:.3f} | {int((fb[tst] & ~fc[tst]).sum())} of {int(fb[tst].sum())} |")

    # int8 dynamic quantization of MiniLM's Linear layers
    from sentence_transformers import SentenceTransformer

    from analysis.detector.text import segments
    from analysis.util.embeddings import minilm_path

    flat = [s for t in docs for s in segments(t)]
    sample = [flat[i] for i in np.random.default_rng(SEED).choice(len(flat), 512, replace=False)]
    st = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    q = torch.ao.quantization.quantize_dynamic(st, {torch.nn.Linear}, dtype=torch.qint8)
    out = {}
    for name, m in (("fp32", st), ("int8", q)):
        t = time.perf_counter()
        out[name] = m.encode(sample, batch_size=64, normalize_embeddings=True)
        print(f"MiniLM {name}: {len(sample) / (time.perf_counter() - t):.1f} segments/s (1 thread)")
    cos = (out["fp32"] * out["int8"]).sum(1)
    print(f"cosine int8 vs fp32: mean {cos.mean():.4f}, min {cos.min():.4f}")


if __name__ == "__main__":
    main()
