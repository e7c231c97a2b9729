"""Message templates: every channel carries the code, the validity and the warning; SMS fits
one GSM-7 segment; voice reads the digits twice; locales fall back to English."""

from __future__ import annotations

import pytest

from mfa_service.delivery.templates import (
    CATALOGUE,
    NOTICE_KINDS,
    code_message,
    notice_message,
    resolve_locale,
)
from mfa_service.domain import Channel, NoticeKind, Purpose

CHANNELS = (Channel.EMAIL, Channel.SMS, Channel.VOICE)
PRODUCT_32 = "Cloud Platform Identity Services"  # the longest product name SMS must fit
assert len(PRODUCT_32) == 32

# GSM 03.38 default alphabet (written out here, independently of the code under test) and
# its extension table, whose characters cost two septets each.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")


def gsm7_septets(text: str) -> int:
    """Septets ``text`` takes in a GSM-7 SMS; fails the test on a character outside GSM-7."""
    outside = sorted({ch for ch in text if ch not in GSM7_BASIC | GSM7_EXTENSION})
    assert not outside, f"not GSM-7: {outside!r} in {text!r}"
    return sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)


def test_gsm7_oracle_is_the_full_alphabet() -> None:
    assert len(GSM7_BASIC) == 128 - 1  # 0x1B is the escape to the extension table
    assert "\u2014" not in GSM7_BASIC | GSM7_EXTENSION


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("purpose", list(Purpose))
def test_code_message_has_product_code_validity_and_warning(
        channel: Channel, purpose: Purpose) -> None:
    subject, text = code_message(channel, code="123456", purpose=purpose,
                                 product="Cloud Platform", valid_minutes=5)

    assert "Cloud Platform" in text
    assert "5 minutes" in text
    assert "Never share" in text and "never ask" in text
    if channel is Channel.VOICE:
        assert "1, 2, 3, 4, 5, 6" in text
    else:
        assert "123456" in text
    if channel is Channel.EMAIL:
        assert subject == "Your Cloud Platform verification code"
        assert "123456" not in subject  # subjects show in notification previews and logs
    else:
        assert subject == ""


@pytest.mark.parametrize("channel", CHANNELS)
def test_purpose_changes_the_wording(channel: Channel) -> None:
    texts = {code_message(channel, code="123456", purpose=p, product="P", valid_minutes=5)[1]
             for p in Purpose}
    assert len(texts) == len(Purpose)


def test_purpose_wording_per_purpose_and_channel() -> None:
    def text(channel: Channel, purpose: Purpose) -> str:
        return code_message(channel, code="1", purpose=purpose, product="P",
                            valid_minutes=5)[1]

    assert "to sign in" in text(Channel.SMS, Purpose.LOGIN)
    assert "confirm your email address" in text(Channel.EMAIL, Purpose.CONFIRM_ENROLLMENT)
    assert "confirm your phone number" in text(Channel.SMS, Purpose.CONFIRM_ENROLLMENT)
    assert "turn off two-factor" in text(Channel.VOICE, Purpose.DISABLE)
    assert "change your phone number" in text(Channel.SMS, Purpose.CHANGE_PHONE)


def test_one_minute_is_singular() -> None:
    _, text = code_message(Channel.SMS, code="123456", purpose=Purpose.LOGIN, product="P",
                           valid_minutes=1)
    assert "1 minute." in text


def test_sms_example_wording() -> None:
    _, text = code_message(Channel.SMS, code="123456", purpose=Purpose.LOGIN,
                           product="Cloud Platform", valid_minutes=5)
    assert text == ("Cloud Platform code to sign in: 123456. Valid for 5 minutes. "
                    "Never share it - we will never ask for it.")


@pytest.mark.parametrize("locale", sorted(CATALOGUE))
@pytest.mark.parametrize("purpose", list(Purpose))
@pytest.mark.parametrize("minutes", [1, 10, 120])
def test_sms_fits_one_gsm7_segment(locale: str, purpose: Purpose, minutes: int) -> None:
    _, text = code_message(Channel.SMS, code="12345678", purpose=purpose, product=PRODUCT_32,
                           valid_minutes=minutes, locale=locale)

    assert "\u2014" not in text and "\u2013" not in text
    assert gsm7_septets(text) <= 160, (len(text), text)


@pytest.mark.parametrize("locale", sorted(CATALOGUE))
@pytest.mark.parametrize("kind", NOTICE_KINDS)
def test_sms_notices_are_gsm7(locale: str, kind: NoticeKind) -> None:
    _, text = notice_message(Channel.SMS, kind=kind, product=PRODUCT_32, locale=locale,
                             masked_detail="+45 xx xx xx 12")
    gsm7_septets(text)


@pytest.mark.parametrize("locale", sorted(CATALOGUE))
def test_voice_reads_digits_separately_and_says_the_code_twice(locale: str) -> None:
    _, text = code_message(Channel.VOICE, code="908172", purpose=Purpose.LOGIN,
                           product="Cloud Platform", valid_minutes=5, locale=locale)

    assert text.count("9, 0, 8, 1, 7, 2") == 2
    assert "908172" not in text
    if locale == "en":
        assert "I repeat: 9, 0, 8, 1, 7, 2." in text


def test_email_body_shows_the_code_on_its_own_line() -> None:
    _, text = code_message(Channel.EMAIL, code="123456", purpose=Purpose.LOGIN,
                           product="Cloud Platform", valid_minutes=10)
    assert "\n    123456\n" in text
    assert "valid for 10 minutes" in text


def test_danish_differs_from_english() -> None:
    for channel in CHANNELS:
        english = code_message(channel, code="123456", purpose=Purpose.LOGIN, product="P",
                               valid_minutes=5)
        danish = code_message(channel, code="123456", purpose=Purpose.LOGIN, product="P",
                              valid_minutes=5, locale="da")
        assert danish != english
    _, sms = code_message(Channel.SMS, code="123456", purpose=Purpose.LOGIN, product="P",
                          valid_minutes=5, locale="da")
    assert "123456" in sms and "5 minutter" in sms and "Del aldrig" in sms


@pytest.mark.parametrize("locale", ["da-DK", "da_DK", "DA"])
def test_regional_tags_resolve_to_the_language(locale: str) -> None:
    assert resolve_locale(locale) == "da"


@pytest.mark.parametrize("locale", ["fr", "xx-YY", "", "en-GB"])
def test_unknown_locale_falls_back_to_english(locale: str) -> None:
    for channel in CHANNELS:
        assert code_message(channel, code="123456", purpose=Purpose.DISABLE, product="P",
                            valid_minutes=5, locale=locale) == code_message(
            channel, code="123456", purpose=Purpose.DISABLE, product="P", valid_minutes=5)
    added = NoticeKind.FACTOR_ADDED
    assert notice_message(Channel.EMAIL, kind=added, product="P",
                          locale=locale) == notice_message(Channel.EMAIL, kind=added, product="P")


def test_every_locale_translates_every_key() -> None:
    for locale, strings in CATALOGUE.items():
        assert set(strings) == set(CATALOGUE["en"]), locale


@pytest.mark.parametrize("locale", sorted(CATALOGUE))
@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("kind", NOTICE_KINDS)
def test_every_notice_kind_renders(locale: str, channel: Channel, kind: NoticeKind) -> None:
    subject, text = notice_message(channel, kind=kind, product="Cloud Platform",
                                   locale=locale, masked_detail="+45 xx xx xx 12")

    assert "Cloud Platform" in text
    assert "{" not in text and "}" not in text
    closing = ("If this wasn't you, contact support immediately." if locale == "en"
               else "Hvis det ikke var dig, så kontakt support med det samme.")
    assert closing in text
    if channel is Channel.EMAIL:
        assert "Cloud Platform" in subject and "\n" not in subject
    else:
        assert subject == ""
    # Voice leaves the masked detail out: masking characters read aloud are noise.
    assert ("(+45 xx xx xx 12)" in text) == (channel is not Channel.VOICE)


def test_notice_kinds_say_different_things() -> None:
    texts = {notice_message(Channel.SMS, kind=k, product="P")[1] for k in NOTICE_KINDS}
    assert len(texts) == len(NOTICE_KINDS)


def test_notice_without_detail_has_no_empty_parentheses() -> None:
    _, text = notice_message(Channel.EMAIL, kind=NoticeKind.FACTOR_REMOVED, product="P")
    assert text.startswith("A two-factor method was removed from your P account.")
    assert "()" not in text


def test_unknown_notice_kind_raises() -> None:
    with pytest.raises(ValueError, match="is not a valid NoticeKind"):
        notice_message(Channel.EMAIL, kind="password_changed", product="P")  # type: ignore[arg-type]


def test_code_message_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="code is required"):
        code_message(Channel.SMS, code="", purpose=Purpose.LOGIN, product="P", valid_minutes=5)
    with pytest.raises(ValueError, match="product is required"):
        code_message(Channel.SMS, code="1", purpose=Purpose.LOGIN, product="", valid_minutes=5)
    with pytest.raises(ValueError, match="valid_minutes"):
        code_message(Channel.SMS, code="1", purpose=Purpose.LOGIN, product="P", valid_minutes=0)


def test_channel_none_has_no_template() -> None:
    with pytest.raises(ValueError, match="channel"):
        code_message(Channel.NONE, code="1", purpose=Purpose.LOGIN, product="P",
                     valid_minutes=5)
    with pytest.raises(ValueError, match="channel"):
        notice_message(Channel.NONE, kind=NoticeKind.FACTOR_ADDED, product="P")


def test_product_with_braces_is_not_a_format_string() -> None:
    _, text = code_message(Channel.SMS, code="123456", purpose=Purpose.LOGIN,
                           product="{code}", valid_minutes=5)
    assert text.startswith("{code} code to sign in: 123456.")
