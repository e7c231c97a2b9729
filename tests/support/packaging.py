"""The two distributions as their pyproject files declare them: mfa-service (.) and
mfa-service-client (generated/)."""

from __future__ import annotations

import tomllib
from pathlib import Path

# What the client wheel may pull in: the portal gets the stubs and these, nothing else.
CLIENT_DEPENDENCIES = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}


def project(path: Path) -> dict[str, object]:
    """The [project] table of a pyproject.toml."""
    table: dict[str, object] = tomllib.loads(path.read_text("utf-8"))["project"]
    return table


def requirement_name(requirement: str) -> str:
    """The distribution a PEP 508 requirement names, lower case (no extras, versions or
    markers)."""
    return requirement.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(
        ">")[0].strip().lower()
