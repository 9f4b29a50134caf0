"""docs/schema.md documents every variable, coordinate and the schema version of the store."""

from __future__ import annotations

from pathlib import Path

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
