"""What may be published: PII scrubbing of any text shown, pseudonymous user ids."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

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


_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}|-?\d+\.\d+")  # dates, decimals


def _keep_short_numbers(m: re.Match, name: str) -> str:
    # "between 2 and 3 days", "2024 10 05" are not phone numbers: demand 7+ digits for PHONE.
    if name == "PHONE" and (sum(ch.isdigit() for ch in m.group(0)) < 7 or _DATE.fullmatch(m.group(0))):
        return m.group(0)
    return f"[{name}]"


def suppress_small_cells(
    df: pd.DataFrame,
    count_cols: list[str],
    *,
    k: int = 10,
    by: str | None = None,
    complementary: bool = True,
) -> pd.DataFrame:
    """Counts of people below k become "<k", so no published cell describes fewer than k people.

    `by` names the column counting users: a row with fewer than k users has all its `count_cols`
    suppressed (a 3-user region's conversation count says as much as its user count). Zeros stay
    visible. With `complementary` (default), wherever a column holds exactly one suppressed cell,
    the next smallest cell of that column is suppressed too, so the suppressed value cannot be
    recovered as the column total minus the visible cells.
    """
    hide = pd.DataFrame(False, index=df.index, columns=count_cols)
    for c in count_cols:
        hide[c] = (df[c] > 0) & (df[c] < k)
        if by is not None:
            hide[c] |= (df[by] > 0) & (df[by] < k)
    if complementary:
        changed = True
        while changed:
            changed = False
            for c in count_cols:
                if hide[c].sum() == 1 and len(df) > 1:
                    rest = df.loc[~hide[c] & (df[c] > 0), c]
                    if len(rest):
                        hide.loc[rest.idxmin(), c] = True
                        changed = True
            if by is not None:  # a row's user count hidden means the whole row is hidden
                rows = hide[by] if by in hide else None
                if rows is not None:
                    for c in count_cols:
                        newly = rows & ~hide[c] & (df[c] > 0)
                        if newly.any():
                            hide.loc[newly, c] = True
                            changed = True
    out = df.copy()
    for c in count_cols:
        out[c] = out[c].astype("object").where(~hide[c], f"<{k}")
    return out


def suppress_small_table(table: pd.DataFrame, *, k: int = 10) -> pd.DataFrame:
    """A contingency table (a count in every cell, e.g. label x prediction) with counts of 1 to k-1
    shown as "<k". Suppression is complementary along rows *and* columns, because the margins (how
    many labeled, how many predicted) are published beside such tables."""
    counts = table.to_numpy(dtype=np.int64)
    hide = (counts > 0) & (counts < k)
    changed = True
    while changed:
        changed = False
        for c, h in ((counts, hide), (counts.T, hide.T)):  # columns, then rows (views: hide is updated)
            for j in range(c.shape[1]):
                if h[:, j].sum() == 1:
                    rest = np.flatnonzero(~h[:, j] & (c[:, j] > 0))
                    if len(rest):
                        h[rest[np.argmin(c[rest, j])], j] = True
                        changed = True
    return table.astype("object").mask(hide, f"<{k}")


def suppress_counts_and_rates(df: pd.DataFrame, counts: list[str], rates: dict[str, tuple[str, ...]], *, k: int = 10) -> pd.DataFrame:
    """`suppress_small_cells` on the `counts` columns; a rate (and its `_low` / `_high` interval) is
    blanked in every row where a count it is computed from (`rates`: rate -> counts) is suppressed,
    since rate and denominator together give the count back."""
    out = suppress_small_cells(df, counts, k=k)
    for rate, parts in rates.items():
        hidden = np.zeros(len(out), dtype=bool)
        for c in parts:
            hidden |= (out[c].astype(str) == f"<{k}").to_numpy()
        for col in (rate, f"{rate}_low", f"{rate}_high"):
            if col in out:
                out[col] = out[col].astype("float").where(~hidden)
    return out


# ------------------------------------------------------------------------------ pseudonyms


def pseudonym_key() -> bytes:
    """The pseudonymization key: $CHAT_AD_AUDIT_PSEUDONYM_KEY, else `.secrets/pseudonym.key` (created
    on first use, readable by the owner only, git-ignored). It never appears in any output."""
    env = os.environ.get("CHAT_AD_AUDIT_PSEUDONYM_KEY")
    if env:
        return env.encode()
    path = Path(os.environ.get("CHAT_AD_AUDIT_SECRETS_DIR", _PROJECT_ROOT / ".secrets")) / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def pseudonymize(ids: pd.Series, key: bytes | None = None, prefix: str = "p_") -> pd.Series:
    """Keyed hash (HMAC-SHA256) of each id: stable within an audit, not reversible without the key."""
    key = key or pseudonym_key()
    uniq = pd.unique(ids.dropna())
    table = {v: prefix + hmac.new(key, str(v).encode(), hashlib.sha256).hexdigest()[:16] for v in uniq}
    return ids.map(table)


# --------------------------------------------------------------------------------- scanner


@dataclass
class Finding:
    kind: str  # PII type, SMALL_CELL, RAW_TEXT, RAW_ID, EXTERNAL_RESOURCE
    where: str
    detail: str  # masked: never the full offending value


@dataclass
class ScanResult:
    path: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> pd.DataFrame:
        """Findings by kind (empty when clean)."""
        return self.to_frame().groupby("kind").size().rename("findings").reset_index()

    def to_markdown(self) -> str:
        """One line: clean, or the findings (masked) by kind with the first few."""
        if self.ok:
            return f"{self.path}: clean (no PII patterns, small cells, raw text or external resources)"
        kinds = pd.Series([f.kind for f in self.findings]).value_counts()
        head = "; ".join(f"{f.kind} in {f.where}: {f.detail}" for f in self.findings[:5])
        return f"{self.path}: {len(self.findings)} finding(s) ({', '.join(f'{n} {k}' for k, n in kinds.items())}): {head}"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.__dict__ for f in self.findings], columns=["kind", "where", "detail"])


_COUNT_HEADER = re.compile(r"(?:^|[_\s(])(users?|people|persons?|conversations?|respondents?)(?:$|[_\s)])|^n_(users|conversations)$", re.I)
_COUNT_PROSE = re.compile(r"\b([1-9])\s+(?:distinct\s+|unique\s+)?(users?|people|persons|conversations)\b", re.I)
_BASE64ISH = re.compile(r"^[A-Za-z0-9+/=]{8,}$")  # plotly's binary arrays ("bdata")


def _mask(v: str) -> str:
    v = v.strip()
    return v[:2] + "…" + v[-2:] if len(v) > 6 else "…"


_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)


def scan_report(path: str | Path, *, k: int = 10, raw_texts=None, raw_ids=None) -> ScanResult:
    """Check a rendered report for PII patterns, counts of fewer than k people, verbatim
    transcript text (`raw_texts`), raw user ids (`raw_ids`) and resources loaded from the network."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8", errors="replace")
    res = ScanResult(str(path))
    parser = _ReportParser()
    parser.feed(doc)
    visible = " ".join(parser.text)
    for src in parser.external:
        res.findings.append(Finding("EXTERNAL_RESOURCE", "document", src[:80]))
    strings = [s for s in parser.script_strings if not _BASE64ISH.match(s)]
    # each text node (a paragraph run, a table cell) and each figure string is scanned on its own:
    # joining them would make phone numbers out of neighbouring numeric cells
    pieces = [("text", t) for t in parser.text if t.strip()] + [("figure data", t) for t in strings]
    for where, text in pieces:
        # element ids (plotly's div ids are UUIDs) are not personal data, but two all-digit groups
        # of one ("b4955203-a4eb-4184-9477-…") read as a phone number
        text = _UUID.sub(" ", text)
        for name, pat in PII_PATTERNS:
            for m in pat.finditer(text):
                if name == "PHONE" and (sum(ch.isdigit() for ch in m.group(0)) < 7 or _DATE.fullmatch(m.group(0))):
                    continue
                res.findings.append(Finding(name, where, _mask(m.group(0))))
    for t_i, table in enumerate(parser.tables):
        if not table:
            continue
        header = table[0]
        for j, h in enumerate(header):
            if not _COUNT_HEADER.search(h.strip()):
                continue
            for row in table[1:]:
                if j < len(row):
                    cell = row[j].replace(",", "").strip()
                    if cell.isdigit() and 0 < int(cell) < k:
                        res.findings.append(Finding("SMALL_CELL", f"table {t_i + 1}, column {h.strip()!r}", cell))
    for m in _COUNT_PROSE.finditer(" ".join(parser.prose)):
        res.findings.append(Finding("SMALL_CELL", "text", m.group(0)))
    if raw_texts is not None:
        norm = " ".join(visible.lower().split())
        shingles = {" ".join(w[i : i + 8]) for w in [norm.split()] for i in range(max(0, len(w) - 7))}
        for t in raw_texts:
            words = " ".join(str(t).lower().split()).split()
            if len(words) >= 8 and " ".join(words[:8]) in shingles:
                res.findings.append(Finding("RAW_TEXT", "text", _mask(" ".join(words[:8]))))
    if raw_ids is not None:
        tokens = set(re.findall(r"[\w.-]+", visible)) | set(strings)
        for rid in set(map(str, raw_ids)) & tokens:
            res.findings.append(Finding("RAW_ID", "text", _mask(rid)))
    return res


class _ReportParser(HTMLParser):
    """Visible text, table cells, short script string literals and external resources of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.prose: list[str] = []  # visible text outside tables
        self.tables: list[list[list[str]]] = []
        self.script_strings: list[str] = []
        self.external: list[str] = []
        self._skip = 0
        self._in_script = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._table_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for attr in ("src", "href"):
            v = a.get(attr) or ""
            if tag in ("script", "link", "img", "iframe") and re.match(r"(https?:)?//", v):
                self.external.append(v)
        if tag in ("style",):
            self._skip += 1
        if tag == "script":
            self._in_script = True
        if tag == "table":
            self._table_depth += 1
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "style":
            self._skip = max(0, self._skip - 1)
        if tag == "script":
            self._in_script = False
        if tag == "table":
            self._table_depth = max(0, self._table_depth - 1)
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._in_script:
            if len(data) < 200_000:  # a figure's data, not a bundled library (plotly.js)
                self.script_strings.extend(s for s in re.findall(r'"((?:[^"\\]|\\.){1,200})"', data) if re.search(r"[A-Za-z]", s))
            return
        if self._skip:
            return
        self.text.append(data)
        if not self._table_depth:
            self.prose.append(data)
        if self._cell is not None:
            self._cell.append(data.strip())
