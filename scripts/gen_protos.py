"""Regenerate the Python stubs in generated/ from protos/ (the one command for codegen).

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: generated/)

Runs grpc_tools.protoc with the messages, gRPC and mypy-protobuf typed stubs, then adds
the package markers. tests/system/test_generated.py runs this into a temporary folder and fails
when generated/mfa/ differs, so a proto change without regeneration cannot land. Only
generated/mfa/ is replaced: generated/mfa_client/ and generated/pyproject.toml (the client
distribution) are written by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def _plugin(name: str) -> str:
    found = shutil.which(f"protoc-gen-{name}")
    if found:
        return found
    beside = Path(sys.executable).parent / f"protoc-gen-{name}"
    if not beside.exists():
        raise SystemExit(f"protoc-gen-{name} not found: pip install -e '.[test]'")
    return str(beside)


def generate(out_dir: Path) -> None:
    """Write the stubs for every protos/**/*.proto into out_dir (replacing its mfa/)."""
    target = out_dir / "mfa"
    if target.exists():
        shutil.rmtree(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto).
    well_known = Path(protoc.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # mypy-protobuf's plugins sit beside this interpreter, which may not be on PATH.
    plugins = [f"--plugin=protoc-gen-{name}={_plugin(name)}" for name in ("mypy", "mypy_grpc")]
    args = [
        "grpc_tools.protoc",
        *plugins,
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {p.parent for p in target.rglob("*.py")} | {target}:
        (package / "__init__.py").touch()
    (target / "py.typed").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "generated")
