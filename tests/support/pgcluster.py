"""A throwaway PostgreSQL cluster a test can stop and start: initdb, pg_ctl, a temp dir.

PostgreSQL refuses to run as root, so under root (CI and these machines) the cluster's
directory belongs to the ``postgres`` OS user (the Debian package's) and every command runs
as that user. Skipped when the server binaries are absent, except under CI=true.

For failover: ``standby()`` makes a hot standby of a running cluster (pg_basebackup -R,
streaming), ``kill()`` is the primary's machine dying (SIGKILL to the postmaster and
every backend at once: nothing is flushed or handed over), ``promote()`` is what Patroni
or CloudNativePG would do next, and ``rewind_from()`` brings the old primary back as a
standby of the new one (pg_rewind -R).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """One cluster on 127.0.0.1:<port>, trust authentication, user ``postgres``."""

    def __init__(self, settings: dict[str, str] | None = None,
                 tools: tuple[str, ...] = ()) -> None:
        # Server settings for this cluster only, on the command line: a standby copies
        # postgresql.conf with pg_basebackup, and must not inherit e.g. the primary's
        # synchronous_standby_names (a promoted standby would wait for itself).
        self.settings = dict(settings or {})
        bin_dir = _bin_dir()
        if bin_dir is None:
            message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
            if IN_CI:
                pytest.fail(message + " (CI=true)")
            pytest.skip(message)
        missing = [t for t in ("initdb", "pg_ctl", *tools) if not (bin_dir / t).exists()]
        if missing:
            message = f"PostgreSQL server tools missing from {bin_dir}: {', '.join(missing)}"
            if IN_CI:
                pytest.fail(message + " (CI=true)")
            pytest.skip(message)
        self._bin = bin_dir
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            try:
                entry = pwd.getpwnam(self._user)
            except KeyError:
                pytest.fail("running as root needs the postgres OS user to run a cluster")
        self.root = Path(tempfile.mkdtemp(prefix="mfa-pg-"))
        if self._user is not None:
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self.dsn = self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A libpq/asyncpg DSN for one of this cluster's databases."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        user = self._user
        if user is not None and (runuser := shutil.which("runuser")) is not None:
            # Not subprocess's user=: a setuid child rules out vfork, and a real fork()
            # while gRPC threads are busy (a test promoting a standby under load) runs
            # gRPC's fork handlers and can crash the process.
            command, user = [runuser, "-u", user, "--", *command], None
        try:
            subprocess.run(command, check=True, timeout=timeout, user=user, cwd=self.root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.CalledProcessError as exc:  # say why, in the test's output
            raise RuntimeError(f"{args[0]} failed: {exc.stderr.decode(errors='replace')}"
                               ) from exc

    def init(self, *, checksums: bool = False, conf: dict[str, str] | None = None) -> None:
        """``checksums``: data checksums, which pg_rewind needs (or wal_log_hints).
        ``conf``: settings written to postgresql.conf (standbys copy them, and they hold
        for the single-user recovery pg_rewind runs, unlike the command line's)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-instructions", *(["-k"] if checksums else []))
        if conf:
            with (self.data / "postgresql.conf").open("a", encoding="utf-8") as f:
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.root}")
        options += "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "30", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: like a crash (no checkpoint; WAL replayed at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def standby(self, settings: dict[str, str] | None = None) -> Cluster:
        """A hot standby of this (running) cluster, streaming from it; not started.

        ``pg_basebackup -R`` writes standby.signal and primary_conninfo; initdb's
        pg_hba.conf already lets 127.0.0.1 replicate (trust)."""
        replica = Cluster(settings)
        replica._run("pg_basebackup", "-D", str(replica.data), "-h", "127.0.0.1",
                     "-p", str(self.port), "-U", "postgres", "-R", "-X", "stream",
                     "-c", "fast")
        return replica

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its children together, by pid: a machine that died.

        Killing only the postmaster would leave backends that finish their work and
        close their sockets politely; a dead machine does neither."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # gone meanwhile
            if fields and int(fields[1]) == pid:
                children.append(int(stat.parent.name))
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def promote(self) -> None:
        """End recovery: this standby becomes a primary (returns once it accepts writes)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "promote")

    def rewind_from(self, source: Cluster) -> None:
        """Make this (dead) former primary a standby of ``source``: pg_rewind replays its
        crash recovery first, then copies what diverged; -R writes standby.signal and
        primary_conninfo. The lock files a SIGKILL leaves behind must go first.

        ``source`` must have checkpointed since its promotion (its control file names the
        new timeline only then; before, pg_rewind sees no divergence), and this cluster
        must still hold its WAL back to the last checkpoint the two share (wal_keep_size
        in ``init(conf=)``: the crash recovery's own checkpoint would recycle it)."""
        if self.running():
            raise RuntimeError("the former primary is still running")
        # Its pid may live on as a zombie (nobody reaps a daemon's parent-less corpse in
        # a container): PostgreSQL would take the lock files for a live server's.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for stale in (f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
            (self.root / stale).unlink(missing_ok=True)
        self._run("pg_rewind", "-D", str(self.data), "-R",
                  f"--source-server=host=127.0.0.1 port={source.port} user=postgres "
                  "dbname=postgres", timeout=120)

    def running(self) -> bool:
        """The postmaster is alive (a zombie is not)."""
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
