"""Stage 00, ingest: load and check the inputs, build the conversations table, write the artifacts.

A simulated world's ground truth is copied into the run folder here (`truth/`), so no later stage
needs the input folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from analysis.contract import metric_names as M
from analysis.contract.rundir import RunDir, project_path
from analysis.contract.settings import IngestSettings
from analysis.contract.stages import INGEST
from analysis.engines import Engine
from analysis.ingest.conversations import build_conversations
from analysis.ingest.inputs import Inputs, load_inputs
from analysis.util.metrics import MetricsRecorder
from analysis.util.privacy import suppress_small_cells
from analysis.util.regions import DEFAULT_EXCLUDED, is_excluded
from analysis.util.storage import write_parquet
from analysis.validation.truth import GroundTruth, copy_world_truth


@dataclass
class IngestResult:
    """What stage 00 produced: tables written under `run_dir/data/` and the data-quality summary."""

    inputs: Inputs
    conversations: pd.DataFrame
    artifacts: dict[str, str]
    excluded_regions: tuple = DEFAULT_EXCLUDED
    settings: IngestSettings = field(default_factory=IngestSettings)

    def summary(self) -> pd.DataFrame:
        return self.inputs.quality_summary()

    def region_volumes(self) -> pd.DataFrame:
        """Users and conversations per region, small cells suppressed."""
        c = self.conversations
        users = self.inputs.users
        v = (
            users.groupby("region").size().rename("users").to_frame()
            .join(c.groupby("region").size().rename("conversations"), how="left")
            .fillna(0).astype("int64").reset_index()
        )
        v["excluded"] = is_excluded(v["region"], self.excluded_regions)
        v = v.sort_values(["excluded", "users"], ascending=[True, False]).reset_index(drop=True)
        return suppress_small_cells(v, ["users", "conversations"], k=self.settings.min_cell_users, by="users")


def run(run_dir: RunDir | str, settings: IngestSettings | None = None, engine: Engine | None = None) -> IngestResult:
    """Stage 00 (the engine is not used: reading and checking inputs is in-process)."""
    rd, s = RunDir.of(run_dir), settings or IngestSettings()
    excluded = tuple(s.excluded_regions) if s.excluded_regions else DEFAULT_EXCLUDED
    input_dir = project_path(s.input_dir)
    inputs = load_inputs(input_dir, max_quarantine_share=s.max_quarantine_share)
    conv = build_conversations(inputs.messages, inputs.users, excluded_regions=excluded, policy_date=s.policy_date)
    artifacts = {"conversations": str(write_parquet(conv, rd.conversations))}
    artifacts["quarantine"] = str(write_parquet(inputs.quarantine.astype({"value": "object"}), rd.quarantine))
    for t in ("users", "impressions", "filter_decisions", "labels"):
        df = getattr(inputs, t)
        if df is not None:
            artifacts[t] = str(write_parquet(df, rd.path(t)))
    if copy_world_truth(input_dir, rd):
        artifacts.update({k: str(rd.path(k)) for k in ("ground_truth", "truth_conversations") if rd.exists(k)})
    res = IngestResult(inputs, conv, artifacts, excluded, s)
    record_metrics(res, rd, GroundTruth.read(rd))
    return res


def record_metrics(res: IngestResult, rd: RunDir, truth: GroundTruth | None) -> None:
    counts = truth.counts() if truth else {}
    m = MetricsRecorder(rd, INGEST)
    for row in res.summary().itertuples():
        m.add(M.ROWS_READ, row.rows_read, group={"table": row.table})
        m.add(M.ROWS_QUARANTINED, row.rows_quarantined, group={"table": row.table})
    c = res.conversations
    m.add(M.CONVERSATIONS, len(c), truth=counts.get("conversations"))
    m.add(M.USERS, len(res.inputs.users), truth=counts.get("users"))
    m.add(M.USERS_EXCLUDED_REGION, int(is_excluded(res.inputs.users["region"], res.excluded_regions).sum()), truth=counts.get("users_excluded"))
    if res.inputs.impressions is not None:
        m.add(M.IMPRESSIONS, len(res.inputs.impressions), truth=counts.get("impressions"))
    known = c["voice"].dropna()
    m.add(M.VOICE_SHARE, float(known.astype(bool).mean()) if len(known) else None, n=len(known))
    m.write()
