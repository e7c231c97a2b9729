"""The Dockerfile's structure, read offline (no Docker daemon needed).

A small reader for the Dockerfile syntax we use (continuation lines, comments, ARG defaults
in FROM, JSON exec form) and the properties the image must keep: multi-stage, both wheels
built, a non-root numeric user, no compiler in the final stage, production by default,
a health check through grpc.health.v1, and COPY sources that exist and reach the context.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest

from mfa_service.settings import Settings
from tests.support.config import REPO

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
