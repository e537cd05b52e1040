"""The real-chat world beside the simulated one: real ShareGPT texts and hand labels, its truth from
the labels. Stages 00, 03, 04 and 05 run on a small one and the labels-based leak rates cover their
truth (stage 02's detector flags do not enter the labels basis: a stand-in without flags takes its
place here; `make real` runs all six stages)."""

from __future__ import annotations

from analysis.contract.art9 import ART9
from analysis.contract.settings import IngestSettings, LeakageSettings, LiftSettings
from analysis.stages import ingest, leakage, lift, summary
from analysis.util.metrics import read_metrics
from analysis.util.storage import write_parquet


def test_stages_run_on_the_real_chat_world_and_cover_the_labels_truth(real_world_dir, tmp_path):
    rd = tmp_path / "run"
    res = ingest.run(rd, IngestSettings(input_dir=str(real_world_dir)))
    assert len(res.inputs.quarantine) == 0 and len(res.conversations) == 800
    assert "arm" not in res.inputs.impressions  # no randomized holdout, as in most external audits
    cats = res.conversations[["conversation_id"]].assign(any_sensitive=False, iab_id=None, tier1_id=None)
    cats["iab_ids"] = [[] for _ in range(len(cats))]
    for c in ART9:
        cats[f"flag_{c}"], cats[f"score_{c}"] = False, 0.0
    write_parquet(cats, rd / "data" / "conversation_categories.parquet")
    leakage.run(rd, LeakageSettings(exposure_permutations=49, n_boot=100))
    lift.run(rd, LiftSettings(lift_permutations=49))
    m = read_metrics(rd, "03_leakage")
    # the exact (Clopper-Pearson) interval: some categories have only a handful of labeled conversations here
    lr = m[(m["metric"] == "leak_rate_cp") & m["group"].map(lambda g: g.get("basis") == "labels" and g.get("region_group") == "all")]
    lr = lr[lr["estimate"].notna() & lr["truth"].notna()]
    assert len(lr) >= 3
    assert ((lr["ci_low"] <= lr["truth"]) & (lr["truth"] <= lr["ci_high"])).all(), lr[["group", "estimate", "ci_low", "ci_high", "truth"]]
    answers = {a.key: a.sentence for a in summary.run(rd).answers()}
    assert "passed the filter" in answers["leakage"]
    assert "difference-in-differences" in answers["lift"] and "no holdout arm" in answers["lift"] or "randomized" not in answers["lift"]
