"""Finds the module for a method; methods not offered yet answer NotSupported."""

from __future__ import annotations

from collections.abc import Iterable

from mfa_service.domain import Method
from mfa_service.errors import NotSupported
from mfa_service.factors.base import FactorMethod

_PROTO_NAMES = {
    Method.EMAIL: "METHOD_EMAIL",
    Method.PHONE: "METHOD_PHONE",
    Method.AUTHENTICATOR_APP: "METHOD_AUTHENTICATOR_APP",
    Method.RECOVERY_CODE: "METHOD_RECOVERY_CODE",
    Method.PASSKEY: "METHOD_PASSKEY",
}


class FactorRegistry:
    def __init__(self, methods: Iterable[FactorMethod]) -> None:
        self._methods = {m.method: m for m in methods}

    def get(self, method: Method) -> FactorMethod:
        try:
            return self._methods[method]
        except KeyError:
            raise NotSupported(
                f"{_PROTO_NAMES[method]} is not available on this server yet") from None

    def __contains__(self, method: Method) -> bool:
        return method in self._methods
