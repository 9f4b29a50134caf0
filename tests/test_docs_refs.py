"""The code cites documentation that lives in the repository, and every cited section exists.

Citations take the form ``docs/<file>.md#<anchor>``, where the anchor is the GitHub slug of a
heading of that file (lower case, punctuation dropped, spaces as hyphens). Inside ``docs/``,
relative links ``(<file>.md#<anchor>)`` are checked the same way.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Background notes that are not part of the repository must never be cited.
OUTSIDE = re.compile(r"\b(?:DESIGN|THEORY|PAPER)\.md\b")
CITATION = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+))?")
SECTION_SIGN = re.compile(r"docs/[A-Za-z0-9_.-]+\.md\s*(?:§|section\s+\d)")
RELATIVE_LINK = re.compile(r"\]\(([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+))?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _sources() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder, pattern in (
        ("geomkit", "*.py"),
        ("tests", "*.py"),
        ("benchmarks", "*.py"),
        ("notebooks", "*.ipynb"),
        ("docs", "*.md"),
    ):
        files += sorted((ROOT / folder).rglob(pattern))
    return [f for f in files if f.is_file() and ".ipynb_checkpoints" not in f.parts]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in " -_" or category[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@cache
def anchors(name: str) -> tuple[str, ...]:
    """Every heading anchor of ``docs/<name>``, in order (GitHub numbers repeats ``-1``, ...)."""
    seen: dict[str, int] = {}
    out = []
    fenced = False
    for line in (DOCS / name).read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.append(base if count == 0 else f"{base}-{count}")
    return tuple(out)


def _citations() -> list[tuple[str, int, str, str | None]]:
    """``(file, line, doc, anchor)`` of every docs citation in the scanned files."""
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                found.append((rel, number, match.group(1), match.group(2)))
            if rel.startswith("docs/"):
                for match in RELATIVE_LINK.finditer(line):
                    found.append((rel, number, match.group(1), match.group(2)))
    return found


def test_slug_follows_github() -> None:
    assert slug("Sign test and zeros") == "sign-test-and-zeros"
    assert slug("`sago_prefer_retain`") == "sago_prefer_retain"
    assert slug("R2b") == "r2b"
    assert slug("Ties, undefined and non-finite cases") == "ties-undefined-and-non-finite-cases"


def _lines_matching(pattern: re.Pattern) -> list[str]:
    """``path:line: text`` of every source line that ``pattern`` finds."""
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]


def test_nothing_cites_files_outside_the_repository() -> None:
    offenders = _lines_matching(OUTSIDE)
    assert not offenders, "cite docs/method.md, docs/theory.md or docs/schema.md instead:\n" + (
        "\n".join(offenders)
    )


def test_citations_use_anchors_not_section_numbers() -> None:
    offenders = _lines_matching(SECTION_SIGN)
    assert not offenders, "cite docs/<file>.md#<anchor>, not section numbers:\n" + (
        "\n".join(offenders)
    )


def test_the_code_cites_the_documentation() -> None:
    cited = {doc for _, _, doc, _ in _citations()}
    assert {"method.md", "theory.md", "schema.md"} <= cited


def test_every_cited_document_and_section_exists() -> None:
    missing = []
    for rel, number, doc, anchor in _citations():
        if not (DOCS / doc).is_file():
            missing.append(f"{rel}:{number}: docs/{doc} does not exist")
        elif anchor is not None and anchor not in anchors(doc):
            missing.append(f"{rel}:{number}: docs/{doc} has no section #{anchor}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("name", ["method.md", "theory.md"])
def test_anchors_are_unique(name: str) -> None:
    found = anchors(name)
    assert len(found) > 5
    assert not [a for a in found if re.search(r"-\d+$", a) and a.rsplit("-", 1)[0] in found]


def test_theory_has_a_section_per_claim() -> None:
    from geomkit.theory import CLAIMS

    for claim in CLAIMS:
        assert claim.lower() in anchors("theory.md"), f"docs/theory.md has no section {claim}"


def test_method_has_a_section_per_strategy_and_objective() -> None:
    from geomkit.objectives import OBJECTIVES

    # The built-in strategies (tests may register more names in the same process).
    builtin = ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur")
    found = anchors("method.md")
    for name in (*builtin, *OBJECTIVES):
        assert name in found, f"docs/method.md has no section for {name!r}"
