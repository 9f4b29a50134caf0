"""docs/schema.md documents every variable, coordinate and the schema version of the store, and
every statistic and metric of the field table (geomkit.fields)."""

from __future__ import annotations

import re
from pathlib import Path

from geomkit.fields import FIELD_TABLE, FIELDS, METRIC_TABLE, STORED_FIELDS
from geomkit.store import COORDINATES, SCHEMA, SCHEMA_VERSION, VARIABLES

DOC = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text()


def test_schema_doc_names_version() -> None:
    assert f"`{SCHEMA}` version {SCHEMA_VERSION}" in DOC


def test_schema_doc_lists_every_variable_with_its_attributes() -> None:
    for name, spec in VARIABLES.items():
        row = next((ln for ln in DOC.splitlines() if ln.startswith(f"| `{name}` | (")), None)
        assert row is not None, f"docs/schema.md has no row for variable {name}"
        for key in ("long_name", "units", "description", "dtype"):
            assert str(spec[key]) in row, f"{name}: {key} {spec[key]!r} not in docs/schema.md"
        assert f"({', '.join(spec['dims'])})" in row


def test_schema_doc_lists_every_coordinate() -> None:
    for name, spec in COORDINATES.items():
        row = next((ln for ln in DOC.splitlines() if ln.startswith(f"| `{name}` | (")), None)
        assert row is not None, f"docs/schema.md has no row for coordinate {name}"
        assert spec["description"] in row


def _rows(section: str, columns: int) -> list[list[str]]:
    """The cells of the ``columns``-column table rows under ``## section`` of docs/schema.md
    (first cell a name in backquotes; escaped pipes restored)."""
    text = DOC.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == columns and cells[0].startswith("`"):
            out.append([cells[0].strip("`"), *(c.replace("\\|", "|") for c in cells[1:])])
    return out


def test_schema_doc_geometry_variables_are_the_table_fields() -> None:
    # every data-variable row with a record dimension is a stored field of the table, in order
    documented = [r[0] for r in _rows("Data variables", 6) if "record" in r[1]]
    assert documented == list(STORED_FIELDS)
    for name in documented:
        assert VARIABLES[name] == FIELD_TABLE[name].spec()
    assert COORDINATES["numel"] == FIELD_TABLE["numel"].attrs


def test_schema_doc_lists_every_field_with_its_role() -> None:
    rows = {r[0]: r for r in _rows("Statistics fields and derived metrics", 3)}
    assert list(rows) == list(FIELDS), "the field rows must list geomkit.fields.FIELDS in order"
    for name, field in FIELD_TABLE.items():
        _, role, stored = rows[name]
        assert role == field.role
        if field.constant is not None:
            assert stored == f"not stored: {field.constant:g} per tensor"
        else:
            kind = "coordinate" if field.role == "size" else "data variable"
            assert stored == f"{kind} ({', '.join(field.dims)})"


def test_schema_doc_lists_every_metric_with_its_attributes() -> None:
    rows = {r[0]: r for r in _rows("Statistics fields and derived metrics", 6)}
    assert list(rows) == list(METRIC_TABLE)
    for name, metric in METRIC_TABLE.items():
        _, role, inputs, long_name, units, description = rows[name]
        assert (role, long_name, units, description) == (
            metric.role,
            metric.long_name,
            metric.units,
            metric.description,
        )
        assert inputs == ", ".join(metric.inputs)
