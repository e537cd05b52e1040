"""Documents for topic modelling: cleaning (code, logs, boilerplate, personal data) and embedding."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.util.embeddings import Embedder
from analysis.util.privacy import scrub_pii

TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"  # words of 2+ letters: numbers (ids, phones) never become keywords
# Chat filler and contraction stubs ("don't" -> "don") on top of sklearn's English stop words: in
# chats they are frequent in every topic and would otherwise crowd topic labels.
CHAT_STOP_WORDS = frozenset(
    """ok okay lol hmm hm haha yeah yep yes nope sure thanks thank thx ty pls please hi hello hey oh wow btw
    cool great nice awesome really actually maybe just like want need help know tell make does did doing
    think thing things way say says said got get gets getting good best better use using used question
    questions answer write explain give let lets also wait kind sort stuff right wrong work works
    don doesn didn isn wasn aren weren won wouldn couldn shouldn haven hasn ll ve re im ive id youre
    thats whats dont cant wont didnt doesnt isnt com www http https gmail html org""".split()
)

# -------------------------------------------------------------------------- documents

_FENCE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)", re.S)  # an unclosed fence runs to the end
_INLINE_CODE = re.compile(r"`[^`\n]{1,200}`")
_BOILERPLATE = re.compile(
    r"^\W*(?:please\s+)?(?:continue|go on|keep going|carry on|more|next|again|regenerate|go ahead|proceed|"
    r"ok(?:ay)?|ok thx|k|thx|ty|thanks?(?: you)?(?: so much| a lot| very much)?(?: again)?|thank u|cool|great|nice|"
    r"perfect|yes|yep|no|nope|sure|done|got it|right|correct|wow|lol|hi|hello|hey|"
    r"can you make it shorter|make it shorter|shorter|longer|rewrite|rewrite it|try again|"
    r"continue writing|continue please|please continue|go on please)\W*$",
    re.I,
)
_LOG_LINE = re.compile(
    r"^\s*(?:"
    r"\[?\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}"  # timestamped log line
    r"|\[?(?:TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|FATAL|CRITICAL|SEVERE)\]?[:\s]"  # level-prefixed
    r"|Traceback \(most recent call last\)"
    r"|File \"[^\"]+\", line \d+"
    r"|at [\w$.<>/]+\([^)]*\)\s*$"  # Java/JS stack frame
    r"|\w+(?:\.\w+)*(?:Error|Exception|Warning)(?::|\s*$)"  # exception line
    r"|(?:\$|>>>|\.\.\.|PS [A-Z]:\\|C:\\>)\s"  # shell / REPL prompts
    r"|[\w.-]+@[\w.-]+:[~/][^\s]*\$\s"
    r")"
)
_CODE_LINE = re.compile(
    r"^\s*(?:"
    r"(?:def|class)\s+\w+\s*[(:]"
    r"|(?:import\s+[\w.]+(?:\s+as\s+\w+)?|from\s+[\w.]+\s+import\s+[\w*, ]+)\s*$"
    r"|#include\b|#!/"
    r"|(?:public|private|protected|static|final|void|func|fn|package)\s.*[;{)]\s*$"
    r"|(?:const|let|var)\s+\w+\s*=.*"
    r"|(?:SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\s.*\b(?:FROM|INTO|SET|TABLE|WHERE)\b.*"
    r"|<\/?[a-zA-Z][\w-]*(?:\s[^<>]*)?>.*"
    r"|[{}\[\]();]+,?\s*$"
    r"|.*[;{]\s*$"
    r"|.*(?:=>|->|::|==|!=|\+=|&&|\|\|).*[;{})]\s*$"
    r")"
)
_SYMBOLS = set("{}[]()<>=;:/\\_$#*|&^%~`@+")
_PII_PLACEHOLDER = re.compile(r"\[(?:EMAIL|URL|IBAN|CARD|ID|IP|PHONE|HANDLE)\]")


@dataclass
class Documents:
    """Cleaned documents and what cleaning removed from each; `openings`: the cleaned first
    user turns (None when the conversations table has no `opening` column)."""

    texts: list[str]
    flags: pd.DataFrame  # code, log, boilerplate (lines removed), truncated, empty (bools)
    openings: list[str] | None = None
    seconds: float = 0.0  # time the cleaning took (wherever it ran)

    def summary(self) -> pd.DataFrame:
        f = self.flags
        return pd.DataFrame(
            {"documents": [len(f)], **{f"with_{c}_removed" if c not in ("truncated", "empty") else c: [int(f[c].sum())] for c in f.columns}}
        )


def _symbol_share(line: str) -> float:
    s = line.strip()
    return sum(ch in _SYMBOLS for ch in s) / max(len(s), 1)


def clean_document(text: str | None, *, max_chars: int = 2000) -> tuple[str, dict[str, bool]]:
    """The topical text of one conversation's user side, and which kinds of noise were removed.

    Drops fenced code, inline code, pasted logs/stack traces, code-looking lines (keywords,
    statement endings, symbol-dense lines, indented blocks) and boilerplate turns; keeps at most
    `max_chars` characters (long pastes would otherwise dominate c-TF-IDF counts).
    """
    flags = {"code": False, "log": False, "boilerplate": False, "truncated": False}
    if not isinstance(text, str) or not text.strip():
        return "", {**flags, "empty": True}
    t, n = _FENCE.subn(" ", text)
    flags["code"] |= n > 0
    t, n = _INLINE_CODE.subn(" ", t)
    flags["code"] |= n > 0
    keep: list[str] = []
    in_trace = False
    for line in t.split("\n"):
        s = line.strip()
        if not s:
            in_trace = False
            continue
        if s.startswith("Traceback (most recent call last)"):
            in_trace = True
        if in_trace or _LOG_LINE.match(line):
            flags["log"] = True
            # a traceback continues through its indented frames; its exception line ends it
            if in_trace and not line[:1].isspace() and not s.startswith("Traceback"):
                in_trace = False
            continue
        if _BOILERPLATE.match(s):
            flags["boilerplate"] = True
            continue
        if (line[:4] == "    " or line[:1] == "\t") and _symbol_share(s) > 0.04 or _CODE_LINE.match(line) or (len(s) >= 12 and _symbol_share(s) > 0.2):
            flags["code"] = True
            continue
        keep.append(s)
    # personal data is never a topic, nor a keyword ("email maria" was one); scrubbed after the
    # line filters, which need the timestamps a phone-number pattern would eat
    out = re.sub(r"\s+", " ", _PII_PLACEHOLDER.sub(" ", scrub_pii("\n".join(keep)))).strip()
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0]
        flags["truncated"] = True
    flags["empty"] = not any(ch.isalpha() for ch in out)
    return ("" if flags["empty"] else out), flags


def build_documents(texts: Iterable[str | None], *, openings: Iterable[str | None] | None = None, max_chars: int = 2000) -> Documents:
    """Clean every conversation document and, if given, every opening turn (see `clean_document`)."""
    out, rows = [], []
    for t in texts:
        c, f = clean_document(t, max_chars=max_chars)
        out.append(c)
        rows.append(f)
    flags = pd.DataFrame(rows, columns=["code", "log", "boilerplate", "truncated", "empty"]).astype(bool)
    opened = None if openings is None else [clean_document(t, max_chars=max_chars)[0] for t in openings]
    if opened is not None and len(opened) != len(out):
        raise ValueError(f"{len(opened)} openings for {len(out)} documents")
    return Documents(out, flags, opened)


def document_embeddings(embedder: Embedder, texts: Sequence[str], openings: Sequence[str] | None, weight: float) -> np.ndarray:
    """Unit vectors for documents: `weight` x opening + (1 - weight) x whole document, renormalized.

    A document without an opening (or `weight` 0) keeps its own embedding. Shared by every engine
    and by `TopicModel.assign`, so fitted and reloaded models embed alike."""
    emb = embedder.encode(list(texts))
    if openings is None or weight <= 0 or not len(texts):
        return emb
    has = np.array([bool(o) for o in openings], dtype=bool)
    if not has.any():
        return emb
    mixed = emb.astype(np.float32, copy=True)
    mixed[has] = (1 - weight) * emb[has] + weight * embedder.encode([o for o, h in zip(openings, has) if h])
    return (mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)).astype(np.float32)

def embed_totals(embedder: Embedder, since: int) -> dict:
    """The embedder's counts summed over its encode calls from number `since` on."""
    out: dict = {}
    for h in embedder.stats.history[since:]:
        for k, v in h.items():
            out[k] = out.get(k, 0) + v
    return out
