"""Property-based input tests: whatever bytes a caller sends, the answer is a status the
contract names, never UNKNOWN or INTERNAL, and the server stays healthy.

The strategies are built from the request descriptors of every mfa.v1.TwoFactorService
RPC (walking ``DESCRIPTOR.fields``), so a field added to the proto is fuzzed without a
change here: random and huge strings, invalid UTF-8 on the wire, unknown enum numbers,
int32/int64 extremes, timestamps at and beyond their range, missing fields, and messages
beyond the server's 64 KiB receive limit. So that calls also get past validation, every
field starts from a plausible value (a real user's ids, token and open challenge among
them; format-valid emails, locales and IPs of every length; coherent Enroll shapes) and up
to two fields are wild, one missing. Runs against the shared in-process server on SQLite
and PostgreSQL (which, unlike SQLite, enforces VARCHAR lengths: what it found is in
tests/api/test_field_limits.py).

``max_examples`` is 30 per RPC (10 in a fast-tier run: tests/support/examples.py);
``HYPOTHESIS_PROFILE=long`` runs 1,000. Outside CI,
Hypothesis keeps failing examples in .hypothesis/ and replays them first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.clock import FixedClock
from tests.support.client import challenge, enroll_app, login
from tests.support.config import IN_CI
from tests.support.examples import examples

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

settings.register_profile(
    "default", max_examples=examples(30, least=10), deadline=None,
    database=None if IN_CI else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SERVICE = pb.DESCRIPTOR.services_by_name["TwoFactorService"]
METHODS = list(SERVICE.methods)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
KNOWN_USERS = 8
MAX_RECEIVE = 64 * 1024  # the server's grpc.max_receive_message_length
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# google.protobuf.Timestamp's valid range (0001-01-01 .. 9999-12-31T23:59:59Z).
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799
F = FieldDescriptor

# Strings: printable and not, short and huge, and some that pass validation.
STRINGS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=400),
    st.integers(min_value=200, max_value=20_000).map(lambda n: "x" * n),
    st.uuids().map(str),
    st.from_regex(r"\A[0-9]{6,8}\Z"),
    st.sampled_from(["", " ", "alice", "alice@example.com", "+4520123456", "203.0.113.7",
                     "::1", "en", "da-DK", "\x00", "a\nb", "\u202e", "\ufeff", "😀" * 10,
                     "dGVzdA==", "MTIz", "OTIyMzM3MjAzNjg1NDc3NTgwOA=="]),
    # Valid in form, yet longer than what the database keeps (VARCHAR limits hold on
    # PostgreSQL only) or with what PostgreSQL text cannot hold (NUL).
    st.sampled_from(["fe80::1%" + "e" * 60, "fe80::1%\x00", "abc-abcdefgh-abcdefgh",
                     "a" * 64 + "@" + "d" * 60 + ".com", "a@" + "d" * 122 + ".com",
                     "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"]),
)


def _integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    return st.one_of(st.integers(low, high), st.sampled_from([low, low + 1, -1, 0, 1, high]))


TIMESTAMPS = st.builds(
    lambda seconds, nanos: Timestamp(seconds=seconds, nanos=nanos),
    st.one_of(st.integers(TS_MIN - 1, TS_MAX + 1),
              st.sampled_from([TS_MIN - 1, TS_MIN, 0, TS_MAX, TS_MAX + 1, *INT64])),
    st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 1_000_000_000, *INT32])))

SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_STRING: STRINGS,
    F.TYPE_BYTES: st.binary(max_size=300),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_INT32: _integers(INT32), F.TYPE_SINT32: _integers(INT32),
    F.TYPE_SFIXED32: _integers(INT32),
    F.TYPE_INT64: _integers(INT64), F.TYPE_SINT64: _integers(INT64),
    F.TYPE_SFIXED64: _integers(INT64),
    F.TYPE_UINT32: _integers((0, 2**32 - 1)), F.TYPE_FIXED32: _integers((0, 2**32 - 1)),
    F.TYPE_UINT64: _integers((0, 2**64 - 1)), F.TYPE_FIXED64: _integers((0, 2**64 - 1)),
    F.TYPE_FLOAT: st.floats(width=32), F.TYPE_DOUBLE: st.floats(),
}


def _enum_numbers(field: FieldDescriptor) -> list[int]:
    assert field.enum_type is not None
    return [v.number for v in field.enum_type.values]


def _is_timestamp(field: FieldDescriptor) -> bool:
    return (field.message_type is not None
            and field.message_type.full_name == Timestamp.DESCRIPTOR.full_name)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_ENUM:  # known values, and numbers the enum does not have
        return st.one_of(st.sampled_from(_enum_numbers(field)), _integers(INT32))
    if field.type == F.TYPE_MESSAGE:
        if _is_timestamp(field):
            return TIMESTAMPS
        assert field.message_type is not None
        return messages(field.message_type, depth + 1)
    return SCALARS[field.type]


# Wild values that look right to a format check, by field name: every valid length of an
# email address (local part up to 64, labels up to 63), BCP 47 tags of every length, IP
# addresses with and without IPv6 scope ids.
def _email_of_length(n: int) -> str:
    """A syntactically valid address of exactly ``n`` characters (7-254)."""
    local = "l" * min(64, n - 6)
    rest = n - len(local) - 1 - len(".com")  # the domain before its TLD
    labels = [("d" * 63 + ".") * (rest // 64) + "d" * (rest % 64)] if rest % 64 else \
        [("d" * 63 + ".") * (rest // 64 - 1) + "d" * 62 + "e"]
    return f"{local}@{labels[0].strip('.')}.com"[:n].rstrip(".")


WILD_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "email": st.integers(7, 254).map(_email_of_length),
    "locale": st.from_regex(r"\A[a-z]{2,3}(-[a-z0-9]{2,8}){0,2}\Z"),
    "client_ip": st.one_of(st.ip_addresses().map(str),
                           st.builds(lambda a, scope: f"{a}%{scope}",
                                     st.ip_addresses(v=6).map(str), st.text(max_size=80))),
}


# Values that pass validation, by field name, so that most calls reach the service with one
# or two wild fields (all-random requests would nearly all stop at the first check). The
# ids, token and user of a real user (``known``) are among them, so calls also get past
# the lookups: verification, step-up, lockout.
TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                min_size=43, max_size=43)
PLAUSIBLE_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    # Fresh users mostly: a few fixed ones would soon be locked out or rate limited.
    "user_id": st.one_of(st.uuids().map(lambda u: f"user-{u.hex[:12]}"),
                         st.sampled_from(["alice", "bob"])),
    "code": st.one_of(st.from_regex(r"\A[0-9]{6}\Z"), st.just("abcde-fghij")),
    "email": st.sampled_from(["alice@example.com", "bob@example.org"]),
    "phone_number": st.sampled_from(["+4520123456", "+14155550123"]),
    "session_token": TOKEN, "client_ip": st.sampled_from(["203.0.113.7", "2001:db8::1"]),
    "user_agent": st.just("Mozilla/5.0"), "locale": st.sampled_from(["en", "da-DK"]),
    "account_name": st.just("alice@example.com"), "page_token": st.just(""),
    "page_size": st.integers(0, 500), "webauthn_response": st.just("{}"),
}
# Fields that belong to some requests only (or to some methods): often left out.
SITUATIONAL = {"session_token", "locale", "account_name", "request_id", "page_token",
               "start_time", "end_time", "client_ip", "user_agent"}
BY_METHOD = {"email", "phone_number", "channel", "change_proof_challenge_id",
             "webauthn_response"}
# ... except in the requests that cannot do without them: left out there, nearly every
# example would stop at validation (CheckSession has only two fields).
REQUIRED_HERE = {("CheckSessionRequest", "session_token")}
Known = dict[str, list[str]]
# Where fields depend on each other (which ones a method takes), the shapes a right request
# has; the other fields of BY_METHOD stay out unless drawn wild.
COHERENT: dict[str, list[dict[str, st.SearchStrategy[Any]]]] = {
    "EnrollRequest": [
        {"method": st.just(pb.METHOD_EMAIL),
         "email": st.one_of(PLAUSIBLE_BY_NAME["email"], WILD_BY_NAME["email"])},
        {"method": st.just(pb.METHOD_PHONE), "phone_number": PLAUSIBLE_BY_NAME["phone_number"],
         "channel": st.sampled_from([pb.CHANNEL_SMS, pb.CHANNEL_VOICE])},
        {"method": st.just(pb.METHOD_AUTHENTICATOR_APP)},
    ],
}


def _plausible(field: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    if field.name in PLAUSIBLE_BY_NAME:
        strategy = PLAUSIBLE_BY_NAME[field.name]
        if field.name in WILD_BY_NAME:  # valid in form, so plausible too
            strategy = st.one_of(strategy, WILD_BY_NAME[field.name])
    elif field.name.endswith("_id") and field.type == F.TYPE_STRING:
        strategy = st.uuids().map(str)
    elif field.type == F.TYPE_ENUM:
        strategy = st.sampled_from([n for n in _enum_numbers(field) if n])
    elif _is_timestamp(field):
        strategy = st.integers(0, 2_000_000_000).map(lambda s: Timestamp(seconds=s))
    else:
        strategy = _value(field, 3)
    if known.get(field.name):
        strategy = st.one_of(st.sampled_from(known[field.name]), strategy)
    owner = field.containing_type.name if field.containing_type is not None else ""
    if ((field.name in SITUATIONAL or field.name in BY_METHOD)
            and (owner, field.name) not in REQUIRED_HERE):
        strategy = st.one_of(st.none(), strategy)
    return strategy


def messages(descriptor: Descriptor, depth: int = 0,
             known: Known | None = None) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type: every field plausible, but up to two wild and
    one missing (at depth > 0: all wild)."""
    known = known or {}
    cls: Callable[..., Message] = message_factory.GetMessageClass(descriptor)
    wild: dict[str, st.SearchStrategy[Any]] = {}
    plausible: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if depth > 2 and field.type == F.TYPE_MESSAGE:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], \
                field.message_type.fields_by_name["value"]
            wild[field.name] = st.dictionaries(_value(key, depth), _value(value, depth),
                                               max_size=3)
            plausible[field.name] = st.just({})
        elif field.is_repeated:
            wild[field.name] = st.lists(_value(field, depth), max_size=3)
            plausible[field.name] = st.lists(_plausible(field, known), max_size=2).map(
                lambda items: [i for i in items if i is not None])
        else:
            wild[field.name] = _value(field, depth)
            if field.name in WILD_BY_NAME:
                wild[field.name] = st.one_of(wild[field.name], WILD_BY_NAME[field.name])
            plausible[field.name] = _plausible(field, known)
    names = sorted(wild)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        if depth == 0 and names:
            chosen = draw(st.sets(st.sampled_from(names), max_size=2))
            missing = draw(st.sets(st.sampled_from(names), max_size=1))
        else:
            chosen, missing = set(names), set()
        shape: dict[str, st.SearchStrategy[Any]] | None = None
        if depth == 0 and descriptor.name in COHERENT:
            shape = draw(st.sampled_from(COHERENT[descriptor.name]))
        values: dict[str, Any] = {}
        for name in names:
            if name in missing:
                continue
            if name in chosen:
                value = draw(wild[name])
            elif shape is not None and name in shape:
                value = draw(shape[name])
            elif shape is not None and name in BY_METHOD:
                continue
            else:
                value = draw(plausible[name])
            if value is not None:
                values[name] = value
        return cls(**values)

    return build()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x80b",
                            b"\xf4\x90\x80\x80"])


def wire_requests(method: MethodDescriptor,
                  known: Known | None = None) -> st.SearchStrategy[bytes]:
    """A request's bytes: a generated message, sometimes with a string field carrying
    invalid UTF-8 appended (what a Python client cannot produce), or plain garbage."""
    strings = [f.number for f in method.input_type.fields if f.type == F.TYPE_STRING]
    serialized = messages(method.input_type, known=known).map(
        lambda m: m.SerializeToString())
    # Mostly messages (8 in 10); now and then bytes that are not one.
    kinds: dict[str, st.SearchStrategy[bytes]] = {"message": serialized,
                                                  "garbage": st.binary(max_size=64)}
    if strings:
        kinds["bad utf-8"] = st.tuples(serialized, st.sampled_from(strings), BAD_UTF8).map(
            lambda t: t[0] + _varint(t[1] << 3 | 2) + _varint(len(t[2])) + t[2])
    return st.sampled_from(["message"] * 8 + sorted(set(kinds) - {"message"})).flatmap(
        lambda kind: kinds[kind])


def _raw_call(channel: aio.Channel, method: MethodDescriptor) -> Any:
    response = message_factory.GetMessageClass(method.output_type)
    return channel.unary_unary(f"/{SERVICE.full_name}/{method.name}",
                               request_serializer=lambda raw: raw,
                               response_deserializer=response.FromString)


async def _assert_healthy(channel: aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE.full_name):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


SEEN: dict[str, dict[str, int]] = {}  # per RPC: status name -> examples (printed at the end)


@pytest.fixture(scope="module")
async def known(stub: Stub, clock: FixedClock) -> Known:
    """Real users (each: an active app, a session, an open login challenge), so that
    calls get past the lookups; several, as wrong codes soon lock one out."""
    values: Known = {}
    for _ in range(KNOWN_USERS):
        user = f"user-fuzz-{uuid.uuid4().hex[:8]}"
        factor = await enroll_app(stub, user, clock)
        session = await login(stub, factor, clock)
        opened = await challenge(stub, factor)
        for name, value in (("user_id", user), ("factor_id", factor.factor_id),
                            ("challenge_id", opened.challenge_id),
                            ("change_proof_challenge_id", opened.challenge_id),
                            ("session_token", session.session_token)):
            values.setdefault(name, []).append(value)
    return values


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@given(data=st.data())
async def test_any_request_gets_a_status_of_the_contract(
        channel: aio.Channel, known: Known, method: MethodDescriptor,
        data: st.DataObject) -> None:
    raw = data.draw(wire_requests(method, known), label="request bytes")
    details = ""
    try:
        await _raw_call(channel, method)(raw, timeout=10)
        code = grpc.StatusCode.OK
    except aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
    assert code in ALLOWED, (code, details)
    seen = SEEN.setdefault(method.name, {})
    seen[code.name] = seen.get(code.name, 0) + 1
    await _assert_healthy(channel)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
async def test_a_request_beyond_the_receive_limit_is_resource_exhausted(
        channel: aio.Channel, method: MethodDescriptor) -> None:
    field = next(f for f in method.input_type.fields if f.type == F.TYPE_STRING)
    raw = _varint(field.number << 3 | 2) + _varint(MAX_RECEIVE + 1) + b"a" * (MAX_RECEIVE + 1)
    with pytest.raises(aio.AioRpcError) as err:
        await _raw_call(channel, method)(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _assert_healthy(channel)


def test_zz_every_fuzzed_rpc_got_past_validation(request: pytest.FixtureRequest) -> None:
    """Runs after the fuzzing above (file order): every RPC it was selected for recorded
    its examples, and for each some examples got past request validation into the
    service (an answer other than INVALID_ARGUMENT). A strategy that only ever produces
    malformed requests fuzzes the validator alone, and fails here. Run with -s to see
    the counts."""
    fuzz = test_any_request_gets_a_status_of_the_contract.__name__
    fuzzed: set[str] = set()
    for item in request.session.items:
        if isinstance(item, pytest.Function) and item.originalname == fuzz:
            method = item.callspec.params["method"]
            assert isinstance(method, MethodDescriptor)
            fuzzed.add(method.name)
    if not fuzzed:
        pytest.skip("the fuzzing test was not selected")
    for name, seen in sorted(SEEN.items()):
        print(f"fuzzed {name}: {sum(seen.values())} examples, {seen}")
    assert set(SEEN) == fuzzed, "an RPC selected for fuzzing recorded no examples"
    for name in sorted(fuzzed):
        assert sum(SEEN[name].values()) >= 10, (name, SEEN[name])
        past = {code for code in SEEN[name] if code != "INVALID_ARGUMENT"}
        assert past, f"{name}: every fuzzed request was INVALID_ARGUMENT: {SEEN[name]}"


def test_every_request_type_gets_a_strategy() -> None:
    """A new field type in a request fails here first, not silently unfuzzed."""
    for method in METHODS:
        for field in method.input_type.fields:
            if field.type not in (F.TYPE_ENUM, F.TYPE_MESSAGE):
                assert field.type in SCALARS, (method.name, field.name)
        assert messages(method.input_type) is not None
