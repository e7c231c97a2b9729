"""The TwoFactorService servicer: request -> domain values -> one service call -> response.

No SQL, no business rules, no ``context.abort`` here; errors are raised as domain
exceptions and mapped to statuses by the interceptor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service.domain import AuditContext, RevokeTarget, Session, require_application
from mfa_service.service import Services
from mfa_service.telemetry import Metrics
from mfa_service.transport import convert
from mfa_service.transport.interceptors import caller_var

Context = aio.ServicerContext[Any, Any]


def _who(client_ip: str = "", user_agent: str = "") -> AuditContext:
    caller = caller_var.get()
    return AuditContext(caller=caller.name, client_ip=client_ip, user_agent=user_agent,
                        applications=caller.applications, audit_reader=caller.audit_reader)


class TwoFactorServicer(pb_grpc.TwoFactorServiceServicer):
    def __init__(self, services: Services, metrics: Metrics | None = None,
                 answers_kept: int = 0) -> None:
        """``answers_kept``: how many CheckSession answers to keep built (0: none)."""
        self._s = services
        self._metrics = metrics
        # CheckSession's answer is a pure function of the Session's value (its assurance
        # too: the settings it reads are fixed at start), so it is built once per value
        # and kept, least recently used first out. A session checked again, from the
        # session cache or read again unchanged, costs no new message: building it was
        # about 15 µs of the server's CPU per call under load, a twentieth of a cached
        # check (docs/BENCHMARKS.md). Kept messages are shared, so never changed after
        # they are built; grpc only serializes them.
        self._answer: Callable[[Session], pb.CheckSessionResponse] = (
            functools.lru_cache(maxsize=answers_kept)(self._build_answer) if answers_kept
            else self._build_answer)

    def _build_answer(self, session: Session) -> pb.CheckSessionResponse:
        return convert.check_session_response(session, self._s.assurance.of(session))

    async def Enroll(self, request: pb.EnrollRequest, context: Context) -> pb.EnrollResponse:
        result = await self._s.enrolment.enroll(convert.enroll_command(request), _who())
        return convert.enroll_response(result)

    async def Challenge(self, request: pb.ChallengeRequest,
                        context: Context) -> pb.ChallengeResponse:
        result = await self._s.challenges.challenge(convert.challenge_command(request), _who())
        return convert.challenge_response(result)

    async def Verify(self, request: pb.VerifyRequest, context: Context) -> pb.VerifyResponse:
        a = convert.verify_args(request)
        outcome = await self._s.verification.verify(
            a.challenge_id, a.proof, _who(request.client_ip, request.user_agent),
            user_id=a.user_id, account_email=a.account_email, open_session=a.open_session,
            remember_as=a.remember_as)
        return convert.verify_response(outcome)

    async def Disable(self, request: pb.DisableRequest, context: Context) -> pb.DisableResponse:
        a = convert.disable_args(request)
        outcome = await self._s.disabling.disable(
            a.user_id, a.factor_id, a.challenge_id, a.proof,
            _who(request.client_ip, request.user_agent), account_email=a.account_email)
        return convert.disable_response(outcome)

    async def CheckSession(self, request: pb.CheckSessionRequest,
                           context: Context) -> pb.CheckSessionResponse:
        token, application = convert.check_session_args(request)
        # Either application may check any session.
        require_application(caller_var.get().applications, application)
        session = await self._s.sessions.check(token)
        if self._metrics is not None:
            self._metrics.session_checked(session is not None)
        return convert.INVALID_SESSION if session is None else self._answer(session)

    async def ListFactors(self, request: pb.ListFactorsRequest,
                          context: Context) -> pb.ListFactorsResponse:
        factors, recovery_remaining = await self._s.profile.list_factors(
            convert.list_factors_args(request), _who())
        return pb.ListFactorsResponse(factors=[convert.factor_pb(f) for f in factors],
                                      recovery_codes_remaining=recovery_remaining)

    async def RevokeSession(self, request: pb.RevokeSessionRequest,
                            context: Context) -> pb.RevokeSessionResponse:
        which, value, keep = convert.revoke_target(request)
        if which is RevokeTarget.SESSION_TOKEN:
            count = await self._s.sessions.revoke_token(value, _who())
        else:
            count = await self._s.sessions.revoke_user(value, _who(), keep_token=keep)
        return pb.RevokeSessionResponse(revoked_count=count)

    async def RegenerateRecoveryCodes(
            self, request: pb.RegenerateRecoveryCodesRequest,
            context: Context) -> pb.RegenerateRecoveryCodesResponse:
        a = convert.regenerate_args(request)
        codes = await self._s.recovery.regenerate(
            a.user_id, a.proof_challenge_id, a.application,
            _who(request.client_ip, request.user_agent), account_email=a.account_email)
        return pb.RegenerateRecoveryCodesResponse(recovery_codes=codes)

    async def RecognizeDevice(self, request: pb.RecognizeDeviceRequest,
                              context: Context) -> pb.RecognizeDeviceResponse:
        a = convert.recognize_args(request)
        found = await self._s.devices.recognize(
            a.user_id, a.token, a.application, _who(request.client_ip, request.user_agent))
        return convert.recognize_response(found)

    async def ListDevices(self, request: pb.ListDevicesRequest,
                          context: Context) -> pb.ListDevicesResponse:
        devices = await self._s.devices.list_devices(convert.list_devices_args(request), _who())
        return pb.ListDevicesResponse(devices=[convert.device_pb(d) for d in devices])

    async def ForgetDevice(self, request: pb.ForgetDeviceRequest,
                           context: Context) -> pb.ForgetDeviceResponse:
        user_id, device_id = convert.forget_device_args(request)
        ended = await self._s.devices.forget_one(
            user_id, device_id, _who(request.client_ip, request.user_agent))
        return pb.ForgetDeviceResponse(sessions_ended=ended)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest,
                              context: Context) -> pb.ListAuditEventsResponse:
        q = convert.audit_query(request)
        events = await self._s.profile.list_audit_events(
            q.user_id, _who(), start=q.start, end=q.end, before_id=q.before_id,
            limit=q.limit + 1)
        return convert.audit_response(events, q.limit)
