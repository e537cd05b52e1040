"""Stage 05, summary: the four audit questions answered from the run's stage outputs (`analysis.summary`)."""

from __future__ import annotations

from analysis.contract.rundir import RunDir
from analysis.contract.settings import SummarySettings
from analysis.engines import Engine
from analysis.summary import AuditSummary


def run(run_dir: RunDir | str, settings: SummarySettings | None = None, engine: Engine | None = None) -> AuditSummary:
    """Stage 05 reads metrics and small tables only (the engine is not used); it writes nothing:
    its report is the notebook's HTML."""
    return AuditSummary(run_dir, settings or SummarySettings())
