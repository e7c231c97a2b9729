"""Structured logging: one JSON object per line (or plain text for a terminal).

Log calls pass facts as ``extra=`` fields; no call site ever logs a request or response
message, so codes, secrets and tokens have no path into a log line. A line written while
an OpenTelemetry span is active carries its ``trace_id`` and ``span_id`` (hex, as trace
backends show them), so the access log line of an RPC leads to its trace.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message",
                                                                            "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def default_format() -> str:
    """Text for a person at a terminal, JSON lines for everything else (a collector)."""
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    fmt = fmt or default_format()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SQL engine logs statements with parameters at INFO: keep it quiet.
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG, past hide_parameters.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
