"""docs/data-contract.md documents every table and column of the schema in code, and the README links it."""

from __future__ import annotations

import re

from analysis.contract.schemas import SCHEMAS
from analysis.pipeline import PROJECT_ROOT


def test_the_data_contract_names_every_table_and_column():
    doc = (PROJECT_ROOT / "docs" / "data-contract.md").read_text()
    for table, schema in SCHEMAS.items():
        assert re.search(rf"^### {table}\b", doc, re.M) or f"`{table}.csv`" in doc, table
        for c in schema.columns:
            row = re.search(rf"^\| {c.name} \| .*\| (yes|no) \|", doc, re.M)
            assert row, f"{table}.{c.name} is not in the data contract"
            assert (row.group(1) == "yes") == c.required, f"{table}.{c.name}: required={c.required} in code"


def test_readme_links_the_contract_and_nothing_outside_the_repository():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "docs/data-contract.md" in readme
    assert not re.search(r"\]\(\.\./", readme), "a link leaves the repository"
