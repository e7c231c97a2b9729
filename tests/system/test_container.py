"""The container image, without a Docker daemon (CI has none): its Dockerfile read, and
what it builds built and run on this machine.

A small reader for the Dockerfile syntax we use (continuation lines, comments, ARG defaults
in FROM, JSON exec form) and the properties the image must keep: multi-stage, both wheels
built, a non-root numeric user, no compiler in the final stage, production by default,
a health check through grpc.health.v1, and COPY sources that exist and reach the context.
Then the build stage's own RUN, in a context of what its COPY lines copy, and the runtime
stage's ENTRYPOINT + CMD with its ENV and USER, asked by its HEALTHCHECK command, served
over TLS and stopped by its STOPSIGNAL (the section at the end of this file).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from mfa_service.crypto import Keyring
from mfa_service.settings import Settings
from mfa_service.transport.auth import new_token
from tests.support.certs import Authority, write
from tests.support.config import REPO
from tests.support.processes import free_port

COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cc|make|cmake|[a-z0-9+-]*-dev)\b")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def env_pairs(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return [str(v) for v in value]


ARGS, STAGES = parse_dockerfile((REPO / "Dockerfile").read_text("utf-8"))
BY_NAME = {s.name: s for s in STAGES}
FINAL = STAGES[-1]


def test_it_has_named_build_wheels_and_runtime_stages_runtime_last() -> None:
    assert [s.name for s in STAGES] == ["build", "wheels", "runtime"]
    assert FINAL.name == "runtime"  # the default target of `docker build`
    assert BY_NAME["build"].base == FINAL.base  # the venv's interpreter is the same
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", FINAL.base), FINAL.base
    assert BY_NAME["wheels"].base == "scratch"


def test_the_build_stage_builds_both_wheels_and_installs_only_from_them() -> None:
    runs = " ".join(BY_NAME["build"].all("RUN"))
    wheel = re.search(r"pip wheel (--\S+ \S+ )*(?P<paths>[^&]+)", runs)
    assert wheel is not None
    assert set(wheel.group("paths").split()) == {"./generated", "."}
    assert "--no-index --find-links /wheels mfa-service" in runs
    assert BY_NAME["wheels"].all("COPY") == ["--from=build /dist/ /"]


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = FINAL.all("USER")
    assert users, "no USER in the final stage: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]  # runAsNonRoot needs a number
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # Nothing after USER switches back.
    keys = [k for k, _ in FINAL.instructions]
    assert "RUN" not in keys[keys.index("USER"):]


def test_the_final_stage_has_no_compiler_and_copies_only_the_virtualenv() -> None:
    for run in FINAL.all("RUN"):
        assert "apt-get install" not in run and "pip" not in run, run
        assert not COMPILERS.search(run), run
    copies = FINAL.all("COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"]
    # The compiler is in the build stage only.
    assert any("build-essential" in run for run in BY_NAME["build"].all("RUN"))


def test_the_image_is_production_by_default_with_known_settings() -> None:
    env: dict[str, str] = {}
    for args in FINAL.all("ENV"):
        env.update(env_pairs(args))
    assert env["MFA_ENV"] == "production"
    known = {f"MFA_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("MFA_")} <= known
    port = env["MFA_LISTEN_ADDR"].rpartition(":")[2]
    assert FINAL.all("EXPOSE") == [port]


def test_the_health_check_asks_grpc_health_and_the_entry_point_exists() -> None:
    (check,) = FINAL.all("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    assert exec_form(command)[:2] == ["mfa-service", "health"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    assert exec_form(FINAL.all("ENTRYPOINT")[-1]) == ["mfa-service"]
    assert "mfa-service" in scripts
    assert exec_form(FINAL.all("CMD")[-1]) == ["serve"]
    assert FINAL.all("STOPSIGNAL") == ["SIGTERM"]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.strip("./").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.strip("/")) for prefix in prefixes
               for pattern in patterns)


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_copy_sources_exist_and_reach_the_build_context(stage: str) -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for args in BY_NAME[stage].all("COPY"):
        if args.startswith("--from="):
            source_stage = args.split()[0].removeprefix("--from=")
            assert source_stage in [s.name for s in STAGES[:STAGES.index(BY_NAME[stage])]]
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source, ignore), f"COPY {source}: excluded by .dockerignore"


# -- the image's build and its commands, without a Docker daemon -------------------------------
# What `docker build` and `docker run` would do, done on this machine: the build stage's own
# RUN (both wheels and every dependency wheel, a virtualenv installed from them alone, pip
# removed) in a context holding only what its COPY lines copy past .dockerignore; then the
# runtime stage's ENV, USER (when we may switch to it), WORKDIR and VOLUME, its ENTRYPOINT +
# CMD as the server process and its HEALTHCHECK command against it, ended by its STOPSIGNAL.
# The base image itself (python:3.11-slim) is the one thing not reproduced: this machine's
# Python stands in for it. (A Docker daemon is not assumed: CI runs without one.)
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's default
ROOTED = re.compile(r"(?<![\w.-])/(opt/venv|wheels|dist|data)\b")


@dataclass
class Image:
    root: Path  # stands for the image's /
    env: dict[str, str]  # the runtime stage's ENV, its paths under root
    user: tuple[int, int] | None  # USER, when this process may switch to it

    def rooted(self, text: str) -> str:
        return ROOTED.sub(lambda m: str(self.root / m.group(1)), text)


def _copy_context(stage: Stage, workdir: Path, ignore: list[str]) -> None:
    """The stage's COPY lines from the repository (past .dockerignore) into ``workdir``."""
    def skipped(directory: str, names: list[str]) -> set[str]:
        base = Path(directory).relative_to(REPO)
        return {n for n in names if _ignored(str(base / n), ignore)}

    for args in stage.all("COPY"):
        assert not args.startswith("--from="), args
        *sources, destination = args.split()
        target = workdir / destination
        for source in sources:
            path = REPO / source
            if path.is_dir():
                shutil.copytree(path, target if not destination.endswith("/") else
                                target / path.name, ignore=skipped)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)


def _others_may_run(path: Path) -> bool:
    """Whether a user other than the owner may run ``path`` (every folder on the way)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The image's build stage run on this machine, its runtime stage as an environment."""
    root = Path(tempfile.mkdtemp(prefix="mfa-image-"))
    root.chmod(0o755)  # the image's USER must reach the virtualenv and /data
    try:
        build = BY_NAME["build"]
        workdir = root / build.all("WORKDIR")[-1].lstrip("/")
        workdir.mkdir(parents=True)
        ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
        _copy_context(build, workdir, ignore)
        # `python` is the base image's interpreter: here the one running this suite.
        bin_dir = root / "base-image-bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', IMAGE_PATH)}"}
        for args in build.all("ENV"):
            env.update(env_pairs(args))
        (run,) = [r for r in build.all("RUN") if "pip " in r]  # apt-get is the base's part
        image = Image(root, {}, None)
        done = subprocess.run(["/bin/sh", "-ec", image.rooted(run)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        runtime: dict[str, str] = {"PATH": IMAGE_PATH}
        for args in FINAL.all("ENV"):
            for name, value in env_pairs(args).items():
                runtime[name] = image.rooted(value.replace("$PATH", runtime["PATH"]))
        data = Path(image.rooted(FINAL.all("WORKDIR")[-1]))
        data.mkdir(parents=True, exist_ok=True)
        uid, _, gid = FINAL.all("USER")[-1].partition(":")
        # Run as USER when we may switch to it and it can reach the interpreter (in the image
        # /usr/local/bin/python3; here the one the virtualenv was made from).
        python = (root / "opt/venv/bin/python").resolve()
        user = ((int(uid), int(gid or uid))
                if os.geteuid() == 0 and _others_may_run(python) else None)
        if user is not None:
            os.chown(data, *user)
        yield Image(root, runtime, user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_build_stage_leaves_the_two_wheels_and_a_virtualenv_without_pip(
        image: Image) -> None:
    wheels = sorted(p.name for p in (image.root / "dist").iterdir())
    assert len(wheels) == 2 and wheels[0].startswith("mfa_service-0.1.0-"), wheels
    assert wheels[1].startswith("mfa_service_client-0.1.0-"), wheels
    venv = image.root / "opt/venv"
    assert (venv / "bin/mfa-service").exists()
    assert not (venv / "bin/pip").exists() and not list(venv.glob("lib/*/site-packages/pip"))
    listing = subprocess.run(
        [str(venv / "bin/python"), "-I", "-c", "import importlib.metadata as m, json, "
         "mfa_service; print(json.dumps([mfa_service.__file__, sorted(d.metadata['Name']"
         ".lower() for d in m.distributions())]))"],
        capture_output=True, text=True, timeout=60, check=True, env=image.env)
    where, installed = json.loads(listing.stdout)
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout
    assert {"mfa-service", "mfa-service-client", "grpcio", "sqlalchemy"} <= set(installed)
    assert not set(installed) & {"pytest", "hypothesis", "mypy", "pip", "playwright"}


async def test_the_image_serves_tls_in_production_and_its_health_check_passes(
        image: Image) -> None:
    """ENTRYPOINT + CMD with the image's ENV (production) and what an operator adds: TLS,
    a callers file, a keyring, real providers. The HEALTHCHECK command says SERVING, a
    caller with a token is served over TLS, the database lands in the VOLUME, and the
    STOPSIGNAL ends the server cleanly."""
    config = image.root / "etc/mfa"
    config.mkdir(parents=True)
    authority = Authority()
    cert, key = write(config, "tls", authority.issue("localhost", server=True))
    token, token_sha256 = new_token()
    callers = config / "callers.toml"
    callers.write_text(f'[[callers]]\nname = "portal-backend"\napplications = ["portal"]\n'
                       f'token_sha256 = ["{token_sha256}"]\n')
    for path in (cert, key, callers):
        path.chmod(0o644)  # readable by the image's USER (a mounted Secret would be)
    port, health_port = free_port(), free_port()
    env = {**image.env,
           "MFA_LISTEN_ADDR": image.env["MFA_LISTEN_ADDR"].rpartition(":")[0] + f":{port}",
           "MFA_HEALTH_LISTEN_ADDR": f"127.0.0.1:{health_port}",
           "MFA_TLS_CERT_FILE": str(cert), "MFA_TLS_KEY_FILE": str(key),
           "MFA_CALLERS_FILE": str(callers), "MFA_KEYRING": Keyring.generate_entry("prod-1"),
           "MFA_EMAIL_PROVIDER": "smtp", "MFA_SMTP_HOST": "127.0.0.1", "MFA_SMTP_TLS": "none",
           "MFA_SMTP_FROM": "no-reply@example.com", "MFA_PHONE_PROVIDER": "webhook",
           "MFA_PHONE_WEBHOOK_URL": "https://sms-gateway.example.com/v1/messages",
           "MFA_WEBAUTHN_RP_ID": "example.com",
           "MFA_WEBAUTHN_ORIGINS": "https://portal.example.com",
           "MFA_SHUTDOWN_DRAIN_SECONDS": "0", "MFA_SHUTDOWN_GRACE_SECONDS": "1"}
    assert env["MFA_ENV"] == "production"
    data = Path(image.rooted(FINAL.all("WORKDIR")[-1]))
    as_user: dict[str, Any] = {}
    if image.user is not None:
        as_user = {"user": image.user[0], "group": image.user[1], "extra_groups": []}
    command = exec_form(FINAL.all("ENTRYPOINT")[-1]) + exec_form(FINAL.all("CMD")[-1])
    (check,) = FINAL.all("HEALTHCHECK")
    health = exec_form(check.partition("CMD ")[2])
    log = data / "server.log"

    def run_health() -> subprocess.CompletedProcess[str]:  # as `docker` runs it, in the image
        return subprocess.run(health, cwd=data, env=env, capture_output=True, text=True,
                              timeout=30, check=False, **as_user)

    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=data, env=env, stdout=out, stderr=out, **as_user)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text("utf-8", "replace")[-3000:]
            probe = await asyncio.to_thread(run_health)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, (probe.stdout, probe.stderr,
                                                 log.read_text("utf-8", "replace")[-3000:])
            await asyncio.sleep(0.5)
        assert probe.stdout.strip() == "SERVING"

        credentials = grpc.ssl_channel_credentials(authority.cert_pem)
        async with aio.secure_channel(f"localhost:{port}", credentials) as channel:
            listed = await pb_grpc.TwoFactorServiceStub(channel).ListFactors(
                pb.ListFactorsRequest(user_id="alice"), timeout=10,
                metadata=(("authorization", f"Bearer {token}"),))
        assert list(listed.factors) == []
        database = make_url(env["MFA_DATABASE_URL"]).database
        assert database is not None and Path(database).parent == data
        assert Path(database).exists()  # in the VOLUME, created and migrated on first start
        if image.user is not None:
            assert Path(database).stat().st_uid == image.user[0]

        proc.send_signal(getattr(signal, FINAL.all("STOPSIGNAL")[-1]))
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text("utf-8")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
