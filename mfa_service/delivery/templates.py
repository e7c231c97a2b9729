"""The words of every message the service sends: one-time codes and security notices.

Pure functions over a small catalogue keyed by locale. A locale we do not have (or a key a
translation lacks) falls back to English, so a missing translation degrades to English
rather than to an error at send time.

Channel rules, and why:

* SMS text uses only GSM 03.38 (GSM-7) characters. One character outside it (an em dash, a
  curly quote) switches the whole SMS to UCS-2, cutting a segment from 160 to 70
  characters; the English code SMS fits one 160-character segment with an 8-digit code
  and a 32-character product name.
* VOICE reads the code digit by digit with commas between digits, which text-to-speech
  engines render as pauses, and says it twice: a listener cannot scroll back.
* Only EMAIL has a subject; the other channels get "".

Every code message names the product, says how long the code is valid and warns never to
share it (the usual phishing script is "read me the code we just sent you").
"""

from __future__ import annotations

from mfa_service.domain import Channel, NoticeKind, Purpose

DEFAULT_LOCALE = "en"

NOTICE_KINDS = tuple(NoticeKind)

# Placeholders: {product}, {code}, {spoken_code}, {purpose}, {validity}, {sentence},
# {detail} (" (<masked detail>)" or ""), {n}. SMS strings must stay GSM-7 (no em dash,
# no curly quotes); tests check both the alphabet and the 160-character budget.
CATALOGUE: dict[str, dict[str, str]] = {
    "en": {
        "minutes.one": "1 minute",
        "minutes.other": "{n} minutes",
        "purpose.login": "to sign in",
        "purpose.confirm_enrollment.email": "to confirm your email address",
        "purpose.confirm_enrollment.phone": "to confirm your phone number",
        "purpose.disable": "to turn off two-factor authentication",
        "purpose.change_phone": "to change your phone number",
        "purpose.regenerate_recovery_codes": "to make new recovery codes",
        "code.email.subject": "Your {product} verification code",
        "code.email.text": (
            "Your {product} verification code {purpose} is:\n"
            "\n"
            "    {code}\n"
            "\n"
            "It is valid for {validity}.\n"
            "\n"
            "Never share this code \u2014 we will never ask you for it, not by phone, "
            "email or chat.\n"
            "If you did not request this code, ignore this message.\n"
        ),
        "code.sms.text": (
            "{product} code {purpose}: {code}. Valid for {validity}. "
            "Never share it - we will never ask for it."
        ),
        "code.voice.text": (
            "This is {product}. Your verification code {purpose} is: {spoken_code}. "
            "I repeat: {spoken_code}. The code is valid for {validity}. "
            "Never share this code. We will never ask you for it. Goodbye."
        ),
        "notice.closing": "If this wasn't you, contact support immediately.",
        "notice.email.text": "{sentence}\n\n{closing}\n",
        "notice.sms.text": "{sentence} {closing}",
        "notice.voice.text": (
            "This is {product} with a security notice. {sentence} {closing} Goodbye."
        ),
        "notice.factor_added.subject": "{product}: a two-factor method was added",
        "notice.factor_added.sentence": (
            "A new two-factor method{detail} was added to your {product} account."
        ),
        "notice.factor_removed.subject": "{product}: a two-factor method was removed",
        "notice.factor_removed.sentence": (
            "A two-factor method{detail} was removed from your {product} account."
        ),
        "notice.phone_changed.subject": "{product}: your phone number was changed",
        "notice.phone_changed.sentence": (
            "The phone number for two-factor authentication on your {product} account "
            "was changed{detail}."
        ),
        "notice.recovery_codes_used.subject": "{product}: a recovery code was used",
        "notice.recovery_codes_used.sentence": (
            "A recovery code was used to sign in to your {product} account{detail}."
        ),
        "notice.recovery_codes_regenerated.subject": "{product}: new recovery codes",
        "notice.recovery_codes_regenerated.sentence": (
            "New recovery codes were created for your {product} account{detail}. "
            "The old codes no longer work."
        ),
        "notice.account_locked.subject": "{product}: your account was locked",
        "notice.account_locked.sentence": (
            "Your {product} account was temporarily locked after too many failed "
            "verification attempts{detail}."
        ),
        "notice.second_factor_reset.subject": "{product}: your two-factor methods were reset",
        "notice.second_factor_reset.sentence": (
            "Support turned off every two-factor method and recovery code on your "
            "{product} account{detail}. You will be asked to set up a new one."
        ),
    },
    "da": {
        "minutes.one": "1 minut",
        "minutes.other": "{n} minutter",
        "purpose.login": "til at logge ind",
        "purpose.confirm_enrollment.email": "til at bekræfte din e-mailadresse",
        "purpose.confirm_enrollment.phone": "til at bekræfte dit telefonnummer",
        "purpose.disable": "til at slå totrinsbekræftelse fra",
        "purpose.change_phone": "til at skifte dit telefonnummer",
        "purpose.regenerate_recovery_codes": "til at lave nye gendannelseskoder",
        "code.email.subject": "Din {product}-bekræftelseskode",
        "code.email.text": (
            "Din {product}-bekræftelseskode {purpose} er:\n"
            "\n"
            "    {code}\n"
            "\n"
            "Koden er gyldig i {validity}.\n"
            "\n"
            "Del aldrig koden \u2014 vi beder dig aldrig om den, hverken i telefonen, "
            "på e-mail eller i en chat.\n"
            "Hvis du ikke har bedt om koden, kan du se bort fra denne besked.\n"
        ),
        "code.sms.text": (
            "Din {product}-kode {purpose}: {code}. Gyldig i {validity}. "
            "Del aldrig koden - vi beder dig aldrig om den."
        ),
        "code.voice.text": (
            "Dette er {product}. Din bekræftelseskode {purpose} er: {spoken_code}. "
            "Jeg gentager: {spoken_code}. Koden er gyldig i {validity}. "
            "Del aldrig koden. Vi beder dig aldrig om den. Farvel."
        ),
        "notice.closing": "Hvis det ikke var dig, så kontakt support med det samme.",
        "notice.email.text": "{sentence}\n\n{closing}\n",
        "notice.sms.text": "{sentence} {closing}",
        "notice.voice.text": (
            "Dette er {product} med en sikkerhedsbesked. {sentence} {closing} Farvel."
        ),
        "notice.factor_added.subject": "{product}: en totrinsmetode blev tilføjet",
        "notice.factor_added.sentence": (
            "En ny totrinsmetode{detail} blev tilføjet til din {product}-konto."
        ),
        "notice.factor_removed.subject": "{product}: en totrinsmetode blev fjernet",
        "notice.factor_removed.sentence": (
            "En totrinsmetode{detail} blev fjernet fra din {product}-konto."
        ),
        "notice.phone_changed.subject": "{product}: dit telefonnummer blev ændret",
        "notice.phone_changed.sentence": (
            "Telefonnummeret til totrinsbekræftelse på din {product}-konto blev ændret{detail}."
        ),
        "notice.recovery_codes_used.subject": "{product}: en gendannelseskode blev brugt",
        "notice.recovery_codes_used.sentence": (
            "En gendannelseskode blev brugt til at logge ind på din {product}-konto{detail}."
        ),
        "notice.recovery_codes_regenerated.subject": "{product}: nye gendannelseskoder",
        "notice.recovery_codes_regenerated.sentence": (
            "Der blev lavet nye gendannelseskoder til din {product}-konto{detail}. "
            "De gamle koder virker ikke længere."
        ),
        "notice.account_locked.subject": "{product}: din konto blev låst",
        "notice.account_locked.sentence": (
            "Din {product}-konto blev midlertidigt låst efter for mange mislykkede "
            "bekræftelsesforsøg{detail}."
        ),
        "notice.second_factor_reset.subject": "{product}: dine totrinsmetoder blev nulstillet",
        "notice.second_factor_reset.sentence": (
            "Support slog alle totrinsmetoder og gendannelseskoder fra på din "
            "{product}-konto{detail}. Du bliver bedt om at sætte en ny op."
        ),
    },
}


def resolve_locale(locale: str) -> str:
    """The catalogue locale for a BCP 47 / POSIX tag ("da-DK", "da_DK" -> "da").

    Unknown languages fall back to English.
    """
    language = locale.replace("_", "-").split("-", 1)[0].strip().lower()
    return language if language in CATALOGUE else DEFAULT_LOCALE


def _text(locale: str, key: str) -> str:
    # A key missing from a translation falls back to English instead of failing a send.
    return CATALOGUE[locale].get(key) or CATALOGUE[DEFAULT_LOCALE][key]


def _validity(locale: str, minutes: int) -> str:
    key = "minutes.one" if minutes == 1 else "minutes.other"
    return _text(locale, key).format(n=minutes)


def _purpose(locale: str, purpose: Purpose, channel: Channel) -> str:
    if purpose is Purpose.CONFIRM_ENROLLMENT:
        target = "email" if channel is Channel.EMAIL else "phone"
        return _text(locale, f"purpose.confirm_enrollment.{target}")
    return _text(locale, f"purpose.{purpose.value}")


def _check_channel(channel: Channel) -> None:
    if channel not in (Channel.EMAIL, Channel.SMS, Channel.VOICE):
        raise ValueError(f"no message template for channel {channel!r}")


def spoken_digits(code: str) -> str:
    """A code as text-to-speech should read it: "123456" -> "1, 2, 3, 4, 5, 6".

    Read as one number, "123456" becomes "one hundred twenty-three thousand ..."; the
    commas make the engine pause between digits.
    """
    return ", ".join(code)


def code_message(channel: Channel, *, code: str, purpose: Purpose, product: str,
                 valid_minutes: int, locale: str = "en") -> tuple[str, str]:
    """The (subject, text) that carries a one-time code.

    Args:
        channel: EMAIL, SMS or VOICE (the subject is "" except for EMAIL).
        code: The one-time code, as generated (digits).
        purpose: Why the code was sent; changes the wording slightly.
        product: The product name the user knows (in every message, so a user can tell a
            genuine code from a phishing attempt that borrows another service's code).
        valid_minutes: How long the code can be used.
        locale: BCP 47 language tag; unknown languages fall back to English.

    Raises:
        ValueError: channel NONE, an empty code or product, or valid_minutes < 1.
    """
    _check_channel(channel)
    if not code:
        raise ValueError("code is required")
    if not product:
        raise ValueError("product is required")
    if valid_minutes < 1:
        raise ValueError("valid_minutes must be at least 1")
    lang = resolve_locale(locale)
    values = {
        "product": product,
        "code": code,
        "spoken_code": spoken_digits(code),
        "purpose": _purpose(lang, purpose, channel),
        "validity": _validity(lang, valid_minutes),
    }
    text = _text(lang, f"code.{channel.value}.text").format(**values)
    subject = (_text(lang, "code.email.subject").format(**values)
               if channel is Channel.EMAIL else "")
    return subject, text


def notice_message(channel: Channel, *, kind: NoticeKind, product: str, locale: str = "en",
                   masked_detail: str = "") -> tuple[str, str]:
    """The (subject, text) of a security notice, which carries no code.

    Notices tell the user that something changed on their account, so that a change they
    did not make is noticed and reported.

    Args:
        channel: EMAIL, SMS or VOICE (the subject is "" except for EMAIL).
        kind: What changed.
        product: The product name the user knows.
        locale: BCP 47 language tag; unknown languages fall back to English.
        masked_detail: An already-masked detail, e.g. the masked phone number, shown in
            parentheses in EMAIL and SMS. VOICE leaves it out: masking characters read
            aloud are noise.

    Raises:
        ValueError: an unknown kind, channel NONE or an empty product.
    """
    _check_channel(channel)
    kind = NoticeKind(kind)  # ValueError for anything else
    if not product:
        raise ValueError("product is required")
    lang = resolve_locale(locale)
    detail = f" ({masked_detail})" if masked_detail and channel is not Channel.VOICE else ""
    sentence = _text(lang, f"notice.{kind}.sentence").format(product=product, detail=detail)
    text = _text(lang, f"notice.{channel.value}.text").format(
        product=product, sentence=sentence, closing=_text(lang, "notice.closing"))
    subject = (_text(lang, f"notice.{kind}.subject").format(product=product)
               if channel is Channel.EMAIL else "")
    return subject, text
