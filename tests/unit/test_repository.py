"""The repository stands alone: no file in it names a file outside it.

Docstrings and docs once cited notes that lived next to the repository, not in it (a
specification, measured baselines, working notes); a reader of a fresh clone could not
follow them. What they said now lives in docs/. This test keeps it that way: it reads
every file git tracks (and every new file not ignored) and names each line that points
outside.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

# Spelled in pieces, so this file does not match itself (nor `grep -rn` over the tree).
OUTSIDE = (
    "../" + "shared",
    "shared" + "/",
    "SPEC" + ".md",
    "BASE" + "LINES.md",
    "NOTES" + ".md",
)


def tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_no_file_names_a_file_outside_the_repository() -> None:
    files = tracked_files()
    assert "README.md" in files and "tests/test_repository.py" in files
    found: list[str] = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the worktree, not yet committed
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (screenshots)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            hits = [ref for ref in OUTSIDE if ref in line]
            if hits:
                found.append(f"{name}:{number}: {', '.join(hits)}: {line.strip()[:120]}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


MARKDOWN = ["README.md", "docs/API.md", "docs/OPERATIONS.md", "docs/SECURITY.md",
            "docs/ARCHITECTURE.md", "docs/BENCHMARKS.md", "examples/portal_backoffice/README.md"]
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_fits_on_a_screen_or_four() -> None:
    lines = (REPO / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail into docs/"


@pytest.mark.parametrize("name", MARKDOWN)
def test_relative_links_lead_to_files_and_headings_that_exist(name: str) -> None:
    source = REPO / name
    broken: list[str] = []
    for target in LINK.findall(source.read_text("utf-8")):
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            broken.append(target)
            continue
        if anchor and file.suffix == ".md":
            headings = {_anchor(line.lstrip("#")) for line in
                        file.read_text("utf-8").splitlines() if line.startswith("#")}
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{name}: broken links {broken}"
