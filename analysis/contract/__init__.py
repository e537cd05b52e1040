"""The contract layer: what stages, inputs and outputs agree on (imports nothing else of the package).

- `schemas`: the input tables' columns and keys, and `DataError`;
- `art9`: the GDPR Art. 9 categories, read once from `analysis/data/art9.yaml`;
- `stages`: stage ids and names;
- `rundir`: `RunDir`, the typed paths of every artifact of a run and which stage writes it;
- `metric_names`: every metric name a stage may record (shared by the writers and the summary);
- `settings`: one frozen settings dataclass per stage, holding the defaults.
"""
