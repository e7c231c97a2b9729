"""The Markdown documents: their relative links must lead to files and headings that exist,
and the README must stay short."""

from __future__ import annotations

import re

from tests.support.config import REPO

LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")
README_MAX_LINES = 220


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(name: str) -> list[str]:
    """The relative links of ``name`` (a path from the repository root) that lead nowhere:
    to no file, or to a heading the target Markdown file does not have."""
    source = REPO / name
    broken: list[str] = []
    for target in LINK.findall(source.read_text("utf-8")):
        path, _, wanted = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            broken.append(target)
            continue
        if wanted and file.suffix == ".md":
            headings = {anchor(line.lstrip("#")) for line in
                        file.read_text("utf-8").splitlines() if line.startswith("#")}
            if wanted not in headings:
                broken.append(target)
    return broken


def readme_lines() -> int:
    return len((REPO / "README.md").read_text("utf-8").splitlines())
