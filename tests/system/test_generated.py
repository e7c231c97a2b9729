"""The committed stubs in generated/ are exactly what scripts/gen_protos.py produces,
and the contract passes buf lint (STANDARD + COMMENTS)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.config import REPO


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts/gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    fresh, committed = _tree(tmp_path / "mfa"), _tree(REPO / "generated/mfa")
    stale = sorted(k for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
    assert not stale, (f"generated/ is stale in {stale}: run `python scripts/gen_protos.py` "
                       "and commit the result")


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.skip("buf is not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _build_wheel(source: Path, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)], capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_wheel_ships_every_module(tmp_path: Path) -> None:
    """What `pip install ./generated .` installs: every package, the stubs, migrations and
    templates, each in its own distribution (the server wheel no longer carries `mfa`)."""
    server = _build_wheel(REPO, tmp_path / "server")
    client = _build_wheel(REPO / "generated", tmp_path / "client")
    assert server.name.startswith("mfa_service-") and client.name.startswith(
        "mfa_service_client-")

    in_server = set(zipfile.ZipFile(server).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "mfa_service").rglob("*")
                if p.suffix in (".py", ".mako") and "__pycache__" not in p.parts}
    assert expected - in_server == set()
    assert not [n for n in in_server if n.startswith(("mfa/", "mfa_client/"))]

    in_client = set(zipfile.ZipFile(client).namelist())
    generated = REPO / "generated"
    expected = {str(p.relative_to(generated)) for p in generated.rglob("*")
                if p.parts[len(generated.parts)] in ("mfa", "mfa_client")
                and "__pycache__" not in p.parts
                and (p.suffix in (".py", ".pyi", ".json") or p.name == "py.typed")}
    assert {"mfa/py.typed", "mfa_client/py.typed", "mfa_client/service_config.json",
            "mfa/v1/two_factor_service_pb2_grpc.pyi"} <= expected
    assert expected - in_client == set()
    assert not [n for n in in_client if n.startswith("mfa_service/")]
