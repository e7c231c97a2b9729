"""The caller's deadline, from the transport down to the store (ground floor).

The transport reads ``context.time_remaining()`` once per call and sets ``deadline_var``
to an absolute time on the event loop's clock; the store bounds its work by it, so a
caller that gave up does not leave a transaction running (or holding a user's lock) after
it. A context variable: each gRPC call runs in its own task, so each sees its own.
"""

from __future__ import annotations

import contextvars

# Absolute ``loop.time()`` by which the current call must be done; None: no deadline.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "deadline", default=None)


def set_remaining(seconds: float | None, now: float) -> None:
    """Set the current call's deadline ``seconds`` after ``now``, the event loop's time
    (None: no deadline)."""
    deadline_var.set(None if seconds is None else now + seconds)


def current() -> float | None:
    """The current call's deadline on the loop's clock, or None."""
    return deadline_var.get()
