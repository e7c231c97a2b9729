"""The parts of a failover that are settings and error translation: the multi-host URL
spellings (accepted, or refused with the working one and without the password), the outbox
lease against a send, and a lost primary or a write on a standby read as UNAVAILABLE, not
INTERNAL. (What the outbox does around a failing settle: tests/api/test_failover_units.py.)"""

from __future__ import annotations

import pytest
from asyncpg.exceptions import TargetServerAttributeNotMatched
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from mfa_service.errors import StoreUnavailable
from mfa_service.settings import Settings
from mfa_service.store.engine import translate
from tests.support.config import TEST_KEYRING


def _settings(url: str) -> Settings:
    return Settings.model_validate({"database_url": url, "keyring": TEST_KEYRING})


def test_the_multi_host_query_spelling_is_accepted() -> None:
    url = ("postgresql+asyncpg://postgres@/mfa?host=10.0.0.1:5432&host=10.0.0.2:5433"
           "&target_session_attrs=read-write")
    assert _settings(url).database_url == url
    _, args = make_url(url).get_dialect()().create_connect_args(make_url(url))
    assert (args["host"], args["port"]) == (["10.0.0.1", "10.0.0.2"], [5432, 5433])


def test_the_comma_spelling_is_refused_with_the_working_one_and_no_password() -> None:
    with pytest.raises(ValidationError) as err:
        _settings("postgresql+asyncpg://mfa:s3cret-pw@db1:5432,db2:5433/mfa?ssl=require")
    text = str(err.value)
    assert "s3cret-pw" not in text
    assert ("postgresql+asyncpg://mfa@/mfa?host=db1:5432&host=db2:5433&ssl=require"
            "&target_session_attrs=read-write") in text


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql+asyncpg://mfa:s3cret-pw@/mfa?host=db1:5432&host=db2:5433",
     "target_session_attrs=read-write"),
    ("postgresql+asyncpg://mfa:s3cret-pw@/mfa?host=db1:5432&host=db2:5433"
     "&target_session_attrs=any", "target_session_attrs=read-write"),
    ("postgresql+asyncpg://mfa:s3cret-pw@db0/mfa?host=db1:5432&host=db2:5433"
     "&target_session_attrs=read-write", "both before the path and in ?host="),
    ("postgresql+asyncpg://mfa:s3cret-pw@/mfa?host=db1:x&host=db2:5433"
     "&target_session_attrs=read-write", "host=NAME:PORT"),
    ("postgresql+asyncpg://mfa:s3cret-pw@db1:port/mfa", "cannot be parsed"),
    ("mysql://mfa:s3cret-pw@db1/mfa", "use sqlite+aiosqlite"),
])
def test_other_bad_database_urls_are_refused_without_the_password(url: str,
                                                                   says: str) -> None:
    with pytest.raises(ValidationError) as err:
        _settings(url)
    assert says in str(err.value) and "s3cret-pw" not in str(err.value)


def test_the_lease_must_outlast_a_send_and_its_settle() -> None:
    with pytest.raises(ValidationError, match="MFA_OUTBOX_LEASE_SECONDS"):
        Settings.model_validate({"keyring": TEST_KEYRING, "outbox_lease_seconds": 15,
                                 "provider_timeout_seconds": 20})
    assert Settings.model_validate({"keyring": TEST_KEYRING}).outbox_lease_seconds == 90


class _DriverError(Exception):
    def __init__(self, sqlstate: str | None = None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate


def test_no_primary_among_the_hosts_is_unavailable_not_internal() -> None:
    """Every host answered and none takes writes (only standbys, mid-failover)."""
    orig = _DriverError()
    orig.__cause__ = TargetServerAttributeNotMatched("no host is read-write")
    assert isinstance(translate(DBAPIError("connect", None, orig)), StoreUnavailable)


def test_a_write_that_reached_a_standby_is_unavailable_not_internal() -> None:
    orig = _DriverError("25006")  # read_only_sql_transaction
    assert isinstance(translate(DBAPIError("UPDATE", None, orig)), StoreUnavailable)
    assert translate(DBAPIError("UPDATE", None, _DriverError("22001"))) is None
