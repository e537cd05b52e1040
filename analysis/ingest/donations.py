"""Data donations: a folder of many people's ChatGPT exports plus a participants table, as one dataset.

    donations/
      participants.csv        participant_id, region, optional consent_date
      P001/                   one export per participant: its folder (conversations.json or
      P002.zip                conversations-NNN.json parts), the export's .zip, or a bare .json
      P003.json

Each export becomes one user whose id is a keyed pseudonym of the participant id (HMAC-SHA256,
`analysis.util.privacy.pseudonymize`): the participant id never reaches an output. An export that
cannot be read, an export without a participants row, a participant without an export, and
conversations started before the participant's consent date are quarantined with their reason;
the other exports go on. Every export and participants row is counted (read = kept + quarantined).
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.contract.schemas import QUARANTINE_COLUMNS, DataError
from analysis.ingest.check import check_table, quarantine_rows
from analysis.ingest.importers import ImportResult, import_chatgpt_export
from analysis.ingest.readers import read_table
from analysis.util.privacy import pseudonymize

PARTICIPANTS = ("participants.csv", "participants.parquet", "participants.jsonl")


def participants_file(folder: Path) -> Path | None:
    """The participants table of a donations folder, or None when `folder` is not one."""
    return next((folder / n for n in PARTICIPANTS if (folder / n).is_file()), None) if folder.is_dir() else None


def export_entries(folder: Path) -> dict[str, Path]:
    """participant id -> its export (a subfolder, a .zip or a .json), in name order."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name in PARTICIPANTS or p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix.lower() in (".zip", ".json"):
            out[p.stem if p.is_file() else p.name] = p
    return out


@dataclass
class Donations:
    """The donated exports as contract tables, with what was quarantined and the counts."""

    messages: pd.DataFrame
    users: pd.DataFrame
    quarantine: pd.DataFrame
    n_read: dict[str, int]  # participants, exports
    n_kept: dict[str, int]
    imports: list[ImportResult]


def import_donations(folder: str | Path, *, key: bytes | None = None) -> Donations:
    """Read every export of a donations folder; the failing ones are quarantined, the others kept."""
    folder = Path(folder)
    pfile = participants_file(folder)
    if pfile is None:
        raise DataError(folder, f"not a donations folder: no {' / '.join(PARTICIPANTS)}")
    checked = check_table("participants", read_table(pfile), pfile)
    part = checked.data
    qs = [checked.quarantine]
    exports = export_entries(folder)
    known = dict(zip(part["participant_id"].astype(str), part["_row"]))
    msgs, users, imports, kept_exports = [], [], [], 0
    for k, (pid, path) in enumerate(exports.items(), start=1):
        if pid not in known:
            qs.append(quarantine_rows("exports", path, [k], None, "export without a participants row (participant_id = its folder or file name)"))
            continue
        try:
            imp = _import_one(path)
        except (DataError, OSError, zipfile.BadZipFile, ValueError) as e:
            qs.append(quarantine_rows("exports", path, [k], None, f"export could not be read: {e}"))
            qs.append(quarantine_rows("participants", pfile, [known[pid]], "participant_id", f"export {path.name} could not be read"))
            continue
        row = part[part["participant_id"].astype(str) == pid].iloc[0]
        uid = pseudonymize(pd.Series([pid]), key).iloc[0]
        m = imp.messages.assign(user_id=uid)
        consent = row.get("consent_date")
        if consent is not None and not pd.isna(consent):
            started = m.groupby("conversation_id")["sent_at"].transform("min")
            before = (started < consent).to_numpy()
            if before.any():  # conversations held before consent are not the participant's donation
                qs.append(quarantine_rows("messages", path, np.flatnonzero(before) + 1, "sent_at",
                                          f"conversation started before the participant's consent date {consent:%Y-%m-%d}"))
                imp.problems.append({"row": None, "reason": f"{int(before.sum())} messages before the consent date"})
                m = m[~before]
        imp.messages = m
        msgs.append(m)
        users.append({"user_id": uid, "region": row["region"]})
        imports.append(imp)
        kept_exports += 1
    missing = part[~part["participant_id"].astype(str).isin(set(exports))]
    if len(missing):
        qs.append(quarantine_rows("participants", pfile, missing["_row"], "participant_id", "no export found for this participant"))
    if not msgs:
        reasons = pd.concat(qs, ignore_index=True)["reason"].head(3).tolist() if any(len(q) for q in qs) else []
        raise DataError(folder, f"no export could be imported ({len(exports)} found); first problems: {reasons}")
    q = [x for x in qs if len(x)]
    quarantine = pd.concat(q, ignore_index=True) if q else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    messages = pd.concat(msgs, ignore_index=True)
    return Donations(
        messages=messages,
        users=pd.DataFrame(users),
        quarantine=quarantine,
        n_read={"participants": checked.n_read, "exports": len(exports)},
        n_kept={"participants": kept_exports, "exports": kept_exports},
        imports=imports,
    )


def _import_one(path: Path) -> ImportResult:
    """One participant's export: a folder or a .json directly, a .zip unpacked to a temporary folder."""
    if path.suffix.lower() != ".zip":
        return import_chatgpt_export(path)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if Path(n).name.startswith("conversations") and n.endswith(".json")]
        if not names:
            raise DataError(path, "the .zip holds no conversations.json")
        for n in names:
            target = Path(tmp) / Path(n).name  # flat: member paths never leave the temporary folder
            target.write_bytes(z.read(n))
        return import_chatgpt_export(Path(tmp))
