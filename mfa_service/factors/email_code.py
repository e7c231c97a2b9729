"""METHOD_EMAIL: a code mailed to a verified address."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

from mfa_service.domain import Channel, Method
from mfa_service.errors import InvalidArgument
from mfa_service.factors.base import EnrollInput, EnrollmentMaterial
from mfa_service.factors.sent_code import SentCodeMethod


def mask_email(address: str) -> str:
    """``jane@example.com`` -> ``j•••@example.com`` (enough to recognise, not to harvest)."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}•••@{domain}"


def normalise_email(raw: str) -> str:
    """Syntax check and normalisation (no DNS lookup: the service may not reach the internet)."""
    if not raw:
        raise InvalidArgument.single("email", "is required for METHOD_EMAIL")
    try:
        result = validate_email(raw, check_deliverability=False)
    except EmailNotValidError:
        # Not the library's message: it quotes parts of the input back, and a caller's
        # mistake (a token pasted into the wrong field) must not be echoed into logs.
        raise InvalidArgument.single("email", "is not a valid email address") from None
    return str(result.normalized)


class EmailCode(SentCodeMethod):
    method = Method.EMAIL

    def channel_for(self, requested: Channel | None) -> Channel:
        if requested not in (None, Channel.EMAIL):
            raise InvalidArgument.single("channel", "must be unset or CHANNEL_EMAIL for "
                                                    "METHOD_EMAIL")
        return Channel.EMAIL

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        address = normalise_email(request.email)
        return EnrollmentMaterial(label=address, masked_destination=mask_email(address),
                                  destination=address)
