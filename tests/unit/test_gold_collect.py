"""The gold set's collect.py over several labeling rounds: a round folder per round (DIR, DIR/round3/),
per-round disagreements and adjudication, kappa pooled and per round, final labels from all rounds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

COLLECT = Path(__file__).resolve().parents[2] / "data" / "labels" / "gold" / "collect.py"
HEADER = "item_id,art9,self_disclosure,iab_tier1,borderline,language,note\n"


@pytest.fixture(scope="module")
def collect():
    spec = importlib.util.spec_from_file_location("gold_collect", COLLECT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _key(rows):
    return pd.DataFrame(rows, columns=["item_id", "conversation_id", "stratum", "split", "labelers", "adjudicator"])


def _answers(path: Path, rows: list[str]) -> None:
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def folders(tmp_path):
    """Round 1 in DIR (L1, L2; g0002 read by both, agreeing); round 3 in DIR/round3 (L9, L10; g0004 read
    by both, disagreeing on politics and tier-1; adjudicator L11)."""
    r1, r3 = tmp_path, tmp_path / "round3"
    r3.mkdir()
    _key([["g0001", "a_0", "random", "train", "L1", ""], ["g0002", "b_0", "random", "test", "L1;L2", "L3"],
          ["g0003", "c_0", "random", "train", "L2", ""]]).to_csv(r1 / "key.csv", index=False)
    _answers(r1 / "labels_L1.csv", ["g0001,health,true,Medical Health,false,en,own diagnosis",
                                    "g0002,,false,Technology & Computing,false,en,python help"])
    _answers(r1 / "labels_L2.csv", ["g0002,,false,Technology & Computing,false,en,python",
                                    "g0003,religion,false,Religion & Spirituality,false,en,bible study"])
    _key([["g0004", "d_0", "r3uncertain:politics", "train", "L9;L10", "L11"],
          ["g0005", "e_3", "r3random", "train", "L9", ""]]).to_csv(r3 / "key.csv", index=False)
    _answers(r3 / "labels_L9.csv", ["g0004,politics,false,Politics,true,en,election campaign",
                                    "g0005,,false,Travel,false,en,trip plan"])
    _answers(r3 / "labels_L10.csv", ["g0004,,false,Business and Finance,false,en,lobbying firm ad"])
    (r3 / "packet_L9.md").write_text("# Packet L9\n\n\n===== item g0004 (1/2) =====\nexcerpt four\n", encoding="utf-8")
    return r1, r3


def test_rounds_collected_with_their_own_adjudication(collect, folders, tmp_path):
    r1, r3 = folders
    out = tmp_path / "out"
    assert collect.main(["--dir", str(r1), "--out", str(out)]) == 0
    # the round-3 disagreement goes to round 3's files, none to round 1's
    assert pd.read_csv(r3 / "adjudication.csv")["item_id"].tolist() == ["g0004"]
    assert pd.read_csv(r1 / "adjudication.csv").empty
    md = (r3 / "disagreements.md").read_text(encoding="utf-8")
    assert "g0004 · adjudicator L11" in md and "excerpt four" in md
    assert not (out / "labels.csv").exists()  # not adjudicated yet

    agr = pd.read_csv(out / "agreement.csv")
    assert set(agr["scope"]) == {"all", "round 1", "round 3"}
    pol = agr.set_index(["scope", "field"])
    assert pol.loc[("all", "politics"), "n_items"] == 2 and pol.loc[("round 3", "politics"), "n_items"] == 1
    assert pol.loc[("round 1", "iab_tier1"), "agreement"] == 1.0 and pol.loc[("round 3", "iab_tier1"), "agreement"] == 0.0

    assert collect.main(["--check", "ADJ", "--dir", str(r3)]) == 0  # read-only check of the empty template
    _answers(r3 / "adjudication.csv", ["g0004,politics,false,Politic,true,en,campaign strategy"])
    assert collect.main(["--check", "ADJ", "--dir", str(r3)]) == 1
    _answers(r3 / "adjudication.csv", ["g0004,politics,false,Politics,true,en,campaign strategy"])
    assert collect.main(["--dir", str(r1), "--out", str(out)]) == 0
    lab = pd.read_csv(out / "labels.csv", keep_default_na=False).set_index("conversation_id")
    assert len(lab) == 5 and lab.loc["d_0", "art9"] == "politics" and bool(lab.loc["d_0", "adjudicated"])
    assert lab.loc["d_0", "iab_tier1"] == "Politics" and lab.loc["b_0", "n_readings"] == 2
    assert lab.loc["e_3", "split"] == "train" and lab.loc["e_3", "iab_tier1"] == "Travel"


def test_bad_cells_and_check_name_file_row_and_column(collect, folders, capsys):
    r1, r3 = folders
    _answers(r3 / "labels_L10.csv", ["g0004,politcs,false,Politics,maybe,en,typo"])
    assert collect.main(["--dir", str(r1), "--out", str(r1 / "out"), "--partial"]) == 1
    err = capsys.readouterr().err
    assert "labels_L10.csv row 2 (item g0004) column art9: unknown category 'politcs'" in err
    assert "labels_L10.csv row 2 (item g0004) column borderline: expected true or false" in err
    # a labeler checks their own round-3 file against the round-3 key
    assert collect.main(["--check", "L10", "--dir", str(r3)]) == 1
    assert collect.main(["--check", "L9", "--dir", str(r3)]) == 0


def test_an_item_in_two_rounds_is_refused(collect, folders, capsys):
    r1, r3 = folders
    k = pd.read_csv(r3 / "key.csv", dtype=str, keep_default_na=False)
    k.loc[1, "conversation_id"] = "a_0"  # already labeled in round 1
    k.to_csv(r3 / "key.csv", index=False)
    assert collect.main(["--dir", str(r1), "--out", str(r1 / "out"), "--partial"]) == 1
    assert "more than one row" in capsys.readouterr().err


def test_round6_tier2_and_the_tier2_pass(collect, folders, capsys):
    """Round 6 (L21, L22) labels iab_tier2 too: validated against the tier-1's children, kappa on same-tier-1
    pairs, a tier-2-only dispute adjudicated; the tier-2 pass adds the test row b_0's tier-2 under its gold tier-1."""
    r1, r3 = folders
    r6 = r1 / "round6"
    r6.mkdir()
    _key([["g0006", "f_0", "r6random", "train", "L21;L22", "L23"], ["g0007", "h_0", "r6tier1", "train", "L21", ""]]
         ).to_csv(r6 / "key.csv", index=False)
    h6 = HEADER.rstrip("\n") + ",iab_tier2\n"
    (r6 / "labels_L21.csv").write_text(h6 + "g0006,,false,Technology & Computing,false,en,python,Computing\n"
                                       "g0007,,false,Careers,false,en,cv,Job Search\n", encoding="utf-8")
    (r6 / "labels_L22.csv").write_text(h6 + "g0006,,false,Technology & Computing,true,en,llm,Artificial Intelligence\n", encoding="utf-8")
    pd.DataFrame([["g0008", "b_0", "random", "test", "Technology & Computing", "L21;L22", "L23"]],
                 columns=["item_id", "conversation_id", "stratum", "split", "iab_tier1", "labelers", "adjudicator"]
                 ).to_csv(r6 / "tier2_key.csv", index=False)
    (r6 / "tier2_labels_L21.csv").write_text("item_id,iab_tier2,borderline,note\ng0008,Job Search,false,x\n", encoding="utf-8")
    (r6 / "tier2_labels_L22.csv").write_text("item_id,iab_tier2,borderline,note\ng0008,Computing,false,python\n", encoding="utf-8")
    assert collect.main(["--check", "L21", "--dir", str(r6)]) == 1
    out = capsys.readouterr().out
    assert ("tier2_labels_L21.csv row 2 (item g0008) column iab_tier2: 'Job Search' is not a tier-2 child of "
            "'Technology & Computing'") in out and "labels_L21.csv: 2 rows filled, 0 borderline, 0 problem(s)" in out
    (r6 / "tier2_labels_L21.csv").write_text("item_id,iab_tier2,borderline,note\ng0008,Computing,false,x\n", encoding="utf-8")
    assert collect.main(["--check", "L21", "--dir", str(r6)]) == 0

    out_dir = r1 / "out"
    assert collect.main(["--dir", str(r1), "--out", str(out_dir)]) == 0
    assert pd.read_csv(r6 / "adjudication.csv").columns[-1] == "iab_tier2"
    assert "iab_tier2=[Artificial Intelligence]" in (r6 / "disagreements.md").read_text(encoding="utf-8")
    assert pd.read_csv(r6 / "tier2_adjudication.csv").empty  # the pass readers agreed
    agr = pd.read_csv(out_dir / "agreement.csv").set_index(["scope", "field"])
    assert agr.loc[("round 6", "iab_tier2"), "agreement"] == 0.0 and agr.loc[("round 6", "iab_tier1"), "agreement"] == 1.0
    assert agr.loc[("tier2 pass (test)", "iab_tier2"), "n_items"] == 1 and ("round 3", "iab_tier2") not in agr.index

    _answers(r3 / "adjudication.csv", ["g0004,politics,false,Politics,true,en,campaign strategy"])
    (r6 / "adjudication.csv").write_text(h6 + "g0006,,false,Technology & Computing,true,en,python,Robotic\n", encoding="utf-8")
    assert collect.main(["--dir", str(r1), "--out", str(out_dir)]) == 1
    assert "adjudication.csv row 2 (item g0006) column iab_tier2: 'Robotic' is not a tier-2 child" in capsys.readouterr().err
    (r6 / "adjudication.csv").write_text(h6 + "g0006,,false,Technology & Computing,true,en,python,Computing\n", encoding="utf-8")
    assert collect.main(["--dir", str(r1), "--out", str(out_dir)]) == 0
    lab = pd.read_csv(out_dir / "labels.csv", keep_default_na=False).set_index("conversation_id")
    assert lab.loc["f_0", "iab_tier2"] == "Computing" and bool(lab.loc["f_0", "adjudicated"])
    assert lab.loc["h_0", "iab_tier2"] == "Job Search" and lab.loc["b_0", "iab_tier2"] == "Computing"
    assert lab.loc["b_0", "split"] == "test" and lab.loc["a_0", "iab_tier2"] == "" and len(lab) == 7
