"""docs/STANDARDS.md is checked, not only written (issue #19, "the standards as tests").

Every row of its tables maps one requirement of NIST SP 800-63B-4 or OWASP ASVS 5.0 to a
status, the settings that control it and the tests that show it. This module fails when:

- a status is not one of the four the page allows;
- a "met" row names no test;
- a cited test does not exist (``test_file.py::test_name``, ``...::TestClass::test_name``,
  a parametrised id by its base name). A file is found by its name anywhere under
  ``tests/``, so tests may move into tiers (``tests/unit``, ``tests/api``, ...) without the
  page changing; a cited path with folders must match the end of the file's path;
- a setting named is not an environment variable that ``Settings`` reads;
- a relative link on the page leads nowhere.

Test functions are found by reading the test files with ``ast`` (no import, no pytest
collection), so this check costs a few milliseconds. The rows under "Rows to complete
after trusted devices land" are not checked: they name tests and settings that are still
being written.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydantic import AliasChoices

from mfa_service.settings import Settings

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DOC = REPO / "docs" / "STANDARDS.md"
TESTS = REPO / "tests"

STATUSES = ("met", "partly", "not met", "caller's job")
HEADER = ("id", "requirement", "status", "setting", "shown by", "how, and why")
PENDING = "## Rows to complete after trusted devices land"
NONE = "—"

CITED_TEST = re.compile(r"`([^`\s]+)`")
SETTING = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based, in the page
    section: str  # the "## " heading the table sits under
    id: str
    status: str
    setting: str
    shown_by: str


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_rows(text: str) -> tuple[list[Row], list[str]]:
    """The rows of every requirement table before the pending section, and the problems
    of shape (a row with more or fewer cells than the header: a stray '|')."""
    rows: list[Row] = []
    problems: list[str] = []
    section = ""
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(PENDING):
            break
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if tuple(cells) == HEADER:
            in_table = True
            continue
        if not in_table or set("".join(cells)) <= set("-: "):
            continue  # another table, or the header's separator
        if len(cells) != len(HEADER):
            problems.append(f"line {number}: {len(cells)} cells, expected {len(HEADER)}")
            continue
        rows.append(Row(number, section, cells[0], cells[2], cells[3], cells[4]))
    return rows, problems


def cited_tests(cell: str) -> list[str]:
    """``file.py::name`` ids in a "shown by" cell ("—": none)."""
    return [c for c in CITED_TEST.findall(cell) if "::" in c]


@cache
def _defined(path: Path) -> frozenset[str]:
    """Test ids defined in a file: ``test_x``, ``TestClass::test_x``, ``test_x = ...``."""
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test"):
                names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                         and item.name.startswith("test"))
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets
                         if isinstance(t, ast.Name) and t.id.startswith("test"))
    return frozenset(names)


def _test_files(cited_path: str) -> list[Path]:
    """The files under tests/ whose path ends with ``cited_path`` (a bare name: any
    folder)."""
    cited_path = cited_path.removeprefix("tests/")
    name = cited_path.rsplit("/", 1)[-1]
    found = []
    for path in sorted(TESTS.rglob(name)):
        relative = path.relative_to(TESTS).as_posix()
        if relative == cited_path or relative.endswith("/" + cited_path):
            found.append(path)
    return found


def missing_test(test_id: str) -> str | None:
    """Why ``test_id`` names no test, or None when it does."""
    path, sep, name = test_id.partition("::")
    if not sep or not path.endswith(".py") or not name:
        return f"{test_id!r} is not of the form test_file.py::test_name"
    name = re.sub(r"\[.*\]$", "", name)  # a parametrised id: its base name
    files = _test_files(path)
    if not files:
        return f"{test_id}: no file {path} under tests/"
    if not any(name in _defined(f) for f in files):
        return f"{test_id}: no {name} in {', '.join(str(f.relative_to(REPO)) for f in files)}"
    return None


@cache
def setting_names() -> frozenset[str]:
    """The environment variables Settings reads: its prefix and the field's name, or the
    names a field's AliasChoices lists (the OTEL_* variables)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c for c in alias.choices if isinstance(c, str) and c.isupper())
        else:
            names.add((prefix + field_name).upper())
    return frozenset(names)


def row_problems(rows: list[Row]) -> Iterator[str]:
    """Everything wrong with the rows, one sentence each."""
    known = setting_names()
    for row in rows:
        where = f"line {row.line} ({row.id})"
        if row.status not in STATUSES:
            yield f"{where}: status {row.status!r} is not one of {STATUSES}"
        tests = cited_tests(row.shown_by)
        if row.status == "met" and not tests:
            yield f"{where}: a met row must name the test that shows it"
        if not tests and row.shown_by != NONE:
            yield f"{where}: 'shown by' is neither {NONE} nor `file.py::test` ids"
        for test_id in tests:
            why = missing_test(test_id)
            if why is not None:
                yield f"{where}: {why}"
        named = SETTING.findall(row.setting)
        if not named and row.setting != NONE:
            yield f"{where}: 'setting' is neither {NONE} nor `MFA_...` names"
        for name in named:
            if name not in known:
                yield f"{where}: no setting {name} in mfa_service/settings.py"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(source: Path) -> list[str]:
    broken = []
    for target in LINK.findall(source.read_text("utf-8")):
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = {_anchor(line.lstrip("#")) for line in
                        file.read_text("utf-8").splitlines() if line.startswith("#")}
            if anchor not in headings:
                broken.append(target)
    return broken


def _doc_rows() -> list[Row]:
    rows, problems = parse_rows(DOC.read_text("utf-8"))
    assert not problems, "docs/STANDARDS.md: " + "; ".join(problems)
    return rows


def test_the_page_maps_both_standards() -> None:
    rows = _doc_rows()
    sections = {row.section for row in rows}
    assert any("800-63B-4" in s for s in sections), sections
    assert any("ASVS" in s for s in sections), sections
    # A table whose header was reworded is skipped by the parser: notice that here.
    assert len(rows) >= 80, f"only {len(rows)} rows parsed: did a table header change?"


def test_every_row_has_an_allowed_status_existing_tests_and_settings() -> None:
    problems = list(row_problems(_doc_rows()))
    assert not problems, "docs/STANDARDS.md:\n" + "\n".join(problems)


def test_the_page_links_only_to_what_exists() -> None:
    assert not broken_links(DOC), broken_links(DOC)


def test_the_readme_and_the_security_page_link_to_it() -> None:
    assert "(docs/STANDARDS.md)" in (REPO / "README.md").read_text("utf-8")
    assert "(STANDARDS.md)" in (REPO / "docs" / "SECURITY.md").read_text("utf-8")


def _table(*rows: str) -> str:
    return "\n".join([f"| {' | '.join(HEADER)} |", "| --- " * len(HEADER) + "|", *rows])


REAL = "`test_standards.py::test_the_page_maps_both_standards`"
BOGUS = "\n\n".join([
    "## NIST SP 800-63B-4",
    _table("| 1.1 | renamed test | met | — | `test_standards.py::test_no_such_thing` | x |",
           "| 1.2 | a met row with no test | met | — | — | x |",
           f"| 1.3 | a status of our own | mostly | — | {REAL} | x |",
           "| 1.4 | unknown setting | partly | `MFA_NO_SUCH_SETTING` | — | x |",
           "| 1.5 | unknown file | partly | — | `test_nowhere.py::test_x` | x |",
           "| 1.6 | a stray | pipe | met | — | — | x |",
           "| 1.7 | parametrised, a path | met | `MFA_CODE_TTL_SECONDS` | "
           "`tests/test_standards.py::test_the_page_maps_both_standards[x]` | x |"),
    PENDING,
    _table("| 9.9 | not checked yet | met | `MFA_NOT_YET` | `test_devices.py::test_later` | x |"),
])


def test_the_checks_fail_on_a_bogus_page() -> None:
    rows, shape = parse_rows(BOGUS)
    assert [r.id for r in rows] == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.7"]
    assert len(shape) == 1 and "7 cells" in shape[0]
    problems = "\n".join(row_problems(rows))
    assert "(1.1): test_standards.py::test_no_such_thing: no test_no_such_thing" in problems
    assert "(1.2): a met row must name the test" in problems
    assert "(1.3): status 'mostly'" in problems
    assert "(1.4): no setting MFA_NO_SUCH_SETTING" in problems
    assert "(1.5): test_nowhere.py::test_x: no file test_nowhere.py" in problems
    assert "(1.7)" not in problems  # the base name of a parametrised id, a tests/ path
    assert "9.9" not in problems  # the pending rows wait for their tests


def test_test_ids_resolve_by_file_name_anywhere_under_tests() -> None:
    assert missing_test("test_standards.py::test_the_checks_fail_on_a_bogus_page") is None
    assert missing_test("browser/test_portal.py::test_wrong_password_is_refused") is None
    assert missing_test("test_portal.py::test_wrong_password_is_refused") is None
    assert missing_test("unit/test_portal.py::test_wrong_password_is_refused") is not None
    assert missing_test("test_standards.py") is not None
    assert "OTEL_SERVICE_NAME" in setting_names() and "MFA_CODE_TTL_SECONDS" in setting_names()
