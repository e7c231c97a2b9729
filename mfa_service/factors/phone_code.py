"""METHOD_PHONE: a code by text message or voice call, chosen per challenge."""

from __future__ import annotations

import phonenumbers
from phonenumbers import PhoneNumberType

from mfa_service.domain import Channel, Method
from mfa_service.errors import InvalidArgument
from mfa_service.factors.base import EnrollInput, EnrollmentMaterial
from mfa_service.factors.sent_code import SentCodeMethod

# Numbers a code may be sent to. Everything else is refused: premium-rate, shared-cost,
# UAN, personal and unknown types are how SMS pumping and toll fraud make money (a
# caller who can trigger sends to them earns the attacker the termination fee), and
# toll-free, pager and voicemail numbers cannot receive a code.
SENDABLE_TYPES = frozenset({
    PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE, PhoneNumberType.VOIP,
})


def normalise_phone(raw: str) -> str:
    """Parse an international number and return it in E.164 ("+4512345678").

    Only numbers of a type in SENDABLE_TYPES are accepted (phonenumbers.number_type).
    """
    if not raw:
        raise InvalidArgument.single("phone_number", "is required for METHOD_PHONE")
    if not raw.startswith("+"):
        raise InvalidArgument.single("phone_number", "must be in international form: "
                                                     "'+' and the country code")
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        raise InvalidArgument.single("phone_number", "is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidArgument.single("phone_number", "is not a valid phone number")
    if phonenumbers.number_type(number) not in SENDABLE_TYPES:
        raise InvalidArgument.single(
            "phone_number", "must be a mobile or landline number: premium-rate, "
                            "shared-cost, toll-free and personal numbers are refused")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_area(e164: str) -> tuple[str, str]:
    """The range and the region codes to a number are counted under (service/limits.py):
    ``+4512345678`` -> ``("+451234", "DK")``. The range is the E.164 number less its last
    4 digits (10,000 numbers: the block an operator assigns or an attacker rents for SMS
    pumping); the region is phonenumbers' ("US", "CA" and "JM" share +1 but not their
    termination fees; "001" for non-geographic numbers such as +882)."""
    number = phonenumbers.parse(e164, None)
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    return e164[:-4], region


def mask_phone(e164: str) -> str:
    """``+4512345612`` -> ``+45 •• •• •• 12``: country code and the last two digits."""
    number = phonenumbers.parse(e164, None)
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    prefix = f"+{number.country_code}"
    rest = formatted[len(prefix):]
    total = sum(c.isdigit() for c in rest)
    seen, out = 0, []
    for c in rest:
        if c.isdigit():
            seen += 1
            out.append(c if seen > total - 2 else "•")
        elif c in " -":
            out.append(" ")
    return prefix + "".join(out)


class PhoneCode(SentCodeMethod):
    method = Method.PHONE

    def channel_for(self, requested: Channel | None) -> Channel:
        if requested is None:
            return Channel.SMS
        if requested not in (Channel.SMS, Channel.VOICE):
            raise InvalidArgument.single("channel", "must be CHANNEL_SMS or CHANNEL_VOICE for "
                                                    "METHOD_PHONE")
        return requested

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        e164 = normalise_phone(request.phone_number)
        return EnrollmentMaterial(label=e164, masked_destination=mask_phone(e164),
                                  destination=e164)
