"""The IAB 3.0 loader and the Art. 9 map: real data loads, bad input fails loudly and precisely."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from analysis.contract.art9 import ART9
from analysis.util.taxonomy import TaxonomyError, art9_data_path, category_ad_nodes, descendants, load_art9, load_taxonomy, tier1_of


def test_iab_3_loads_with_the_expected_shape():
    t = load_taxonomy()
    assert len(t) == 704 and t["id"].is_unique and t["path"].is_unique
    assert list(t.columns) == ["id", "label", "path", "tier", "parent_id", "tier1_id", "tier1_label"]
    row = t.set_index("id").loc["317"]
    assert row["path"] == "Medical Health > Diseases and Conditions > Diabetes" and row["tier"] == 3
    assert row["parent_id"] == "287" and row["tier1_id"] == "286"
    t1 = tier1_of(pd.Series(["317", "nope", None]))
    assert t1.iloc[0] == "286" and t1.iloc[1:].isna().all()
    assert t.loc[t["tier"] == 1, "parent_id"].isna().all()


def _write_json(tmp_path, nodes, name="tax.json"):
    p = tmp_path / name
    p.write_text(json.dumps(nodes))
    return str(p)


def _write_csv(tmp_path, rows, name="tax.csv"):
    p = tmp_path / name
    p.write_text("id,parent_id,label\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return str(p)


GOOD = [
    {"id": "1", "label": "A", "path": ["A"]},
    {"id": "2", "label": "B", "path": ["A", "B"]},
    {"id": "3", "label": "C", "path": ["A", "B", "C"]},
]


def test_small_json_and_csv_taxonomies_load(tmp_path):
    t = load_taxonomy(_write_json(tmp_path, GOOD))
    assert t.set_index("id").loc["3", "path"] == "A > B > C" and t.set_index("id").loc["3", "tier1_id"] == "1"
    c = load_taxonomy(_write_csv(tmp_path, [("1", "", "A"), ("2", "1", "B"), ("3", "2", "C")]))
    assert c.set_index("id").loc["3", "path"] == "A > B > C" and c.set_index("id").loc["3", "tier"] == 3


@pytest.mark.parametrize(
    "nodes, needle",
    [
        (GOOD + [{"id": "2", "label": "D", "path": ["A", "D"]}], "duplicate node id '2'"),
        (GOOD + [{"id": "4", "label": "B", "path": ["A", "B"]}], "duplicate path A > B"),
        (GOOD + [{"id": "4", "label": "E", "path": ["X", "E"]}], "parent path 'X' is not a node"),
        (GOOD + [{"id": "4", "label": "E", "path": ["A", "F"]}], "does not end with its label"),
        (GOOD + [{"id": "4", "label": "E", "parent": "99"}], "unknown parent id '99'"),
        (GOOD + [{"id": "4", "label": "E", "parent": "4"}], "cycle"),
        (GOOD + [{"id": "4", "label": "E", "parent": "1", "path": ["A", "B", "E"]}], "disagrees with path"),
        (GOOD + [{"label": "no id"}], "missing field"),
        ([], "non-empty list"),
    ],
)
def test_bad_json_taxonomy_names_file_node_and_reason(tmp_path, nodes, needle):
    path = _write_json(tmp_path, nodes)
    with pytest.raises(TaxonomyError) as e:
        load_taxonomy(path)
    assert needle in str(e.value) and "tax.json" in str(e.value)


def test_parent_cycle_in_a_csv_taxonomy_is_reported(tmp_path):
    path = _write_csv(tmp_path, [("1", "", "A"), ("2", "3", "B"), ("3", "2", "C")])
    with pytest.raises(TaxonomyError, match=r"tax\.csv: node \d \(id [23]\): cycle in parent links \([23] -> [23] -> [23]\)"):
        load_taxonomy(path)


def test_unreadable_taxonomy(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"id": "1", ')
    with pytest.raises(TaxonomyError, match="broken.json: cannot read"):
        load_taxonomy(str(p))


# ------------------------------------------------------------------------------ Art. 9 map


def test_art9_map_covers_the_iab_subtrees_and_the_audit_categories():
    spec = load_art9()
    nm = spec.node_map()
    assert nm["317"] == "health" and nm["301"] == "health" and nm["286"] == "health"
    assert nm["459"] == "religion" and nm["461"] == "religion"
    assert nm["387"] == "politics" and nm["8YPBBL"] == "politics"
    assert "456" not in nm  # astrology is carved out of Religion & Spirituality
    assert "225" not in nm  # Healthy Living > Fitness is not health data
    ids = {c: k.id for c, k in spec.categories.items()}
    assert ids["sexual_orientation"] == "AUD-SEXOR" and ids["trade_union"] == "AUD-UNION"
    assert {k.source for c, k in spec.categories.items() if c in ("health", "religion", "politics")} == {"iab"}
    assert all(spec.categories[c].description and len(spec.categories[c].exemplars) >= 10 for c in ART9)
    assert descendants("453") >= {"459", "461", "456"}


def test_ad_node_table_matches_the_documented_defaults_and_is_overridable():
    ads = category_ad_nodes()
    assert ads == {
        "health": ["317", "301", "305"], "religion": ["459", "461", "455"], "politics": ["387", "388", "386"],
        "sexual_orientation": ["Z7rJBM", "188"], "ethnicity": ["Z7rJBM", "186"],
        "philosophical_beliefs": ["213", "457", "Z7rJBM"], "trade_union": ["123", "383"],
    }
    assert category_ad_nodes({"health": ["286"]})["health"] == ["286"]
    with pytest.raises(TaxonomyError, match="unknown IAB node"):
        category_ad_nodes({"health": ["nope"]})
    with pytest.raises(TaxonomyError, match="unknown category"):
        category_ad_nodes({"astrology": ["456"]})


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["categories"]["health"].update(ad_nodes=["317", "XXXX"]), "health: ad_nodes has unknown IAB node id(s) ['XXXX']"),
        (lambda d: d["categories"].pop("trade_union"), "categories must be exactly"),
        (lambda d: d["categories"]["ethnicity"].update(id="AUD-SEXOR"), "duplicate id 'AUD-SEXOR'"),
        (lambda d: d["categories"]["religion"].update(iab_subtrees=["286"]), "in the subtrees of both"),
        (lambda d: d["categories"]["politics"]["lexicon"]["strong"].append("(unclosed"), "bad strong lexicon rule"),
        (lambda d: d["categories"]["ethnicity"].update(id="317", source="audit"), "collides with an IAB node"),
    ],
)
def test_bad_art9_file_is_refused_with_a_precise_message(tmp_path, edit, needle):
    d = yaml.safe_load(art9_data_path().read_text())
    edit(d)
    p = tmp_path / "art9.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TaxonomyError) as e:
        load_art9(p)
    assert needle in str(e.value)
