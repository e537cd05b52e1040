"""Validation against a simulated world's truth.

- `truth`: the truth a run folder carries (copied there by stage 00 from a simulated world) and
  the evaluation step that sets it beside the estimates (after estimation, never inside `fit`);
- `worlds`: simulation studies: simulate a world, run the estimators, compare with the truth
  (the only production code that imports `analysis.simulate`).
"""
