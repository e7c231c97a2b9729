"""An attacker against the real gRPC server: a Hypothesis state machine that calls every
RPC with arguments it chooses, on SQLite and PostgreSQL (docs/SECURITY.md, "The attacker").
Remembered browsers too: it asks every verification to remember its browser and tries
every device token that reached it (and a made-up one) with RecognizeDevice.

Each example makes a victim with random ACTIVE factors (app, email, phone, passkey), the
first confirmed on the password step, the others with a fresh session, and sometimes a
PENDING factor the victim started with a fresh session and abandoned (a cancelled passkey
dialog, an unscanned QR code). Then the attacker plays:

- capability (a), the password step only: it knows the user id and calls every RPC as the
  portal or the backoffice, with ids it learnt from ListFactors and from responses, its
  own TOTP secrets, its own software passkey, its own email address and phone number (it
  reads its own inbox), recovery codes it obtained, and guesses;
- capability (b): the same, plus a stolen fresh session token of the victim.

After every step: the victim's factors are still ACTIVE with the same destinations; under
(a) no factor of the attacker's is ACTIVE and no session reached it; under (b) every
factor the attacker added was told to every email and phone of the victim; and no call
answered UNKNOWN or INTERNAL.

The server runs on the test's event loop; the machine runs in a worker thread with the
generated *sync* client (Hypothesis drives state machines synchronously) and reaches the
database through that loop. ``MFA_ATTACKER_EXAMPLES`` (default 12; 4 in a fast-tier run,
tests/support/examples.py) and ``MFA_ATTACKER_STEPS`` (default 20) set the size: CI runs
the default, a long profile is
``MFA_ATTACKER_EXAMPLES=500 ./scripts/test tests/api/test_attacker.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc
import pyotp
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import decode_payload
from mfa_service.delivery.templates import notice_message
from mfa_service.domain import Channel, NoticeKind
from mfa_service.store.models import outbox
from tests.support.config import TEST_KEYRING
from tests.support.examples import examples
from tests.support.rig import unique_phone
from tests.support.softauthn import SoftAuthenticator, SoftAuthnError

EXAMPLES = int(os.environ.get("MFA_ATTACKER_EXAMPLES", str(examples(12, least=4))))
STEPS = int(os.environ.get("MFA_ATTACKER_STEPS", "20"))
KEYRING = Keyring.parse(TEST_KEYRING)
CODE = re.compile(r"\b(\d{6,8})\b")
APPS = (pb.APPLICATION_PORTAL, pb.APPLICATION_BACKOFFICE)
PURPOSES = (pb.PURPOSE_LOGIN, pb.PURPOSE_CONFIRM_ENROLLMENT, pb.PURPOSE_DISABLE,
            pb.PURPOSE_CHANGE_PHONE, pb.PURPOSE_REGENERATE_RECOVERY_CODES)
METHODS = (pb.METHOD_AUTHENTICATOR_APP, pb.METHOD_EMAIL, pb.METHOD_PHONE, pb.METHOD_PASSKEY)
CHANNELS = (pb.CHANNEL_UNSPECIFIED, pb.CHANNEL_SMS, pb.CHANNEL_VOICE)
KINDS = ("own", "recovery", "guess")
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
T = TypeVar("T")
Method: TypeAlias = pb.Method.ValueType
Purpose: TypeAlias = pb.Purpose.ValueType
App_: TypeAlias = pb.Application.ValueType
Channel_: TypeAlias = pb.Channel.ValueType


@dataclass
class World:
    """What every example shares: the server, its loop, its clock, a sync client."""

    app: App
    loop: asyncio.AbstractEventLoop
    clock: FixedClock
    stub: pb_grpc.TwoFactorServiceStub

    def db(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def messages(self, **where: str) -> list[tuple[str, str, str, str]]:
        """(kind, destination, challenge id, text) of outbox rows, decrypted: the
        inboxes of the victim and of the attacker (each reads only its own)."""
        async def read() -> list[Any]:
            query = select(outbox)
            for column, value in where.items():
                query = query.where(outbox.c[column] == value)
            async with self.app.database.engine.connect() as conn:
                return list(await conn.execute(query.order_by(outbox.c.created_at)))
        out = []
        for row in self.db(read()):
            text = ""
            if row.payload_ciphertext is not None:
                text = decode_payload(KEYRING, row.id, row.payload_key_id,
                                      row.payload_ciphertext)[1]
            out.append((row.kind, row.destination, row.challenge_id or "", text))
        return out

    def code_for(self, challenge_id: str) -> str:
        [(_, _, _, text)] = self.messages(challenge_id=challenge_id, kind="code")
        found = CODE.search(text)
        assert found is not None
        return found.group(1)


@dataclass
class Seen:
    """A challenge the attacker opened or was handed, and what came with it."""

    challenge_id: str
    factor_id: str
    creation_options: str = ""
    request_options: str = ""


@dataclass
class Attacker:
    email: str
    phone: str
    key: SoftAuthenticator = field(default_factory=SoftAuthenticator)
    apps: dict[str, str] = field(default_factory=dict)  # factor id -> TOTP secret
    inbox_factors: set[str] = field(default_factory=set)  # its own email / phone factors
    added: set[str] = field(default_factory=set)  # factors it enrolled
    known: list[str] = field(default_factory=list)  # factor ids learnt
    pending: list[str] = field(default_factory=list)  # PENDING ones seen in ListFactors
    challenges: list[Seen] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)  # tokens that reached it
    codes: list[str] = field(default_factory=list)  # recovery codes that reached it
    # Remembered browsers' tokens that reached it, and one it made up.
    device_tokens: list[str] = field(default_factory=lambda: ["A" * 43])

    def learn(self, factor_id: str) -> None:
        if factor_id and factor_id not in self.known:
            self.known.append(factor_id)


class Victim:
    """The user, set up through the same API a portal uses."""

    def __init__(self, w: World, methods: list[Method], abandoned: Method | None) -> None:
        self.w, self.user_id = w, f"victim-{uuid.uuid4().hex[:12]}"
        self.key = SoftAuthenticator()
        self.secret = ""
        self.email = f"{self.user_id}@example.com"
        self.phone = unique_phone()
        session = ""
        for method in methods:
            factor_id = self._enrol(method, session)
            if not session:  # the first factor: pass 2FA with it for the others
                session = self.login(factor_id, method)
        if abandoned is not None:
            # Started with a fresh session, then left (a cancelled passkey dialog).
            self.w.stub.Enroll(pb.EnrollRequest(
                user_id=self.user_id, method=abandoned, application=pb.APPLICATION_PORTAL,
                session_token=self.login(*self.first)), timeout=10)
        listed = self.w.stub.ListFactors(pb.ListFactorsRequest(user_id=self.user_id))
        self.factors = {f.factor_id: f.masked_destination for f in listed.factors
                        if f.status == pb.FACTOR_STATUS_ACTIVE}
        self.channels = [d for d, m in ((self.email, pb.METHOD_EMAIL),
                                        (self.phone, pb.METHOD_PHONE)) if m in methods]

    first: tuple[str, Method]

    def _enrol(self, method: Method, session: str) -> str:
        s = self.w.stub
        resp = s.Enroll(pb.EnrollRequest(
            user_id=self.user_id, method=method, application=pb.APPLICATION_PORTAL,
            email=self.email if method == pb.METHOD_EMAIL else "",
            phone_number=self.phone if method == pb.METHOD_PHONE else "",
            session_token=session), timeout=10)
        request = pb.VerifyRequest(challenge_id=resp.challenge_id)
        if method == pb.METHOD_AUTHENTICATOR_APP:
            self.secret = resp.totp_secret
            request.code = pyotp.TOTP(self.secret).at(self.w.clock.now())
        elif method == pb.METHOD_PASSKEY:
            request.webauthn_response = self.key.create(resp.webauthn_creation_options)
        else:
            request.code = self.w.code_for(resp.challenge_id)
        assert s.Verify(request, timeout=10).result == pb.VERIFY_RESULT_APPROVED
        self.w.clock.advance(31)  # a new TOTP step, past the resend cooldown
        if not session:
            self.first = (resp.factor.factor_id, method)
        return resp.factor.factor_id

    def login(self, factor_id: str, method: Method) -> str:
        s = self.w.stub
        ch = s.Challenge(pb.ChallengeRequest(
            user_id=self.user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL), timeout=10)
        request = pb.VerifyRequest(challenge_id=ch.challenge_id)
        if method == pb.METHOD_AUTHENTICATOR_APP:
            request.code = pyotp.TOTP(self.secret).at(self.w.clock.now())
        elif method == pb.METHOD_PASSKEY:
            request.webauthn_response = self.key.get(ch.webauthn_request_options)
        else:
            request.code = self.w.code_for(ch.challenge_id)
        ok = s.Verify(request, timeout=10)
        assert ok.result == pb.VERIFY_RESULT_APPROVED
        self.w.clock.advance(31)
        return ok.session.session_token


def machine(w: World, stolen_session: bool) -> type[RuleBasedStateMachine]:
    class Attack(RuleBasedStateMachine):
        victim: Victim
        me: Attacker
        stolen: str

        @initialize(methods=st.lists(st.sampled_from(METHODS), min_size=1, max_size=4,
                                     unique=True),
                    abandoned=st.sampled_from([None, pb.METHOD_PASSKEY,
                                               pb.METHOD_AUTHENTICATOR_APP]))
        def setup(self, methods: list[Method], abandoned: Method | None) -> None:
            if abandoned in methods and abandoned == pb.METHOD_AUTHENTICATOR_APP:
                abandoned = None  # one app per user: nothing to abandon
            self.victim = Victim(w, methods, abandoned)
            self.me = Attacker(email=f"thief-{uuid.uuid4().hex[:10]}@evil.example",
                               phone=unique_phone())
            self.stolen = self.victim.login(*self.victim.first) if stolen_session else ""
            self.list_factors()

        # -- helpers ---------------------------------------------------------------------
        def call(self, rpc: Any, request: Any) -> Any:
            try:
                return rpc(request, timeout=10)
            except grpc.RpcError as err:
                failed = err
            assert failed.code() not in NEVER, f"{failed.code()}: {failed.details()}"
            return None

        def session(self, data: st.DataObject) -> str:
            tokens = ["", *([self.stolen] if self.stolen else []), *self.me.sessions]
            return data.draw(st.sampled_from(tokens), label="session")

        def factor(self, data: st.DataObject) -> str:
            if not self.me.known:
                return str(uuid.uuid4())
            return data.draw(st.sampled_from(self.me.known), label="factor")

        def proof(self, c: Seen, kind: str, data: st.DataObject) -> dict[str, Any]:
            """The attacker's best answer of ``kind`` to challenge ``c``."""
            me = self.me
            if kind == "own":
                try:
                    if c.creation_options:
                        return {"webauthn_response": me.key.create(c.creation_options)}
                    if c.request_options:
                        return {"webauthn_response": me.key.get(c.request_options)}
                except SoftAuthnError:
                    pass
                if c.factor_id in me.apps:
                    return {"code": pyotp.TOTP(me.apps[c.factor_id]).at(w.clock.now())}
                if c.factor_id in me.inbox_factors:
                    try:
                        return {"code": w.code_for(c.challenge_id)}
                    except ValueError:  # nothing was sent for it
                        pass
            if kind == "recovery" and me.codes:
                return {"code": data.draw(st.sampled_from(me.codes), label="code")}
            return {"code": data.draw(st.sampled_from(["123456", "000000", "99999999"]),
                                      label="guess")}

        def took(self, resp: Any) -> None:
            """What a Verify/Disable answer handed the attacker."""
            if not isinstance(resp, pb.VerifyResponse):
                return
            if resp.HasField("session") and resp.session.session_token:
                self.me.sessions.append(resp.session.session_token)
            self.me.codes.extend(resp.recovery_codes)
            if resp.device_token:
                self.me.device_tokens.append(resp.device_token)

        # -- the rules: every RPC ------------------------------------------------------------
        @rule()
        def list_factors(self) -> None:
            listed = self.call(w.stub.ListFactors,
                               pb.ListFactorsRequest(user_id=self.victim.user_id))
            for f in listed.factors if listed is not None else ():
                self.me.learn(f.factor_id)
                if f.status == pb.FACTOR_STATUS_PENDING and f.factor_id not in self.me.pending:
                    self.me.pending.append(f.factor_id)

        @rule(method=st.sampled_from(METHODS), application=st.sampled_from(APPS),
              data=st.data())
        def enroll(self, method: Method, application: App_, data: st.DataObject) -> None:
            resp = self.call(w.stub.Enroll, pb.EnrollRequest(
                user_id=self.victim.user_id, method=method, application=application,
                email=self.me.email if method == pb.METHOD_EMAIL else "",
                phone_number=self.me.phone if method == pb.METHOD_PHONE else "",
                session_token=self.session(data)))
            if resp is None:
                return
            fid = resp.factor.factor_id
            self.me.learn(fid)
            self.me.added.add(fid)
            if method == pb.METHOD_AUTHENTICATOR_APP:
                self.me.apps[fid] = resp.totp_secret
            elif method in (pb.METHOD_EMAIL, pb.METHOD_PHONE):
                self.me.inbox_factors.add(fid)
            self.me.challenges.append(Seen(resp.challenge_id, fid,
                                           creation_options=resp.webauthn_creation_options))

        def open_challenge(self, fid: str, purpose: Purpose, application: App_,
                           channel: Channel_, data: st.DataObject) -> Seen | None:
            resp = self.call(w.stub.Challenge, pb.ChallengeRequest(
                user_id=self.victim.user_id, factor_id=fid, purpose=purpose,
                application=application, channel=channel, session_token=self.session(data)))
            if resp is None:
                return None
            seen = Seen(resp.challenge_id, fid, creation_options=resp.webauthn_creation_options,
                        request_options=resp.webauthn_request_options)
            self.me.challenges.append(seen)
            return seen

        def answer(self, c: Seen, kind: str, data: st.DataObject) -> None:
            remember = data.draw(st.booleans(), label="remember_device")
            self.took(self.call(w.stub.Verify, pb.VerifyRequest(
                challenge_id=c.challenge_id, **self.proof(c, kind, data),
                # Asks for a session with a confirmation (the first factor's only).
                open_session=data.draw(st.booleans(), label="open_session"),
                # And to remember its browser, whatever the purpose.
                remember_device=remember, device_label="Attacker" if remember else "")))

        def disable_with(self, c: Seen, target: str, kind: str, data: st.DataObject) -> None:
            self.took(self.call(w.stub.Disable, pb.DisableRequest(
                user_id=self.victim.user_id, factor_id=target,
                challenge_id=c.challenge_id, **self.proof(c, kind, data))))

        @rule(purpose=st.sampled_from(PURPOSES), application=st.sampled_from(APPS),
              channel=st.sampled_from(CHANNELS), data=st.data())
        def challenge(self, purpose: Purpose, application: App_, channel: Channel_,
                      data: st.DataObject) -> None:
            self.open_challenge(self.factor(data), purpose, application, channel, data)

        @precondition(lambda self: bool(self.me.challenges))
        @rule(kind=st.sampled_from(KINDS), data=st.data())
        def verify(self, kind: str, data: st.DataObject) -> None:
            self.answer(data.draw(st.sampled_from(self.me.challenges)), kind, data)

        @precondition(lambda self: bool(self.me.challenges))
        @rule(kind=st.sampled_from(KINDS), data=st.data())
        def disable(self, kind: str, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(self.me.challenges))
            self.disable_with(c, self.factor(data), kind, data)

        # Two calls an attacker makes back to back, as one move: a search that must
        # find "open a challenge, then answer it" by chance finds far less.
        @rule(purpose=st.sampled_from(PURPOSES), application=st.sampled_from(APPS),
              kind=st.sampled_from(KINDS), data=st.data())
        def challenge_and_verify(self, purpose: Purpose, application: App_, kind: str,
                                 data: st.DataObject) -> None:
            c = self.open_challenge(self.factor(data), purpose, application,
                                    pb.CHANNEL_UNSPECIFIED, data)
            if c is not None:
                self.answer(c, kind, data)

        # What ListFactors shows an attacker first: a factor someone started and left.
        @precondition(lambda self: bool(self.me.pending))
        @rule(application=st.sampled_from(APPS), data=st.data())
        def finish_a_pending_factor(self, application: App_, data: st.DataObject) -> None:
            c = self.open_challenge(data.draw(st.sampled_from(self.me.pending)),
                                    pb.PURPOSE_CONFIRM_ENROLLMENT, application,
                                    pb.CHANNEL_UNSPECIFIED, data)
            if c is not None:
                self.answer(c, "own", data)

        @rule(application=st.sampled_from(APPS), kind=st.sampled_from(KINDS),
              data=st.data())
        def challenge_and_disable(self, application: App_, kind: str,
                                  data: st.DataObject) -> None:
            c = self.open_challenge(self.factor(data), pb.PURPOSE_DISABLE, application,
                                    pb.CHANNEL_UNSPECIFIED, data)
            if c is not None:
                self.disable_with(c, self.factor(data), kind, data)

        @rule(data=st.data())
        def regenerate(self, data: st.DataObject) -> None:
            c: Seen | None = None
            with_proof = data.draw(st.booleans(), label="with proof")
            if self.me.challenges and with_proof:
                c = data.draw(st.sampled_from(self.me.challenges), label="proof")
            resp = self.call(w.stub.RegenerateRecoveryCodes, pb.RegenerateRecoveryCodesRequest(
                user_id=self.victim.user_id, application=pb.APPLICATION_PORTAL,
                session_token=self.session(data),
                proof_challenge_id=c.challenge_id if c else ""))
            if resp is not None:
                self.me.codes.extend(resp.recovery_codes)

        @rule(data=st.data())
        def revoke(self, data: st.DataObject) -> None:
            if data.draw(st.booleans(), label="everywhere"):
                self.call(w.stub.RevokeSession,
                          pb.RevokeSessionRequest(user_id=self.victim.user_id))
            elif token := self.session(data):
                self.call(w.stub.RevokeSession, pb.RevokeSessionRequest(session_token=token))

        # Remembered browsers: any token that reached it, or a made-up one, on either
        # application; a session it opens is the attacker's (the invariant below).
        @rule(application=st.sampled_from(APPS), data=st.data())
        def recognize_device(self, application: App_, data: st.DataObject) -> None:
            resp = self.call(w.stub.RecognizeDevice, pb.RecognizeDeviceRequest(
                user_id=self.victim.user_id, application=application,
                device_token=data.draw(st.sampled_from(self.me.device_tokens),
                                       label="device token"),
                client_ip="203.0.113.66"))
            if resp is not None and resp.recognized:
                self.me.sessions.append(resp.session.session_token)

        @rule(data=st.data())
        def forget_device(self, data: st.DataObject) -> None:
            listed = self.call(w.stub.ListDevices,
                               pb.ListDevicesRequest(user_id=self.victim.user_id))
            ids = [d.device_id for d in listed.devices] if listed is not None else []
            self.call(w.stub.ForgetDevice, pb.ForgetDeviceRequest(
                user_id=self.victim.user_id,
                device_id=data.draw(st.sampled_from(ids), label="device")
                if ids else str(uuid.uuid4())))

        @rule(data=st.data())
        def check_session(self, data: st.DataObject) -> None:
            token = self.session(data) or "not-a-token"
            self.call(w.stub.CheckSession, pb.CheckSessionRequest(
                session_token=token, application=pb.APPLICATION_BACKOFFICE))

        @rule(seconds=st.sampled_from([1, 31, 5 * 60 + 1, 10 * 60 + 1]))
        def wait(self, seconds: int) -> None:
            # Minutes, never the day of MFA_NEW_CREDENTIAL_HOLD: within it nothing new
            # may remove what the victim had, and that is what is under test.
            w.clock.advance(seconds)

        # -- what must hold after every step --------------------------------------------------
        @invariant()
        def the_victims_factors_stay(self) -> None:
            listed = w.stub.ListFactors(pb.ListFactorsRequest(user_id=self.victim.user_id))
            now = {f.factor_id: f for f in listed.factors}
            for fid, destination in self.victim.factors.items():
                assert now[fid].status == pb.FACTOR_STATUS_ACTIVE, (
                    f"the victim's {pb.Method.Name(now[fid].method)} is "
                    f"{pb.FactorStatus.Name(now[fid].status)}")
                assert now[fid].masked_destination == destination
            added = [f for fid, f in now.items()
                     if f.status == pb.FACTOR_STATUS_ACTIVE and fid not in self.victim.factors]
            if not stolen_session:
                assert not added, (
                    "with the password alone the attacker made a factor ACTIVE: "
                    f"{[pb.Method.Name(f.method) for f in added]}")
                assert not self.me.sessions, "with the password alone a session reached it"
                return
            for f in added:  # (b): every channel of the victim is told
                for destination in self.victim.channels:
                    channel = Channel.EMAIL if "@" in destination else Channel.SMS
                    expected = notice_message(channel, kind=NoticeKind.FACTOR_ADDED,
                                              product="Cloud Platform",
                                              masked_detail=f.masked_destination)[1]
                    told = [t for k, d, _, t in w.messages(user_id=self.victim.user_id,
                                                           kind="notice")
                            if d == destination and t == expected]
                    assert told, f"{destination} was not told of {pb.Method.Name(f.method)}"

    return Attack


@pytest.mark.parametrize("capability", ["a-password-only", "b-stolen-fresh-session"])
async def test_an_attacker_cannot_take_over(app: App, clock: FixedClock,
                                            capability: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        world = World(app, asyncio.get_running_loop(), clock,
                      pb_grpc.TwoFactorServiceStub(channel))
        attack = machine(world, stolen_session=capability.startswith("b"))
        await asyncio.to_thread(run_state_machine_as_test, attack, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
