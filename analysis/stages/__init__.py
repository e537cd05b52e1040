"""Stages: one module per stage, each with one entry point of one shape,

    run(run_dir: RunDir | str, settings: <Stage>Settings | None = None, engine: Engine | None = None) -> <Stage>Result

reading earlier stages' artifacts through `RunDir.require`, writing its own artifacts and
`metrics/<stage>.json`, and attaching a simulated world's truth after estimation
(`analysis.validation.truth`). Stage notebooks call these and display the result.
"""
