"""The run folder's contract: every artifact a stage writes, where, and which stage writes it.

Stages talk to each other only through these files. `RunDir(run_dir).require("topics", ...)`
returns the paths, or raises `MissingArtifact` naming the files and the stage to run first.
Metrics go to `metrics/<stage>.json` (`RunDir.metrics_file`); the runner adds `manifest.json`,
`index.html` and each stage's executed notebook and HTML report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from analysis.contract.stages import INGEST, MAPPING, STAGES, SUMMARY, TOPICS, describe


class StageInputError(RuntimeError):
    """A stage cannot run: an earlier stage's output it needs is missing or unusable."""


class MissingArtifact(StageInputError, FileNotFoundError):
    """An artifact a stage needs does not exist: the message names it and the stage that writes it."""


@dataclass(frozen=True)
class Artifact:
    key: str
    relpath: str  # relative to the run folder
    stage: str  # the stage that writes it
    what: str
    optional: bool = False  # the stage writes it only when its inputs allow (see `what`)


ARTIFACTS: dict[str, Artifact] = {a.key: a for a in (
    Artifact("conversations", "data/conversations.parquet", INGEST, "one row per conversation: user-side document, opening, the assistant's first reply, owner, region, times (raw text: never in a report)"),
    Artifact("quarantine", "data/quarantine.parquet", INGEST, "rows that could not be used, with file, row, column and reason (no message text)"),
    Artifact("users", "data/users.parquet", INGEST, "the checked users table"),
    Artifact("impressions", "data/impressions.parquet", INGEST, "the checked ad impression log (absent for a chat export)", optional=True),
    Artifact("filter_decisions", "data/filter_decisions.parquet", INGEST, "the platform filter's decision per conversation (when given)", optional=True),
    Artifact("labels", "data/labels.parquet", INGEST, "hand labels per conversation (when given)", optional=True),
    Artifact("ground_truth", "truth/ground_truth.json", INGEST, "a simulated world's ground truth, copied from the input folder (simulated worlds only)", optional=True),
    Artifact("truth_conversations", "truth/conversations.parquet", INGEST, "a simulated world's per-conversation truth: topic, Art. 9 categories (simulated worlds only)", optional=True),
    Artifact("topics", "data/topics.parquet", TOPICS, "topic of every conversation, with probability, similarity and how it was assigned"),
    Artifact("topic_info", "data/topic_info.parquet", TOPICS, "one row per topic: PII-scrubbed label, keywords, size, share, NPMI"),
    Artifact("topics_over_time", "data/topics_over_time.parquet", TOPICS, "conversations per week and topic"),
    Artifact("topics_by_region", "data/topics_by_region.parquet", TOPICS, "conversations and users per region and topic (small cells suppressed)"),
    Artifact("topic_model", "model/topics", TOPICS, "the fitted topic model (safetensors; reloads offline)"),
    Artifact("topic_categories", "data/topic_categories.parquet", MAPPING, "topic -> IAB node, tier 1, source (similarity / override / unmapped), sensitive share"),
    Artifact("conversation_categories", "data/conversation_categories.parquet", MAPPING, "per conversation: IAB node, Art. 9 scores and flags"),
    Artifact("detector_params", "data/detector_params.json", MAPPING, "the sensitive-topic detector's parameters as used (shipped or refitted)"),
    Artifact("mapping_overrides_applied", "data/mapping_overrides_applied.json", MAPPING, "the analyst overrides applied and the Art. 9 ad nodes in use"),
    Artifact("detector_validation", "data/detector_validation.parquet", MAPPING, "per-category validation counts tp, fn, tn, fp on held-out labels (with labels only)", optional=True),
    Artifact("detector_metrics", "data/detector_metrics.parquet", MAPPING, "precision, recall, F1, specificity with CIs (with labels only)", optional=True),
    Artifact("detector_confusion", "data/detector_confusion.parquet", MAPPING, "label x flag confusion table (with labels only)", optional=True),
)}
# Stages 03 and 04 write metrics only; stage 05 reads metrics and the data above.
METRICS_WRITTEN_BY = tuple(s for s in STAGES if s != SUMMARY)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_path(path: str | os.PathLike) -> Path:
    """A path as configs and notebook parameters write it: a relative one is relative to the project
    root, whatever the working directory (JupyterLab runs a notebook's kernel in `notebooks/`)."""
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


class RunDir:
    """Typed paths into one run folder (`reports/<run-id>/`; relative: to the project root)."""

    def __init__(self, root: str | os.PathLike):
        self.root = project_path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def of(cls, run_dir: "str | os.PathLike | RunDir") -> "RunDir":
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def truth_dir(self) -> Path:
        return self.root / "truth"

    def metrics_file(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (stages: {list(STAGES)})")
        return self.metrics_dir / f"{stage}.json"

    def path(self, key: str) -> Path:
        try:
            return self.root / ARTIFACTS[key].relpath
        except KeyError:
            raise KeyError(f"unknown artifact {key!r} (artifacts: {sorted(ARTIFACTS)})") from None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def optional(self, key: str) -> Path | None:
        """The artifact's path if it exists, else None."""
        p = self.path(key)
        return p if p.exists() else None

    def require(self, *keys: str) -> Path | tuple[Path, ...]:
        """The artifacts' paths; `MissingArtifact` if any is absent, naming the stage that writes it."""
        missing = [k for k in keys if not self.exists(k)]
        if missing:
            by_stage: dict[str, list[str]] = {}
            for k in missing:
                by_stage.setdefault(ARTIFACTS[k].stage, []).append(Path(ARTIFACTS[k].relpath).name)
            raise MissingArtifact("; ".join(
                f"{', '.join(names)} not found in {self.data if all(ARTIFACTS[k].relpath.startswith('data/') for k in missing) else self.root}: "
                f"run {describe(stage)} first" for stage, names in by_stage.items()))
        paths = tuple(self.path(k) for k in keys)
        return paths[0] if len(paths) == 1 else paths

    @property
    def conversations(self) -> Path:
        return self.path("conversations")

    @property
    def quarantine(self) -> Path:
        return self.path("quarantine")

    @property
    def users(self) -> Path:
        return self.path("users")

    @property
    def impressions(self) -> Path:
        return self.path("impressions")

    @property
    def filter_decisions(self) -> Path:
        return self.path("filter_decisions")

    @property
    def labels(self) -> Path:
        return self.path("labels")

    @property
    def ground_truth(self) -> Path:
        return self.path("ground_truth")

    @property
    def truth_conversations(self) -> Path:
        return self.path("truth_conversations")

    @property
    def topics(self) -> Path:
        return self.path("topics")

    @property
    def topic_info(self) -> Path:
        return self.path("topic_info")

    @property
    def topics_over_time(self) -> Path:
        return self.path("topics_over_time")

    @property
    def topics_by_region(self) -> Path:
        return self.path("topics_by_region")

    @property
    def topic_model(self) -> Path:
        return self.path("topic_model")

    @property
    def topic_categories(self) -> Path:
        return self.path("topic_categories")

    @property
    def conversation_categories(self) -> Path:
        return self.path("conversation_categories")

    @property
    def detector_params(self) -> Path:
        return self.path("detector_params")

    @property
    def mapping_overrides_applied(self) -> Path:
        return self.path("mapping_overrides_applied")

    @property
    def detector_validation(self) -> Path:
        return self.path("detector_validation")

    @property
    def detector_metrics(self) -> Path:
        return self.path("detector_metrics")

    @property
    def detector_confusion(self) -> Path:
        return self.path("detector_confusion")
