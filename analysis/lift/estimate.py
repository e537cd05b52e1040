"""The lift estimate every two-group and DiD comparison returns: an absolute CTR lift and its ratio."""

from __future__ import annotations

from dataclasses import dataclass

from analysis.util.stats import fmt_ci


@dataclass
class LiftEstimate:
    """Absolute CTR lift with its t interval, and the relative lift with delta and Fieller intervals."""

    abs_lift: float
    se: float
    ci: tuple[float, float]
    p_value: float
    df: float
    rel_lift: float
    rel_se: float
    rel_ci_delta: tuple[float, float]
    rel_ci_fieller: tuple[float, float]

    def _summary_columns(self, estimator: str) -> dict:
        """The summary() columns every lift estimate shares; subclasses append their own."""
        return {
            "estimator": [estimator],
            "abs_lift": [self.abs_lift],
            "abs_ci": [fmt_ci(self.ci, 5)],
            "rel_lift": [self.rel_lift],
            "rel_ci_delta": [fmt_ci(self.rel_ci_delta)],
            "rel_ci_fieller": [fmt_ci(self.rel_ci_fieller)],
            "p_value": [self.p_value],
        }
