"""``mfa-service import FILE``: users' existing factors from another system, as JSON Lines
(docs/OPERATIONS.md, "Importing existing factors"; the rules: service/importer.py).

Progress goes to stderr (a bar redrawn in place on a terminal, a plain line every few
seconds otherwise), the summary to stdout. Neither, nor any log line, carries a secret, an
otpauth URI or a code; addresses and numbers in the refusals are masked.

Exit codes (cli_admin's): 0 every line imported or already present, 1 some lines refused
(listed), 2 bad usage or configuration, 3 the database failed (what was committed stays;
a run again skips it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from mfa_service.cli_admin import OK, PROBLEM, STORE_FAILED, USAGE, open_store
from mfa_service.errors import InvalidArgument
from mfa_service.settings import Settings

if TYPE_CHECKING:
    from mfa_service.clock import Clock
    from mfa_service.crypto import Keyring
    from mfa_service.service.importer import ImportReport

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_BATCH = 1000  # service/importer.py: DEFAULT_BATCH (not imported: keeps --help quick)
MAX_BATCH = 10_000
BAR_WIDTH = 30


def register(commands: SubParsers) -> None:
    """Add ``import`` to ``mfa-service``."""
    command = commands.add_parser(
        "import", help="bring users' existing factors in from another system (JSON Lines)",
        description="Import authenticator apps (otpauth URIs), email addresses and phone "
                    "numbers, one JSON object a line, as ACTIVE, established factors usable "
                    "at once. Lines already present are skipped (a re-run imports nothing); "
                    "a bad line is refused with its line number and never stops the others. "
                    "Runs beside live servers, with their settings and keyring.")
    command.add_argument("file", metavar="FILE",
                         help="JSON Lines file, or '-' for standard input (e.g. from a "
                              "decrypting command, so the secrets never rest on disk)")
    command.add_argument("--dry-run", action="store_true",
                         help="check every line against the database and report what would "
                              "be imported; write nothing")
    command.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                         help=f"lines per transaction (default {DEFAULT_BATCH}, "
                              f"max {MAX_BATCH})")
    command.add_argument("--workers", type=int, default=None,
                         help="processes that parse lines (default: the cores but one, "
                              "1-4; 0 parses in this process)")
    command.set_defaults(admin_runner=_run)


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    return await import_file(settings, args.file, dry_run=args.dry_run, batch=args.batch,
                             workers=args.workers, out=sys.stdout, err=sys.stderr)


async def import_file(settings: Settings, file: str, *, dry_run: bool = False,
                      batch: int = DEFAULT_BATCH, workers: int | None = None, out: TextIO,
                      err: TextIO, clock: Clock | None = None,
                      keyring: Keyring | None = None) -> int:
    """The command: import ``file`` into the database of ``settings``; the exit code.
    ``clock`` and ``keyring`` default to the servers' (the system clock, MFA_KEYRING)."""
    from mfa_service.service.importer import MAX_WORKERS, Importer, Parsers, default_workers

    if not 1 <= batch <= MAX_BATCH:
        raise InvalidArgument.single("batch", f"must be 1-{MAX_BATCH}")
    if workers is None:
        workers = default_workers()
    if not 0 <= workers <= MAX_WORKERS:
        raise InvalidArgument.single("workers", f"must be 0-{MAX_WORKERS}")
    with ExitStack() as resources:
        try:
            source, total = _open(file, resources)
        except OSError as exc:
            print(f"mfa-service: cannot read {file}: {exc.strerror or exc}", file=err)
            return USAGE
        # First: the parsing processes take a while to start, and do so meanwhile.
        parsers = resources.enter_context(Parsers(workers)) if workers else None
        from mfa_service.app import load_keyring
        from mfa_service.clock import SystemClock

        keyring = keyring or load_keyring(settings)
        async with open_store(settings, migrate_sqlite=not dry_run) as database:
            importer = Importer(database, keyring, clock or SystemClock(),
                                max_factors=settings.max_factors_per_user,
                                default_locale=settings.default_locale, batch=batch,
                                dry_run=dry_run, parsers=parsers)
            progress = Progress(err, total)
            report = await importer.run(source, progress.update)
            progress.finish(report)
    print("\n".join(format_report(report)), file=out)
    if report.stopped is not None:
        return STORE_FAILED
    return PROBLEM if report.refused else OK


def _open(file: str, resources: ExitStack) -> tuple[BinaryIO, int | None]:
    """The file (binary: its byte offset is the progress) and its size when known."""
    if file == "-":
        return sys.stdin.buffer, None
    path = Path(file)
    handle = resources.enter_context(path.open("rb"))
    size = path.stat().st_size
    return handle, size if path.is_file() else None


class Progress:
    """Progress on stderr: a bar redrawn in place when it is a terminal, else one plain
    line every ``interval`` seconds (a log collector gets no carriage returns)."""

    def __init__(self, stream: TextIO, total_bytes: int | None, *, interval: float = 5.0,
                 redraw: float = 0.1, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._total = total_bytes
        self._tty = stream.isatty()
        self._every = redraw if self._tty else interval
        self._monotonic = monotonic
        self._start = self._last = monotonic()

    def update(self, report: ImportReport) -> None:
        now = self._monotonic()
        if now - self._last < self._every:
            return
        self._last = now
        self._draw(report, now)

    def finish(self, report: ImportReport) -> None:
        if self._tty:  # the bar at its end, then the line is left to the terminal
            self._draw(report, self._monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, report: ImportReport, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = report.lines / elapsed
        counts = (f"{report.lines:,} lines, {report.imported_total:,} "
                  f"{'to import' if report.dry_run else 'imported'}, {report.skipped:,} "
                  f"skipped, {len(report.refused):,} refused, {rate:,.0f} lines/s")
        fraction = (min(1.0, report.bytes_read / self._total) if self._total else None)
        if self._tty:
            bar = ""
            if fraction is not None:
                filled = int(fraction * BAR_WIDTH)
                bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}  "
            # \r and a cleared line end: the bar redraws in place.
            self._stream.write(f"\r{bar}{counts}\x1b[K")
        else:
            share = f" ({fraction:.0%} of the file)" if fraction is not None else ""
            self._stream.write(f"import: {counts}{share}\n")
        self._stream.flush()


def format_report(report: ImportReport) -> list[str]:
    """The summary: counts, then each refused line with its number and reason."""
    verb = "would import" if report.dry_run else "imported"
    by_method = ", ".join(f"{m.value} {n:,}" for m, n in sorted(report.imported.items()))
    lines = [
        f"run {report.run_id}" + (" (dry run: nothing was written)" if report.dry_run else ""),
        f"lines read: {report.lines:,}",
        f"{verb}: {report.imported_total:,}" + (f" ({by_method})" if by_method else ""),
        f"skipped, already present: {report.skipped:,}",
        f"refused: {len(report.refused):,}",
        f"took {report.seconds:.1f} s ({report.lines / max(report.seconds, 1e-9):,.0f} lines/s)",
    ]
    for refused in report.refused:
        about = ", ".join(part for part in (
            f"user {_clean(refused.user_id)}" if refused.user_id else "",
            refused.masked or "") if part)
        lines.append(f"  line {refused.line}: " + (f"{about}: " if about else "")
                     + refused.reason)
    if report.stopped is not None:
        lines.append(f"stopped: {report.stopped}")
    return lines


def _clean(value: str) -> str:
    """A user id from the file, safe for a terminal (no control characters)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
