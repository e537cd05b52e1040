"""One frozen settings dataclass per stage: the only place parameter defaults live.

A field's name is the same everywhere: in `configs/*.yaml` (`params:`), in the stage notebook's
`parameters` cell (checked against these classes by tests/unit/test_settings.py) and in the code.
Names are unique across stages unless they mean the same thing in each stage that declares them
(`seed`, `alpha`, `min_cell_users`, `policy_date`, `excluded_regions`, `engine`, `dask_scheduler`,
`cache_dir`). Domain classes take these values in their constructors (`ExposureTest(n_permutations=
settings.exposure_permutations)`); the stage module does that wiring.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Mapping

ENGINES = ("pandas", "dask")
OUTLIER_STRATEGIES = ("embeddings", "c-tf-idf", "distributions", "none")
DETECTOR_FITTINGS = ("simulated", "real_chat")  # analysis.detector.model.FITTINGS
# detector backends whose entry the shipped defaults (analysis/data/detector_default.json) no longer hold, and what to
# use instead (the `static` EMBEDDING backend stays: stage 01's topics and the categorizer's mapping_backend use it)
RETIRED_DETECTOR_BACKENDS = {
    "static": "the untrained `static` detector entry was removed in session 9: the trained static student is the fast "
              "detector, better in cross-validation (mAP(4) +0.061) and on TEST (docs/detector.md); use 'student' (or 'minilm', the default)",
}
REPRESENTATIONS = ("keybert", "mmr", "ctfidf")
SEED = 20251216  # the audit's seed: detector tuning split, bootstraps, permutations, UMAP/HDBSCAN
POLICY_DATE = "2025-12-16"


@dataclass(frozen=True)
class StageSettings:
    """Base: construction from a mapping or a notebook's namespace, with unknown keys refused."""

    stage: ClassVar[str] = ""
    title: ClassVar[str] = ""  # how error messages name the stage's settings

    def __post_init__(self) -> None:
        for f in fields(self):  # lists from YAML become tuples: settings are values
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if getattr(self, "engine", "pandas") not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {getattr(self, 'engine')!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, **kw):
        """Settings from a mapping; None for a field whose default is not None means the default."""
        d = {**(d or {}), **kw}
        unknown = set(d) - set(cls.names())
        if unknown:
            raise ValueError(f"unknown {cls.title} setting(s): {sorted(unknown)} (known: {sorted(cls.names())})")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if v is not None or defaults[k] is None})

    @classmethod
    def from_namespace(cls, ns: Mapping[str, Any]):
        """Settings from a notebook's globals: every field the namespace defines."""
        return cls.from_dict({k: ns[k] for k in cls.names() if k in ns})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes):
        return replace(self, **changes)


@dataclass(frozen=True)
class IngestSettings(StageSettings):
    stage: ClassVar[str] = "00_ingest"
    title: ClassVar[str] = "ingest"

    input_dir: str = "data/world/default"  # a folder of input tables (Parquet/CSV/JSONL) or a chat export
    policy_date: str = POLICY_DATE
    excluded_regions: tuple[str, ...] | None = None  # None: EU27 + IS, LI, NO + GB + KR (analysis.util.regions.DEFAULT_EXCLUDED)
    max_quarantine_share: float = 0.2  # fail the stage if a table loses more rows than this to quarantine
    min_cell_users: int = 10  # small-cell suppression threshold for every published count


@dataclass(frozen=True)
class TopicSettings(StageSettings):
    """Stage 01; the topic model reads the modelling fields, the stage the rest."""

    stage: ClassVar[str] = "01_topics"
    title: ClassVar[str] = "topic"

    policy_date: str = POLICY_DATE  # marked in the topics-over-time figure
    min_cell_users: int = 10
    embedding_backend: str = "static"  # static (Model2Vec distilled from MiniLM) | minilm | a sentence-transformers name or folder
    min_topic_size: int | None = None  # HDBSCAN min_cluster_size; None: 0.25% of the fit sample, at least 10
    min_samples: int | None = None  # HDBSCAN min_samples; None: a fifth of min_topic_size (fewer outliers)
    n_neighbors: int = 15
    n_components: int = 5
    umap_epochs: int = 200  # UMAP's own default above 10k points; 500 (its default below) costs ~3x for ~0.01 ARI
    outlier_strategy: str = "embeddings"  # embeddings | c-tf-idf | distributions | none
    outlier_threshold: float = 0.3  # min cosine similarity to a topic centroid to leave the outlier topic
    knn: int = 5  # documents outside the fit sample take the majority topic of this many nearest clustered ones
    opening_weight: float = 0.15  # share of the opening turn in a document's embedding (0: the whole user side only)
    topic_seed: int = SEED  # UMAP / HDBSCAN sample and UMAP's random_state
    fit_sample: int = 10000  # UMAP + HDBSCAN run on at most this many documents; the rest are assigned
    max_documents: int | None = None  # a seeded sample of at most this many conversations (None: all)
    representation: str = "mmr"  # mmr | keybert | ctfidf: the words topic labels are made of
    top_n_words: int = 10
    min_df: float = 0.002  # share of documents a keyword must occur in (a count if 1 or more; at least 2: drops names, typos, ids)
    max_chars: int = 2000
    cache_dir: str | None = None  # embeddings + static model cache (None: data/cache of the checkout)
    engine: str = "pandas"  # pandas | dask (clean, embed and assign on a Dask cluster; docs/scale.md)
    dask_scheduler: str | None = None  # a scheduler address; None: $DASK_SCHEDULER_ADDRESS or a LocalCluster

    def __post_init__(self):
        super().__post_init__()
        if self.outlier_strategy not in OUTLIER_STRATEGIES:
            raise ValueError(f"outlier_strategy must be one of {OUTLIER_STRATEGIES}, got {self.outlier_strategy!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.fit_sample < 50:
            raise ValueError("fit_sample must be at least 50")
        if self.n_components < 2 or self.n_neighbors < 2:
            raise ValueError("n_components and n_neighbors must be at least 2")
        if not -1 <= self.outlier_threshold <= 1:
            raise ValueError("outlier_threshold is a cosine similarity in [-1, 1]")
        if self.min_df <= 0 or (self.min_df >= 1 and self.min_df != int(self.min_df)):
            raise ValueError(f"min_df is a share of documents in (0, 1) or a whole count >= 1, got {self.min_df}")
        if not 0 <= self.opening_weight <= 1:
            raise ValueError(f"opening_weight is a share in [0, 1], got {self.opening_weight}")

    def min_document_count(self, n: int) -> int:
        """Documents (of `n`) a keyword must occur in: `min_df` as a share or a count, at least 2, at most n // 20."""
        want = int(self.min_df) if self.min_df >= 1 else max(2, math.ceil(self.min_df * n))
        return min(want, max(1, n // 20))

    def cluster_sizes(self, n_fit: int) -> tuple[int, int]:
        mts = self.min_topic_size or max(10, int(round(0.0025 * n_fit)))
        ms = self.min_samples or max(2, mts // 5)
        return int(mts), int(ms)


@dataclass(frozen=True)
class MappingSettings(StageSettings):
    stage: ClassVar[str] = "02_ad_mapping"
    title: ClassVar[str] = "ad-mapping"

    min_cell_users: int = 10
    mapping_backend: str = "minilm"  # topic -> IAB similarity (few texts; clearly better than static here)
    detector_backend: str = "minilm"  # the sensitive-topic detector's embeddings: minilm | student (the fast option, less precise)
    mapping_threshold: float = 0.3  # min cosine similarity between a topic and its best IAB node; below: unmapped
    categorizer_model: str | None = None  # per-conversation tier-1 model (.npz); None: the shipped one (ShareGPT gold train split)
    fit_categorizer: bool | str = "auto"  # refit it on the run's tier-1 labels: True, False, or "auto" (at least min_labels_to_fit)
    overrides_file: str | None = "configs/mapping_overrides.yaml"  # analyst overrides (topic -> IAB id, category -> ad nodes)
    detector_params: str | None = None  # None: the shipped defaults (fitted on hand-labeled ShareGPT conversations)
    fit_detector: bool | str = "auto"  # refit on labels: True, False, or "auto" (at least min_labels_to_fit labels)
    # how a refit fits: "simulated" (C 2, TF-IDF part, heads from 40 positives: what the simulated worlds' recall bars
    # need) or "real_chat" (C 0.005, no TF-IDF, heads from 20: how the shipped detector was fitted on real chats)
    detector_fitting: str = "simulated"
    min_labels_to_fit: int = 200
    cv_folds: int = 5  # refit by K-fold cross-fitting (validated out of fold over all labels); 1 or less: a tune_share split
    tune_share: float = 0.5
    labels_path: str | tuple[str, ...] | None = None  # labels file(s) instead of the ingested labels
    labels_split: str | None = None  # keep only labels whose split column holds this value (the gold set: test)
    seed: int = SEED
    use_truth_topics: bool = False  # development only: the simulator's true topics instead of stage 01's
    cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.detector_fitting not in DETECTOR_FITTINGS:
            raise ValueError(f"detector_fitting must be one of {DETECTOR_FITTINGS}, got {self.detector_fitting!r}")
        if self.detector_backend in RETIRED_DETECTOR_BACKENDS:
            raise ValueError(f"{self.title} setting detector_backend={self.detector_backend!r} (a run config's `params:`, --set or the "
                             f"notebook's parameters): {RETIRED_DETECTOR_BACKENDS[self.detector_backend]}")


@dataclass(frozen=True)
class LeakageSettings(StageSettings):
    stage: ClassVar[str] = "03_leakage"
    title: ClassVar[str] = "leakage"

    policy_date: str = POLICY_DATE
    excluded_regions: tuple[str, ...] | None = None
    min_cell_users: int = 10
    alpha: float = 0.05
    leak_tolerance: float = 0.01  # the leak rate the platform's promise is tested against (one-sided exact test)
    exposure_window_days: float = 30.0
    exposure_permutations: int = 9999  # most user-level permutations per black-box exposure test (sequential: a null test stops early)
    n_boot: int = 4000  # bootstrap draws of the misclassification-corrected CI
    control_topics: dict | None = None  # positive controls: topic -> IAB node(s); None: hiking, cooking, fitness, video games, dogs
    seed: int = SEED
    engine: str = "pandas"
    dask_scheduler: str | None = None


@dataclass(frozen=True)
class LiftSettings(StageSettings):
    stage: ClassVar[str] = "04_engagement_lift"
    title: ClassVar[str] = "lift"

    policy_date: str = POLICY_DATE
    excluded_regions: tuple[str, ...] | None = None
    alpha: float = 0.05
    expected_holdout_share: float | None = 0.10  # the holdout share the design promises (SRM check); None skips it
    target_rel_lift: float = 0.05  # the relative lift the power calculation asks about
    lift_permutations: int = 5000  # permutations of region randomization inference and of the A/B test
    min_cell_users: int = 10
    seed: int = SEED
    engine: str = "pandas"
    dask_scheduler: str | None = None


@dataclass(frozen=True)
class SummarySettings(StageSettings):
    stage: ClassVar[str] = "05_summary"
    title: ClassVar[str] = "summary"

    leak_tolerance: float = 0.01
    min_cell_users: int = 10


STAGE_SETTINGS: dict[str, type[StageSettings]] = {
    c.stage: c for c in (IngestSettings, TopicSettings, MappingSettings, LeakageSettings, LiftSettings, SummarySettings)
}
