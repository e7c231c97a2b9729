"""The repository stands alone: no file in it names a file outside it.

Docstrings and docs once cited notes that lived next to the repository, not in it (a
specification, measured baselines, working notes); a reader of a fresh clone could not
follow them. What they said now lives in docs/. This test keeps it that way: it reads
every file git tracks (and every new file not ignored, listed by `git ls-files`: a
subprocess, hence the system tier) and names each line that points outside. (The documents'
links and the README's length: tests/unit/test_repository.py.)
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.config import REPO

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
    assert "README.md" in files and "tests/system/test_repository.py" in files
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
