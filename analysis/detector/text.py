"""The text a detector reads: user text without code, URLs and markup, cut into segments."""

from __future__ import annotations

import re

import numpy as np

# --------------------------------------------------------------------------------- the text

_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_URL = re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.I)
_TAG = re.compile(r"<[^>\n]{1,200}>")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_HINT = re.compile(r"[{};=<>\[\]()$#|\\]|^\s*(?:def|class|import|from|function|const|let|var|return|public|private|SELECT|INSERT|if|for|while)\b")


def clean_text(text: str) -> str:
    """User text with pasted code, URLs and markup removed: what a reader would call the message."""
    if not isinstance(text, str):
        return ""
    t = _FENCE.sub(" ", text)
    t = _URL.sub(" ", t)
    t = _TAG.sub(" ", t)
    keep = []
    for line in t.splitlines():
        s = line.strip()
        if not s:
            continue
        sym = sum(ch in "{}[]();=<>$#|\\_/*+^&" for ch in s)
        # code: dense in symbols, or a statement-like line (a prose line has few of these)
        if sym / max(len(s), 1) > 0.08 or (_CODE_HINT.search(s) and sym >= 2 and len(s.split()) < 14):
            continue
        keep.append(s)
    return "\n".join(keep)


def segments(text: str, *, max_words: int = 60, max_segments: int = 24) -> list[str]:
    """The conversation cut into short passages (user turns; long ones split at sentence ends).

    Very long conversations keep `max_segments` passages spread evenly over the text, so the
    cost per conversation is bounded.
    """
    out: list[str] = []
    for line in clean_text(text).splitlines():
        words = line.split()
        if len(words) <= max_words:
            out.append(line)
            continue
        cur: list[str] = []
        for sent in _SENT.split(line):
            sw = sent.split()
            while len(sw) > max_words:  # a run-on "sentence": hard split
                if cur:
                    out.append(" ".join(cur))
                    cur = []
                out.append(" ".join(sw[:max_words]))
                sw = sw[max_words:]
            if len(cur) + len(sw) > max_words and cur:
                out.append(" ".join(cur))
                cur = []
            cur.extend(sw)
        if cur:
            out.append(" ".join(cur))
    out = [s for s in out if re.search(r"[^\W\d_]{2,}", s)]
    if len(out) > max_segments:
        idx = np.unique(np.linspace(0, len(out) - 1, max_segments).round().astype(int))
        out = [out[i] for i in idx]
    return out
