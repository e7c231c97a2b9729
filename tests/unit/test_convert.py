"""transport/convert.py: the answers' timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from mfa_service.transport.convert import timestamp


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
