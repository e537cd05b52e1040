"""One source of parameters: the settings dataclasses hold the defaults; notebook parameter cells are
generated from them; configs/default.yaml sets exactly those defaults; names mean one thing."""

from __future__ import annotations

from dataclasses import fields

import nbformat
import papermill
import pytest
import yaml

from analysis.contract.settings import DETECTOR_FITTINGS, STAGE_SETTINGS, LeakageSettings, MappingSettings, TopicSettings
from analysis.pipeline import NOTEBOOK_DIR, PROJECT_ROOT, parameters_cell, stage_notebooks


def _parameters_cell(nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    return next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), nb


def test_every_stage_notebook_has_settings_and_a_generated_parameters_cell():
    nbs = stage_notebooks(NOTEBOOK_DIR)
    assert [p.stem for p in nbs] == list(STAGE_SETTINGS)
    for p in nbs:
        cell, nb = _parameters_cell(p)
        assert cell.source == parameters_cell(p.stem), f"{p.name}: run `make notebook-params` (the cell differs from {STAGE_SETTINGS[p.stem].__name__})"
        # papermill must see every setting (it skips lines holding two '=', e.g. a '>=' in a comment)
        seen = {q["name"] for q in papermill.inspect_notebook(str(p)).values()}
        assert seen - {"run_dir"} == {f.name for f in fields(STAGE_SETTINGS[p.stem])}, p.name
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert f"{STAGE_SETTINGS[p.stem].__name__}.from_namespace(globals())" in code, p.name


def test_default_config_sets_the_dataclass_defaults():
    params = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text())["params"]
    declared = {}
    for stage, cls in STAGE_SETTINGS.items():
        for f in fields(cls):
            declared.setdefault(f.name, []).append((stage, f.default))
    unknown = set(params) - set(declared)
    assert not unknown, f"configs/default.yaml sets parameters no stage declares: {sorted(unknown)}"
    for k, v in params.items():
        for stage, default in declared[k]:
            assert v == default, f"configs/default.yaml {k}: {v!r}, but {STAGE_SETTINGS[stage].__name__}.{k} defaults to {default!r}"


@pytest.mark.parametrize("config", ["real.yaml", "sharegpt.yaml"])
def test_run_configs_set_only_declared_parameters_and_their_files_exist(config):
    params = yaml.safe_load((PROJECT_ROOT / "configs" / config).read_text())["params"]
    declared = {f.name for cls in STAGE_SETTINGS.values() for f in fields(cls)}
    assert not set(params) - declared, f"configs/{config} sets parameters no stage declares: {sorted(set(params) - declared)}"
    for key in ("labels_path", "overrides_file"):
        for p in [params[key]] if isinstance(params.get(key), str) else params.get(key) or []:
            assert (PROJECT_ROOT / p).exists(), f"configs/{config} {key}: {p} does not exist"


def test_a_name_shared_by_stages_has_one_default_and_type():
    seen = {}
    for cls in STAGE_SETTINGS.values():
        for f in fields(cls):
            if f.name in seen:
                assert (f.default, str(f.type)) == seen[f.name][1:], f"{f.name}: {cls.__name__} disagrees with {seen[f.name][0]}"
            else:
                seen[f.name] = (cls.__name__, f.default, str(f.type))
    # the permutation counts of stages 03 and 04 mean different things and so have different names
    assert "n_permutations" not in seen and {"exposure_permutations", "lift_permutations"} <= set(seen)


def test_settings_refuse_unknown_keys_and_take_none_as_the_default():
    with pytest.raises(ValueError, match=r"unknown leakage setting\(s\): \['tolerance'\]"):
        LeakageSettings.from_dict({"tolerance": 0.02})
    s = TopicSettings.from_dict({"embedding_backend": None, "min_topic_size": None, "topic_seed": 5})
    assert s.embedding_backend == "static" and s.min_topic_size is None and s.topic_seed == 5
    m = MappingSettings.from_dict({"labels_path": ["a.csv", "b.csv"]})
    assert m.labels_path == ("a.csv", "b.csv")  # YAML lists become tuples: settings are frozen values
    with pytest.raises(AttributeError):
        m.seed = 1  # frozen


def test_from_namespace_reads_a_notebooks_globals():
    ns = {"run_dir": "x", "leak_tolerance": 0.02, "exposure_permutations": 99, "plt": object()}
    s = LeakageSettings.from_namespace(ns)
    assert (s.leak_tolerance, s.exposure_permutations, s.alpha) == (0.02, 99, 0.05)


def test_detector_fitting_names_a_refit_preset_and_refuses_others():
    """`detector_fitting` picks how stage 02 refits the detector on a run's labels: the simulated worlds' preset
    or the one the shipped detector was fitted with on real chats; a misspelt name is an error, not a default."""
    from analysis.detector.model import FITTINGS, REAL_CHAT_FITTING

    assert MappingSettings().detector_fitting == "simulated"
    assert FITTINGS[MappingSettings(detector_fitting="real_chat").detector_fitting] == REAL_CHAT_FITTING
    assert set(FITTINGS) == set(DETECTOR_FITTINGS)
    with pytest.raises(ValueError, match="detector_fitting must be one of"):
        MappingSettings(detector_fitting="realchat")


def test_a_bad_setting_value_stops_the_runner_before_any_stage(tmp_path):
    """The runner builds every selected stage's settings from the config before it runs a notebook: a bad value
    (here the retired `static` detector, whose message says what to use) fails at once, naming the config file,
    and no run folder is made."""
    from analysis.pipeline import run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"params": {"detector_backend": "static"}}))
    reports = tmp_path / "reports"
    with pytest.raises(ValueError, match=r"c\.yaml: ad-mapping setting detector_backend='static'.*use 'student'"):
        run(cfg, reports_dir=reports)
    with pytest.raises(ValueError, match="detector_fitting must be one of"):
        run(None, sets=["detector_fitting=realchat"], stages=["02"], reports_dir=reports)
    assert not reports.exists()
