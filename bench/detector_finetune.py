"""Trained-for-the-task candidates vs the shipped detector, on the gold set (issue 15).

    .venv/bin/python bench/detector_finetune.py --no-test  # train-split CV (and the hold-out for d) only
    .venv/bin/python bench/detector_finetune.py            # ... then the frozen TEST table
    .venv/bin/python bench/detector_finetune.py --candidates b,d,c   # a subset (b, e, c, c', d)

Candidates, all fitted on the TRAIN split only (gold train + older labels, `fit_defaults.load_labels`),
with 5 folds grouped by ShareGPT chat (`fit_defaults.grouped_folds`, seeded):

- (b)  the shipped detector (frozen MiniLM segment vectors mean/max-pooled + prototype and lexicon
       features, per-category L2 logistic heads): `analysis/data/detector_default.json` as it is;
       its train-CV figures come from the same heads refitted per fold.
- (c)  a trained multiple-instance head over frozen MiniLM segment vectors: every segment through a
       small MLP (384 -> 64, ReLU), mean- and max-pooled over the conversation, plus the lexicon
       counts, into one multi-label linear layer (BCE, positive weight sqrt(neg/pos) <= 10, AdamW).
- (c') the distilled MiniLM (the Model2Vec static model of `analysis.util.embeddings`) fine-tuned
       for the task: a trained weight per vocabulary token (the segment vector is the token-weighted
       mean of the static embeddings) and a trained residual 256x256 map, pooled and headed as (c).
- (d)  MiniLM itself fine-tuned: its top transformer layer (`TOP`) trained together with (c)'s head
       over the hidden states of the 5 frozen lower layers, computed once per segment and cached
       (`lower_states`); the head is first warm-started on the frozen vectors (as (c)), then layer
       and head train together (`TOP_FIT`). Too slow for 5 folds here, so a hold-out: fitted on
       train folds 1-4, the epoch chosen and the calibration/thresholds fitted on train fold 0, and
       the other candidates are shown on that same fold (their fold-0 models saw the same rows).
- (e)  a logistic regression on frozen MiniLM embeddings alone (segment vectors mean+max-pooled).
- (b+c) the mean of (b)'s and (c)'s calibrated probabilities (each calibration fitted on the other
       folds), calibrated and thresholded again.

Epochs and learning rate of (c)/(c') are chosen by train-CV mean average precision over health,
religion, politics and ethnicity (threshold-free, so not at the mercy of one threshold); every
candidate is Platt-calibrated on its out-of-fold scores and thresholded like the shipped detector
(`REAL_CHAT_FITTING`: highest F1 among cuts with out-of-fold precision >= 0.80 that keep >= 25% of
the positives, else max F1); `RULES` are compared nested (calibration and cut
fitted on four folds' out-of-fold scores, judged on the fifth). Categories with fewer than 20
training positives (philosophical beliefs, trade union) keep the shipped lexicon rule in every
candidate. The candidate to ship is chosen on the train split (`--no-test`) before the test split
is scored; candidates' logits are kept in `--work-dir`, so the test run refits nothing.
Seeded; torch at one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data" / "labels"))

FOUR = ("health", "religion", "politics", "ethnicity")
SEED = 20261130
MIL_GRID = {"lr": [0.003], "epochs": 15}
STATIC_GRID = {"lr": [0.003, 0.02], "epochs": 8}
TOP = 1  # (d): MiniLM layers fine-tuned; the lower ones are frozen and their output cached
TOP_FIT = {"head_epochs": 13, "head_lr": 0.003, "ft_epochs": 3, "layer_lr": 5e-5, "ft_head_lr": 0.001}


# ------------------------------------------------------------------------------------ data


def gold_arrays(cache_dir: str | None):
    """Labels, documents, segments, MiniLM segment vectors, static token ids, lexicon counts, folds."""
    import fit_defaults

    from analysis.contract.art9 import ART9, label_matrix
    from analysis.detector.features import LexiconDetector
    from analysis.detector.text import segments
    from analysis.util.embeddings import embed

    lab = fit_defaults.load_labels()
    docs = fit_defaults.load_documents(lab).tolist()
    segs = [segments(t) for t in docs]
    flat = [s for ss in segs for s in ss]
    owner = np.repeat(np.arange(len(segs)), [len(s) for s in segs])
    V = embed(flat, "minilm", cache_dir=cache_dir)
    tok = _static_tokenizer(cache_dir)
    ids = [e.ids[:512] for e in tok.encode_batch(flat, add_special_tokens=False)]
    lex = LexiconDetector().counts(docs)
    tr = (lab["split"] == "train").to_numpy()
    folds = np.full(len(lab), -1)
    folds[tr] = fit_defaults.grouped_folds(lab[tr].reset_index(drop=True))
    return dict(lab=lab, docs=docs, flat=flat, owner=owner, V=V, tok_ids=ids, lex=lex, folds=folds,
                Y=label_matrix(lab["art9"], ART9).astype(np.float32), cats=list(ART9))


def _static_dir(cache_dir):
    from analysis.util.embeddings import default_cache_dir, project_cache_dir, static_model_path

    for d in (cache_dir, default_cache_dir(), project_cache_dir()):
        if d and (static_model_path(d) / "model.safetensors").exists():
            return static_model_path(d)
    raise FileNotFoundError("no distilled static model: run `make setup` (or embed once with backend 'static')")


def _static_tokenizer(cache_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_static_dir(cache_dir) / "tokenizer.json"))


def _static_table(cache_dir):
    from safetensors.numpy import load_file

    return load_file(str(_static_dir(cache_dir) / "model.safetensors"))["embeddings"].astype(np.float32)


# ------------------------------------------------------------------------------- the models


def build(D, cache_dir):
    """Torch modules over the gold arrays (closures keep the data out of the parameters)."""
    import torch
    import torch.nn as nn

    n = len(D["lab"])
    owner = D["owner"]
    starts, ends = np.searchsorted(owner, np.arange(n)), np.searchsorted(owner, np.arange(n), side="right")
    LEX = torch.tensor(np.log1p(D["lex"].to_numpy(dtype=np.float32)))
    V = torch.tensor(np.asarray(D["V"], dtype=np.float32))
    tok = D["tok_ids"]
    m_out = len(D["cats"])

    def seg_index(convs):
        segs = np.concatenate([np.arange(starts[c], ends[c]) for c in convs])
        own = np.repeat(np.arange(len(convs)), [ends[c] - starts[c] for c in convs])
        return torch.tensor(segs, dtype=torch.long), torch.tensor(own, dtype=torch.long)

    def pool(h, own, k):
        d = h.shape[1]
        cnt = torch.bincount(own, minlength=k).clamp(min=1)[:, None].float()
        mean = torch.zeros(k, d).index_add_(0, own, h) / cnt
        mx = torch.full((k, d), -1e4).scatter_reduce(0, own[:, None].expand(-1, d), h, reduce="amax", include_self=True)
        return mean, torch.where(mx < -1e3, torch.zeros_like(mx), mx)  # a conversation without segments: zeros

    class MIL(nn.Module):
        def __init__(self, hid=64, drop=0.2):
            super().__init__()
            self.f = nn.Sequential(nn.Dropout(drop), nn.Linear(V.shape[1], hid), nn.ReLU())
            self.out, self.drop = nn.Linear(2 * hid + LEX.shape[1], m_out), nn.Dropout(drop)

        def forward(self, convs):
            si, own = seg_index(convs)
            mean, mx = pool(self.f(V[si]), own, len(convs))
            return self.out(self.drop(torch.cat([mean, mx, LEX[convs]], 1)))

    E = torch.tensor(_static_table(cache_dir))

    class StaticFT(nn.Module):
        def __init__(self, drop=0.2):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(E.shape[0]))  # log token weight, 0 = the distilled model's mean
            self.A = nn.Parameter(torch.zeros(E.shape[1], E.shape[1]))  # residual map, 0 = identity
            self.out, self.drop = nn.Linear(2 * E.shape[1] + LEX.shape[1], m_out), nn.Dropout(drop)

        def forward(self, convs):
            si, own = seg_index(convs)
            ids = [tok[i] for i in si.tolist()]
            flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
            off = torch.tensor(np.r_[0, np.cumsum([len(x) for x in ids])[:-1]], dtype=torch.long)
            ww = torch.exp(self.w[flat])
            num = nn.functional.embedding_bag(flat, E, off, mode="sum", per_sample_weights=ww)
            den = nn.functional.embedding_bag(flat, torch.ones(E.shape[0], 1), off, mode="sum", per_sample_weights=ww)
            h = num / den.clamp(min=1e-6)
            h = nn.functional.normalize(h + h @ self.A, dim=-1)
            mean, mx = pool(h, own, len(convs))
            return self.out(self.drop(torch.cat([mean, mx, LEX[convs]], 1)))

    return {"mil": MIL, "static": StaticFT}


# ------------------------------------------------------------- (d) MiniLM's top layer fine-tuned


def lower_states(flat: list[str], cache_dir: Path, top: int = TOP, bs: int = 64):
    """Hidden states after MiniLM's lower 6 - `top` layers for every segment: (fp16 token states
    concatenated, offsets, lengths), cached on disk keyed by the segments' text and `top`. These
    layers stay frozen, so they run once (the bulk of the cost), not once per epoch."""
    import hashlib

    import torch
    from transformers import AutoModel, AutoTokenizer

    from analysis.util.embeddings import minilm_path

    key = hashlib.sha1(("\x00".join(flat) + f"|top{top}").encode()).hexdigest()[:16]
    f = Path(cache_dir) / f"minilm_lower_{key}.npz"
    if f.exists():
        z = np.load(f)
        return z["H"], z["off"], z["lens"]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    nl = len(model.encoder.layer)
    enc = tok(flat, truncation=True, max_length=256)["input_ids"]  # max_seq_length of the sentence-transformers config
    lens = np.array([len(x) for x in enc])
    off = np.r_[0, np.cumsum(lens)[:-1]]
    H = np.zeros((int(lens.sum()), model.config.hidden_size), dtype=np.float16)
    order = np.argsort(-lens, kind="stable")  # length buckets: little padding
    t0 = time.time()
    with torch.inference_mode():
        for b in range(0, len(flat), bs):
            ix = order[b:b + bs]
            L = lens[ix].max()
            ids = torch.zeros((len(ix), L), dtype=torch.long)
            am = torch.zeros((len(ix), L))
            for r, i in enumerate(ix):
                ids[r, :lens[i]] = torch.tensor(enc[i])
                am[r, :lens[i]] = 1
            h = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            add = (1.0 - am[:, None, None, :]) * torch.finfo(torch.float32).min
            for layer in model.encoder.layer[: nl - top]:
                h = layer(h, attention_mask=add)
                h = h[0] if isinstance(h, tuple) else h
            for r, i in enumerate(ix):
                H[off[i]:off[i] + lens[i]] = h[r, :lens[i]].numpy().astype(np.float16)
            if (b // bs) % 100 == 0:
                print(f"  lower layers: {b + len(ix)}/{len(flat)} segments, {time.time() - t0:.0f} s", flush=True)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.stem + ".tmp.npz")
    np.savez(tmp, H=H, off=off, lens=lens)
    tmp.rename(f)
    return H, off, lens


def build_top(D, states, top: int = TOP):
    """(d): MiniLM's top `top` layers (trainable copies) over the cached lower states, mean-pooled over
    tokens and normalized (as all-MiniLM-L6-v2 makes a sentence vector), then (c)'s head: MLP per
    segment, mean/max over the conversation, lexicon counts, one multi-label linear layer. With
    `frozen=True` the segment vectors are the cached frozen MiniLM vectors (the head's warm start)."""
    import copy

    import torch
    import torch.nn as nn
    from transformers import AutoModel

    from analysis.util.embeddings import minilm_path

    H, off, lens = states
    n = len(D["lab"])
    owner = D["owner"]
    starts, ends = np.searchsorted(owner, np.arange(n)), np.searchsorted(owner, np.arange(n), side="right")
    LEX = torch.tensor(np.log1p(D["lex"].to_numpy(dtype=np.float32)))
    V = torch.tensor(np.asarray(D["V"], dtype=np.float32))
    base = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager")
    top_layers = base.encoder.layer[len(base.encoder.layer) - top:]
    m_out = len(D["cats"])

    def seg_vectors(layers, segs, chunk=64):
        parts = []
        order = np.argsort(-lens[segs], kind="stable")
        for b in range(0, len(segs), chunk):
            ix = order[b:b + chunk]
            L = int(lens[segs[ix]].max())
            h = torch.zeros(len(ix), L, H.shape[1])
            am = torch.zeros(len(ix), L)
            for r, s in enumerate(segs[ix]):
                h[r, :lens[s]] = torch.from_numpy(H[off[s]:off[s] + lens[s]].astype(np.float32))
                am[r, :lens[s]] = 1
            add = (1.0 - am[:, None, None, :]) * torch.finfo(torch.float32).min
            for layer in layers:
                h = layer(h, attention_mask=add)
                h = h[0] if isinstance(h, tuple) else h
            v = (h * am[..., None]).sum(1) / am.sum(1, keepdim=True)
            parts.append(nn.functional.normalize(v, dim=-1))
        return torch.cat(parts)[torch.from_numpy(np.argsort(order))]

    class TopMIL(nn.Module):
        def __init__(self, hid=64, drop=0.2):
            super().__init__()
            self.f = nn.Sequential(nn.Dropout(drop), nn.Linear(V.shape[1], hid), nn.ReLU())
            self.out, self.drop = nn.Linear(2 * hid + LEX.shape[1], m_out), nn.Dropout(drop)
            self.layers = copy.deepcopy(top_layers)
            self.frozen = True

        def forward(self, convs):
            segs = np.concatenate([np.arange(starts[c], ends[c]) for c in convs])
            own = torch.tensor(np.repeat(np.arange(len(convs)), [ends[c] - starts[c] for c in convs]), dtype=torch.long)
            v = V[torch.tensor(segs)] if self.frozen else seg_vectors(self.layers, segs)
            h = self.f(v)
            d, k = h.shape[1], len(convs)
            cnt = torch.bincount(own, minlength=k).clamp(min=1)[:, None].float()
            mean = torch.zeros(k, d).index_add_(0, own, h) / cnt
            mx = torch.full((k, d), -1e4).scatter_reduce(0, own[:, None].expand(-1, d), h, reduce="amax", include_self=True)
            mx = torch.where(mx < -1e3, torch.zeros_like(mx), mx)
            return self.out(self.drop(torch.cat([mean, mx, LEX[convs]], 1)))

    return TopMIL


def train_top(TopMIL, Y, tr, eval_sets, *, seed, head_epochs, ft_epochs, head_lr, layer_lr, ft_head_lr, bs=32, wd=0.01):
    """Head warm start on the frozen vectors (`head_epochs`, as (c)), then the top layer and the head
    trained together (`ft_epochs`): logits of every `eval_sets` array after the warm start and after
    each fine-tuning epoch ([epoch][set]), and the model's state after each."""
    import copy

    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = TopMIL()
    y = torch.tensor(Y[tr])
    pos = y.sum(0)
    lossf = nn.BCEWithLogitsLoss(pos_weight=((len(y) - pos) / pos.clamp(min=1)).sqrt().clamp(max=10))
    for p in m.layers.parameters():
        p.requires_grad_(False)
    head = [p for n_, p in m.named_parameters() if not n_.startswith("layers.")]

    def epoch(opt):
        m.train()
        t0 = time.time()
        idx = rng.permutation(len(tr))
        for b in range(0, len(idx), bs):
            bi = tr[idx[b:b + bs]]
            loss = lossf(m(bi), torch.tensor(Y[bi]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.time() - t0

    def evaluate():
        m.eval()
        with torch.no_grad():
            return [torch.cat([m(es[b:b + 128]) for b in range(0, len(es), 128)]).numpy() for es in eval_sets]

    opt = torch.optim.AdamW(head, lr=head_lr, weight_decay=wd)
    for _ in range(head_epochs):
        epoch(opt)
    m.frozen = False
    outs, states = [evaluate()], [copy.deepcopy(m.state_dict())]
    for p in m.layers.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(m.layers.parameters()), "lr": layer_lr}, {"params": head, "lr": ft_head_lr}], weight_decay=wd)
    for e in range(ft_epochs):
        dt = epoch(opt)
        outs.append(evaluate())
        states.append(copy.deepcopy(m.state_dict()))
        print(f"  (d) fine-tuning epoch {e + 1}: {dt:.0f} s", flush=True)
    return m, outs, states


def train(make, Y, tr, *, epochs, lr, seed, eval_sets=(), bs=32, wd=0.01):
    """Fit on rows `tr`; logits of every `eval_sets` array after each epoch: [epoch][set]."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = make()
    y = torch.tensor(Y[tr])
    pos = y.sum(0)
    pw = ((len(y) - pos) / pos.clamp(min=1)).sqrt().clamp(max=10)  # rare categories count more, not fully balanced
    lossf = nn.BCEWithLogitsLoss(pos_weight=pw)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    outs = []
    for _ in range(epochs):
        m.train()
        idx = rng.permutation(len(tr))
        for b in range(0, len(idx), bs):
            bi = tr[idx[b:b + bs]]
            loss = lossf(m(bi), torch.tensor(Y[bi]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            outs.append([torch.cat([m(es[b:b + 256]) for b in range(0, len(es), 256)]).numpy() for es in eval_sets])
    return m, outs


# ---------------------------------------------------------------------------- calibration etc.


def mean_ap(z, Y, cats):
    from sklearn.metrics import average_precision_score

    return float(np.mean([average_precision_score(Y[:, cats.index(c)], z[:, cats.index(c)]) for c in FOUR]))


def calibrate(oof_z, Y, min_pos=20):
    """Per category (>= min_pos positives): Platt [a, b] on out-of-fold probabilities and the threshold."""
    from analysis.detector.model import REAL_CHAT_FITTING, _fit_platt, _platt, choose_threshold

    out = {}
    for j in range(Y.shape[1]):
        if Y[:, j].sum() < min_pos:
            continue
        p = 1 / (1 + np.exp(-oof_z[:, j]))
        ab = _fit_platt(p, Y[:, j])
        out[j] = (ab, choose_threshold(_platt(ab, p), Y[:, j].astype(bool), min_precision=REAL_CHAT_FITTING.min_precision,
                                       min_recall=REAL_CHAT_FITTING.min_recall))
    return out


def apply(z, cal, rule_scores, rule_flags):
    """Calibrated scores and flags; categories without a calibration take the shipped rule's."""
    from analysis.detector.model import _platt

    s, f = rule_scores.copy(), rule_flags.copy()
    for j, (ab, t) in cal.items():
        s[:, j] = _platt(ab, 1 / (1 + np.exp(-z[:, j])))
        f[:, j] = s[:, j] >= t
    return s, f


def lr_oof(X, Y, folds, rows, C, seed):
    """(out-of-fold decision values on `rows`, a fit on all `rows`) of per-category L2 logistic regressions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def fit(tr):
        sc = StandardScaler().fit(X[tr])
        ms = {j: LogisticRegression(C=C, max_iter=3000, class_weight="balanced", random_state=seed).fit(sc.transform(X[tr]), Y[tr, j])
              for j in range(Y.shape[1]) if Y[tr, j].sum() >= 5}
        return lambda ix: np.column_stack([ms[j].decision_function(sc.transform(X[ix])) if j in ms else np.full(len(ix), -20.0)
                                           for j in range(Y.shape[1])])

    oof = np.zeros((len(X), Y.shape[1]))
    for k in np.unique(folds[rows]):
        te, tr = rows[folds[rows] == k], rows[folds[rows] != k]
        oof[te] = fit(tr)(te)
    return oof, fit(rows)


def pooled(V, owner, n):
    d = V.shape[1]
    cnt = np.maximum(np.bincount(owner, minlength=n), 1)[:, None]
    mean = np.zeros((n, d))
    np.add.at(mean, owner, V)
    mx = np.full((n, d), -np.inf)
    np.maximum.at(mx, owner, V)
    return np.hstack([mean / cnt, np.where(np.isfinite(mx), mx, 0.0)])


RULES = ("previous: max F1 at OOF precision >= 0.80, else max F1", "max F1", "shipped: precision >= 0.80 with recall >= 0.25, else max F1",
         "smoothed: expected P/R from calibrated scores")


def threshold_by(rule: str, s: np.ndarray, y: np.ndarray) -> float:
    """A cut on calibrated scores `s` by one of RULES (the third is what `REAL_CHAT_FITTING` ships)."""
    from analysis.detector.model import choose_threshold

    if rule == RULES[0]:
        return choose_threshold(s, y, min_precision=0.8)
    if rule == RULES[1]:
        return choose_threshold(s, y)
    if rule == RULES[2]:
        return choose_threshold(s, y, min_precision=0.8, min_recall=0.25)
    # smoothed: a calibrated score is P(y | x), so the expected precision of `s >= t` is the mean score above
    # t and the expected recall the share of the score mass above t: a smooth curve, not the sample's steps
    ss = np.sort(s)[::-1]
    cum = np.cumsum(ss)
    ep, er = cum / np.arange(1, len(ss) + 1), cum / cum[-1]
    f = 2 * ep * er / np.maximum(ep + er, 1e-12)
    ok = ep >= 0.8
    k = int(np.argmax(np.where(ok, f, -1))) if ok.any() else int(np.argmax(f))
    return float((ss[k] + ss[k + 1]) / 2) if k + 1 < len(ss) else float(ss[k] - 1e-9)


def nested_flags(oof_z, Y, folds, rows, rule, min_pos=20):
    """Flags of every row in `rows` from a Platt calibration and a threshold (`rule`) fitted on the
    other folds' out-of-fold scores: how a threshold rule carries to conversations it was not chosen on."""
    from analysis.detector.model import _fit_platt, _platt

    F = np.zeros((len(rows), Y.shape[1]), dtype=bool)
    for j in range(Y.shape[1]):
        if Y[rows, j].sum() < min_pos:
            continue
        p = 1 / (1 + np.exp(-oof_z[rows, j]))
        for k in np.unique(folds[rows]):
            fit, app = folds[rows] != k, folds[rows] == k
            ab = _fit_platt(p[fit], Y[rows[fit], j])
            sc = _platt(ab, p[fit])
            t = threshold_by(rule, sc, Y[rows[fit], j].astype(bool))
            F[app, j] = _platt(ab, p[app]) >= t
    return F


def boot_diff(a_fn, b_fn, groups, n_boot=1000, seed=SEED):
    """95% bootstrap CI (resampling ShareGPT chats) of a_fn(ix) - b_fn(ix)."""
    rng = np.random.default_rng(seed)
    g = pd.factorize(groups)[0]
    members = [np.flatnonzero(g == k) for k in range(g.max() + 1)]
    d = []
    for _ in range(n_boot):
        ix = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        d.append(a_fn(ix) - b_fn(ix))
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def macro_f1_of(F, Y, cats):
    tp = (F & (Y > 0)).sum(0)
    d = F.sum(0) + (Y > 0).sum(0)
    return float(np.mean([2 * tp[cats.index(c)] / d[cats.index(c)] if d[cats.index(c)] else 0.0 for c in FOUR]))


def main() -> None:
    import torch

    from analysis.detector.evaluation import evaluate_detector
    from analysis.detector.model import REAL_CHAT_FITTING, SensitiveDetector, _head_matrix
    from analysis.util.embeddings import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-test", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default $CHAT_AD_AUDIT_CACHE)")
    ap.add_argument("--candidates", default="b,e,c,c',d", help="comma-separated: b, e, c, c', d")
    ap.add_argument("--work-dir", default=None, help="where candidates' out-of-fold / test logits and (d)'s cached "
                    "lower-layer states are kept (default <embedding cache>/detector_finetune)")
    a = ap.parse_args()
    want = set(a.candidates.split(","))
    work = Path(a.work_dir or Path(a.cache_dir or default_cache_dir()) / "detector_finetune")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()
    D = gold_arrays(a.cache_dir)
    lab, Y, folds, cats = D["lab"], D["Y"], D["folds"], D["cats"]
    n = len(lab)
    trn, tst = np.flatnonzero(folds >= 0), np.flatnonzero(folds < 0)
    print(f"{n} labeled conversations: train {len(trn)}, test {len(tst)}; {len(D['V'])} segments ({time.time() - t0:.0f} s)", flush=True)

    # the shipped detector's features, scores (as shipped) and its rule-based categories
    det = SensitiveDetector(backend="minilm", cache_dir=a.cache_dir, fitting=REAL_CHAT_FITTING)
    # as the shipped params read them: head, first reply and the neighbour vote (own chat's pool rows left out)
    import fit_defaults
    feats = det.features(D["docs"], fit_defaults.load_replies(lab), ids=lab["conversation_id"])
    shipped = det.detect(D["docs"], lab["conversation_id"], features=feats)
    rule_s, rule_f = shipped.scores.to_numpy(), shipped.flags.to_numpy()

    def cached(tag, fn):
        """(out-of-fold logits on train rows, test logits) of a candidate, kept in `work` (seeded, so a
        rerun would give the same arrays)."""
        f = work / f"logits_{tag}.npz"
        if f.exists():
            z = np.load(f)
            return z["oof"], z["test"]
        oof, te = fn()
        np.savez(f, oof=oof, test=te)
        return oof, te

    NAMES = {"b": "(b) shipped: frozen MiniLM + prototype/lexicon features, logistic heads",
             "e": "(e) LR on frozen MiniLM embeddings (mean+max)",
             "c": "(c) trained MIL head on frozen MiniLM segments",
             "c'": "(c') fine-tuned distilled MiniLM (static token weights + map)",
             "b+c": "(b+c) mean of (b)'s and (c)'s calibrated probabilities",
             "d": f"(d) MiniLM's top {TOP} layer fine-tuned + (c)'s head"}
    cv, test_z, cal = {}, {}, {}

    def run_b():
        oof, _ = lr_oof(_head_matrix(feats, cats), Y, folds, trn, REAL_CHAT_FITTING.head_C, SEED)
        return oof, np.full((len(tst), len(cats)), np.nan)  # test: the shipped params, below

    def run_e():
        P = pooled(np.asarray(D["V"], dtype=np.float64), D["owner"], n)
        oof, fit_e = lr_oof(P, Y, folds, trn, 0.01, SEED)
        return oof, fit_e(tst)

    def run_trained(kind, grid):
        models = build(D, a.cache_dir)
        best = None
        for lr in grid["lr"]:
            oof = np.zeros((grid["epochs"], n, len(cats)))
            for k in range(5):
                te, tr = trn[folds[trn] == k], trn[folds[trn] != k]
                _, outs = train(models[kind], Y, tr, epochs=grid["epochs"], lr=lr, seed=SEED + k, eval_sets=(te,))
                for e in range(grid["epochs"]):
                    oof[e, te] = outs[e][0]
            for e in range(grid["epochs"]):
                m = mean_ap(oof[e, trn], Y[trn], cats)
                print(f"  {kind} lr {lr} epoch {e + 1}: train-CV mAP(4) {m:.3f}", flush=True)
                if best is None or m > best[0]:
                    best = (m, lr, e + 1, oof[e])
        _, lr, ep, oof = best
        print(f"{kind}: chosen lr {lr}, {ep} epochs ({time.time() - t0:.0f} s)", flush=True)
        _, outs = train(models[kind], Y, trn, epochs=ep, lr=lr, seed=SEED, eval_sets=(tst,))
        return oof, outs[-1][0]

    def run_d():
        """Hold-out protocol (the fine-tuning is too slow for 5 folds here): fitted on train folds 1-4,
        epochs chosen and calibrated on train fold 0; the test split scored by that model."""
        t1 = time.time()
        states = lower_states(D["flat"], work)
        print(f"  (d) lower-layer states of {len(D['flat'])} segments: {time.time() - t1:.0f} s", flush=True)
        TopMIL = build_top(D, states)
        ho, tr = trn[folds[trn] == 0], trn[folds[trn] != 0]
        _, outs, states_ = train_top(TopMIL, Y, tr, (ho,), seed=SEED, **TOP_FIT)
        maps = [mean_ap(o[0], Y[ho], cats) for o in outs]
        for e, m in enumerate(maps):
            print(f"  (d) after {'the head warm start' if e == 0 else f'fine-tuning epoch {e}'}: hold-out (train fold 0) mAP(4) {m:.3f}", flush=True)
        e = int(np.argmax(maps))
        oof = np.full((n, len(cats)), np.nan)
        oof[ho] = outs[e][0]
        m = TopMIL()
        m.load_state_dict(states_[e])
        m.frozen = False
        m.eval()
        with torch.no_grad():
            te = torch.cat([m(tst[b:b + 128]) for b in range(0, len(tst), 128)]).numpy()
        np.save(work / "d_epoch.npy", np.array([e]))
        torch.save(states_[e], work / "d_state.pt")
        return oof, te

    runs = {"b": run_b, "e": run_e, "c": lambda: run_trained("mil", MIL_GRID), "c'": lambda: run_trained("static", STATIC_GRID), "d": run_d}
    for k in ("b", "e", "d", "c", "c'"):
        if k in want:
            oof, te = cached(k.replace("'", "p") + (f"_top{TOP}" if k == "d" else ""), runs[k])
            cv[NAMES[k]], test_z[NAMES[k]] = oof, te
            print(f"{NAMES[k]}: ready ({time.time() - t0:.0f} s)", flush=True)
    if {"b", "c"} <= want:  # (b+c): mean of the calibrated probabilities -> logit, calibrated and thresholded again
        from analysis.detector.model import _fit_platt, _platt

        def calp(zfit, yfit, zapp):
            out = np.zeros_like(zapp)
            for j in range(len(cats)):
                if Y[trn, j].sum() < 20:  # the lexicon rule's categories: not calibrated, not used
                    continue
                p = 1 / (1 + np.exp(-zfit[:, j]))
                out[:, j] = _platt(_fit_platt(p, yfit[:, j]), 1 / (1 + np.exp(-zapp[:, j])))
            return out

        ob, oc = cv[NAMES["b"]], cv[NAMES["c"]]
        ens = np.zeros_like(ob)
        for k in range(5):  # the calibrations fitted on the other folds, so no fold's score is fitted to its own labels
            te_, fit_ = trn[folds[trn] == k], trn[folds[trn] != k]
            pm = (calp(ob[fit_], Y[fit_], ob[te_]) + calp(oc[fit_], Y[fit_], oc[te_])) / 2
            ens[te_] = np.log(pm + 1e-9) - np.log1p(-pm + 1e-9)
        cv[NAMES["b+c"]] = ens
        bt = np.log(np.clip(rule_s[tst], 1e-9, 1 - 1e-9)) - np.log1p(-np.clip(rule_s[tst], 1e-9, 1 - 1e-9))  # shipped calibrated
        pm = (1 / (1 + np.exp(-bt)) + calp(oc[trn], Y[trn], test_z[NAMES["c"]])) / 2
        test_z[NAMES["b+c"]] = np.log(pm + 1e-9) - np.log1p(-pm + 1e-9)

    five = {k: v for k, v in cv.items() if not np.isnan(v[trn]).any()}
    print("\n== train split, 5-fold grouped CV (out-of-fold; Platt and thresholds fitted on these same out-of-fold scores)")
    print("| candidate | mAP(4) | " + " | ".join(f"{c} P/R/F1" for c in FOUR) + " | macro-F1(4) |")
    for name, oof in five.items():
        cal[name] = calibrate(oof[trn], Y[trn])
        s, f = apply(oof[trn], cal[name], rule_s[trn], rule_f[trn])
        v = evaluate_detector(pd.DataFrame(f, columns=cats), lab["art9"].iloc[trn].reset_index(drop=True))
        print(_row(name, v, mean_ap(oof[trn], Y[trn], cats)))

    if NAMES["b"] in five:
        from analysis.detector.model import _platt, choose_threshold

        j, nb = cats.index("ethnicity"), NAMES["b"]
        ab, t_cv = cal[nb][j]
        sc = _platt(ab, 1 / (1 + np.exp(-cv[nb][trn, j])))
        yb = Y[trn, j] > 0
        t_mx = choose_threshold(sc, yb)
        t_sh, st = det.params.thresholds["ethnicity"], rule_s[tst, j]
        print(f"\n== ethnicity, (b): what sets its threshold ({int(yb.sum())} train positives)\n"
              f"  train out-of-fold (calibrated): the shipped rule's cut {t_cv:.3f} flags {int((sc >= t_cv).sum())} "
              f"({int((yb & (sc >= t_cv)).sum())} right); the max-F1 cut {t_mx:.3f} flags {int((sc >= t_mx).sum())} "
              f"({int((yb & (sc >= t_mx)).sum())} right); rows scoring >= the shipped cut {t_sh:.3f}: {int((sc >= t_sh).sum())}\n"
              f"  mean calibrated score: train OOF {sc.mean():.4f} vs rate {yb.mean():.4f}; test (shipped) {st.mean():.4f} vs rate "
              f"{(Y[tst, j] > 0).mean():.4f}; test max {st.max():.3f}; test rows >= the shipped cut {int((st >= t_sh).sum())}, "
              f">= the max-F1 cut {int((st >= t_mx).sum())} ({int(((st >= t_mx) & (Y[tst, j] > 0)).sum()) if not a.no_test else '-'} right)")

    print("\n== threshold rules, nested on the train split: Platt and the cut fitted on 4 folds' out-of-fold scores, "
          "applied to the 5th (F1, precision in brackets)")
    print("| candidate | rule | " + " | ".join(FOUR) + " | macro-F1(4) |")
    nested = {}
    for name, oof in five.items():
        for rule in RULES:
            F = nested_flags(oof, Y, folds, trn, rule)
            F[:, [j for j in range(len(cats)) if Y[trn, j].sum() < 20]] = rule_f[trn][:, [j for j in range(len(cats)) if Y[trn, j].sum() < 20]]
            nested[(name, rule)] = F
            yy = Y[trn] > 0
            cells = []
            for c in FOUR:
                j = cats.index(c)
                tp, fl, po = int((F[:, j] & yy[:, j]).sum()), int(F[:, j].sum()), int(yy[:, j].sum())
                cells.append(f"{2 * tp / (fl + po):.2f} ({tp / fl:.2f})" if fl else "0.00 (- , 0 flagged)")
            print(f"| {name[:5]} | {rule} | " + " | ".join(cells) + f" | {macro_f1_of(F, Y[trn], cats):.3f} |")
    chats = fit_defaults_chat(lab["conversation_id"].iloc[trn])
    base = nested[(NAMES["b"], RULES[0])] if NAMES["b"] in five else None
    if base is not None:
        print("\n95% bootstrap CIs (ShareGPT chats resampled) of nested macro-F1(4) minus (b) with the previous rule:")
        for (name, rule), F in nested.items():
            if (name, rule) == (NAMES["b"], RULES[0]):
                continue
            lo, hi = boot_diff(lambda ix: macro_f1_of(F[ix], Y[trn][ix], cats), lambda ix: macro_f1_of(base[ix], Y[trn][ix], cats), chats)
            print(f"  {name[:5]} | {rule}: {macro_f1_of(F, Y[trn], cats) - macro_f1_of(base, Y[trn], cats):+.3f} [{lo:+.3f}, {hi:+.3f}]")
        # the choice between candidates: each under the shipped rule against (b) under it, and threshold-free mAP(4)
        shipped_b, zb = nested[(NAMES["b"], RULES[2])], cv[NAMES["b"]][trn]
        print("\n95% bootstrap CIs (chats resampled) against (b), both under the shipped rule: nested macro-F1(4); mAP(4)")
        for name, oof in five.items():
            if name == NAMES["b"]:
                continue
            F, zo = nested[(name, RULES[2])], oof[trn]
            lo, hi = boot_diff(lambda ix: macro_f1_of(F[ix], Y[trn][ix], cats), lambda ix: macro_f1_of(shipped_b[ix], Y[trn][ix], cats), chats)
            mlo, mhi = boot_diff(lambda ix: mean_ap(zo[ix], Y[trn][ix], cats), lambda ix: mean_ap(zb[ix], Y[trn][ix], cats), chats)
            print(f"  {name[:5]}: macro-F1(4) {macro_f1_of(F, Y[trn], cats) - macro_f1_of(shipped_b, Y[trn], cats):+.3f} [{lo:+.3f}, {hi:+.3f}]; "
                  f"mAP(4) {mean_ap(zo, Y[trn], cats) - mean_ap(zb, Y[trn], cats):+.3f} [{mlo:+.3f}, {mhi:+.3f}]")

    ho = trn[folds[trn] == 0]
    if NAMES["d"] in cv:
        print("\n== hold-out = train fold 0 (every candidate's model fitted on train folds 1-4; Platt and thresholds "
              "fitted on fold 0 itself)")
        print("| candidate | mAP(4) | " + " | ".join(f"{c} P/R/F1" for c in FOUR) + " | macro-F1(4) |")
        for name, oof in cv.items():
            c_ = calibrate(oof[ho], Y[ho], min_pos=5)
            s, f = apply(oof[ho], c_, rule_s[ho], rule_f[ho])
            v = evaluate_detector(pd.DataFrame(f, columns=cats), lab["art9"].iloc[ho].reset_index(drop=True))
            print(_row(name, v, mean_ap(oof[ho], Y[ho], cats)))
            if name == NAMES["d"]:
                cal[name] = calibrate(oof[ho], Y[ho], min_pos=5)
        g = fit_defaults_chat(lab["conversation_id"].iloc[ho])
        for other in ("b", "c"):
            if NAMES[other] in cv:
                zo, zd = cv[NAMES[other]][ho], cv[NAMES["d"]][ho]
                lo, hi = boot_diff(lambda ix: mean_ap(zd[ix], Y[ho][ix], cats), lambda ix: mean_ap(zo[ix], Y[ho][ix], cats), g)
                print(f"  mAP(4) (d) - ({other}) on fold 0: {mean_ap(zd, Y[ho], cats) - mean_ap(zo, Y[ho], cats):+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if a.no_test:
        return
    print("\n== frozen TEST split (scored once; thresholds as chosen on train)")
    lte = lab["art9"].iloc[tst].reset_index(drop=True)
    res = {}
    for name, z in test_z.items():
        if name == NAMES["b"]:
            res[name] = (None, rule_f[tst])
        else:
            res[name] = (z, apply(z, cal[name], rule_s[tst], rule_f[tst])[1])
    print("| candidate | mAP(4) | " + " | ".join(f"{c} P/R/F1" for c in FOUR) + " | macro-F1(4) |")
    vals = {}
    for name, (z, f) in res.items():
        vals[name] = v = evaluate_detector(pd.DataFrame(f, columns=cats), lte)
        zz = np.log(shipped.scores.to_numpy()[tst] + 1e-9) if z is None else z
        print(_row(name, v, mean_ap(zz, Y[tst], cats)))
    for name, v in vals.items():
        print(f"\n{name} (TEST, 95% CIs: Wilson for P/R, bootstrap for F1)")
        t = v.to_frame()[["category", "positives", "flagged", "precision", "precision_low", "precision_high", "recall", "recall_low",
                          "recall_high", "f1", "f1_low", "f1_high"]]
        print(t.round(3).to_string(index=False))
    print(f"\n({time.time() - t0:.0f} s)")


def fit_defaults_chat(ids):
    import fit_defaults

    return fit_defaults.chat_of(pd.Series(ids)).to_numpy()


def _row(name, v, m):
    pc = v.per_category.set_index("category")
    cells = " | ".join(f"{pc.loc[c, 'precision']:.2f} / {pc.loc[c, 'recall']:.2f} / {pc.loc[c, 'f1']:.2f}" for c in FOUR)
    return f"| {name} | {m:.3f} | {cells} | {pc.loc[list(FOUR), 'f1'].fillna(0).mean():.3f} |"


if __name__ == "__main__":
    main()
