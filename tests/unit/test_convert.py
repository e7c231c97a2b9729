"""transport/convert.py: the answers' timestamps; CheckSession's one-look validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.errors import InvalidArgument
from mfa_service.transport.convert import (
    MAX_TOKEN,
    check_session_args,
    checked_session_args,
    timestamp,
)


@pytest.mark.parametrize("value", [
    datetime(2026, 12, 5, 17, 3, 4, 123456, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=2))),
    datetime(2026, 12, 5, 17, 3, 4, 1),  # naive: UTC
])
def test_a_timestamp_is_what_protobuf_makes_of_the_datetime(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
    assert timestamp(None) is None


def _outcome(check: object, req: pb.CheckSessionRequest) -> object:
    try:
        return check(req)  # type: ignore[operator]
    except InvalidArgument as exc:
        return sorted((v.field, v.description) for v in exc.violations)


_TOKENS = st.one_of(
    st.text(max_size=MAX_TOKEN + 2),
    st.text(alphabet="ab ", max_size=6),  # spaces inside, before, after
    st.text(alphabet="\t\n\u200b\x00x", max_size=4),  # not printable
    st.just("x" * MAX_TOKEN), st.just("x" * (MAX_TOKEN + 1)), st.just(""))


@given(token=_TOKENS, application=st.integers(min_value=-1, max_value=4))
def test_check_session_args_in_one_look_says_what_the_long_way_says(
        token: str, application: int) -> None:
    """The hot path's shortcut accepts exactly what the field-by-field check accepts, with
    the same values; anything else gets the field-by-field violations."""
    req = pb.CheckSessionRequest(session_token=token, application=application)  # type: ignore[arg-type]
    assert _outcome(check_session_args, req) == _outcome(checked_session_args, req)
