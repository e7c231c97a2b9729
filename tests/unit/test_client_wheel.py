"""The client distribution's version is the server's, and the server pins it (both
pyproject files and the installed metadata). (The wheel in a clean environment:
tests/system/test_client_wheel.py.)"""

from __future__ import annotations

import importlib.metadata

import mfa_service
from tests.support.config import REPO
from tests.support.packaging import CLIENT_DEPENDENCIES, project, requirement_name


def test_the_client_version_is_the_servers_and_the_server_pins_it() -> None:
    server, client = project(REPO / "pyproject.toml"), project(
        REPO / "generated/pyproject.toml")
    assert client["name"] == "mfa-service-client"
    assert client["version"] == server["version"] == mfa_service.__version__
    server_deps, client_deps = server["dependencies"], client["dependencies"]
    assert isinstance(server_deps, list) and isinstance(client_deps, list)
    assert f"mfa-service-client=={server['version']}" in server_deps
    assert {requirement_name(r) for r in client_deps} == CLIENT_DEPENDENCIES
    # The installed server (editable or not) says the same.
    assert f"mfa-service-client=={server['version']}" in (
        importlib.metadata.requires("mfa-service") or [])
