"""The committed stubs in generated/ are exactly what scripts/gen_protos.py produces,
and the contract passes buf lint (STANDARD + COMMENTS)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


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


def test_generated_stubs_are_importable_as_documented() -> None:
    from mfa.v1 import two_factor_service_pb2, two_factor_service_pb2_grpc

    service = two_factor_service_pb2.DESCRIPTOR.services_by_name["TwoFactorService"]
    assert [m.name for m in service.methods] == [
        "Enroll", "Challenge", "Verify", "Disable", "CheckSession", "ListFactors",
        "RevokeSession", "RegenerateRecoveryCodes", "ListAuditEvents"]
    assert hasattr(two_factor_service_pb2_grpc, "TwoFactorServiceStub")


def test_the_wheel_ships_every_module(tmp_path: Path) -> None:
    """What `pip install .` installs: every package, the stubs, migrations and templates."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("mfa_service-*.whl")
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "mfa_service").rglob("*")
                if p.suffix in (".py", ".mako") and "__pycache__" not in p.parts}
    expected |= {str(p.relative_to(REPO / "generated")) for p in (REPO / "generated").rglob("*")
                 if p.suffix in (".py", ".pyi") or p.name == "py.typed"}
    assert expected - shipped == set()
