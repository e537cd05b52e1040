"""What may be published: PII scrubbing of any text shown, pseudonymous user ids."""

from __future__ import annotations

import re

# Order matters: the most specific patterns run first so a card number is not half-eaten by "phone".
PII_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("EMAIL", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("URL", re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.I)),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("IP", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("PHONE", re.compile(r"(?<![\w/])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,6}(?:[ .-]\d{2,6}){1,4}(?![\w/])|(?<![\w/])\+?\d{10,14}(?![\w/])")),
    ("HANDLE", re.compile(r"(?<![\w@])@[A-Za-z_][\w.]{1,29}\b")),
]


def scrub_pii(text: str | None) -> str | None:
    """Replace emails, URLs, IBANs, card/ID numbers, IPs, phone numbers and @handles with [TYPE]."""
    if text is None or not isinstance(text, str):
        return text
    for name, pat in PII_PATTERNS:
        text = pat.sub(lambda m, n=name: _keep_short_numbers(m, n), text)
    return text


_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


def _keep_short_numbers(m: re.Match, name: str) -> str:
    # "between 2 and 3 days", "2024 10 05" are not phone numbers: demand 7+ digits for PHONE.
    if name == "PHONE" and (sum(ch.isdigit() for ch in m.group(0)) < 7 or _DATE.fullmatch(m.group(0))):
        return m.group(0)
    return f"[{name}]"


def suppress_small_cells(df, count_cols: list[str], *, k: int = 10, by: str | None = None, label: str | None = None):
    """Show counts below k users as "<k" (strings), so no published cell describes fewer than k people.

    `by` names the column that counts users; when given, a row whose user count is below k has
    all its `count_cols` suppressed (a conversation count of a 3-user region says as much as
    the user count).
    """
    out = df.copy()
    label = label or f"<{k}"
    small_rows = out[by] < k if by else None
    for c in count_cols:
        small = (out[c] < k) & (out[c] > 0) if small_rows is None else small_rows | ((out[c] < k) & (out[c] > 0))
        out[c] = out[c].astype("object").where(~small, label)
    return out
