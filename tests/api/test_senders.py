"""Sender adapters against real servers on loopback: aiosmtpd for SMTP (plain, implicit TLS,
STARTTLS with AUTH) and a minimal asyncio HTTP/1.1 server for the webhook and Twilio shapes.

Every server listens on port 0; nothing sleeps. The failure tests check the retryable
classification and that no error message carries the code.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mfa_service.delivery.messages import DeliveryError
from mfa_service.delivery.senders import (
    Sender,
    SmtpSender,
    TlsMode,
    TwilioSender,
    WebhookSender,
)
from mfa_service.domain import Channel
from tests.support.fakes import (
    HttpServer,
    RecordingHandler,
    http_server_running,
    smtp_server,
)
from tests.support.messages import CODE, SENDER, email_message, phone_message


@contextmanager
def unused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not
    listening, so a connect gets RST."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def assert_no_code(err: DeliveryError) -> None:
    assert CODE not in str(err) and CODE not in repr(err)


# -- TLS material ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsPair:
    server: ssl.SSLContext
    client: ssl.SSLContext  # trusts exactly the test certificate


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> TlsPair:
    """A self-signed certificate for 127.0.0.1 and localhost, made fresh for the session."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(Path(directory / "cert.pem"), Path(directory / "key.pem"))
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return TlsPair(server=server, client=client)


def good_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
               auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"mailer"
          and auth_data.password == b"s3cret")
    return AuthResult(success=ok, handled=False)


def smtp_sender(port: int, tls: TlsMode = "none", *, tls_context: ssl.SSLContext | None = None,
                username: str | None = None, password: str | None = None,
                timeout: float = 5.0) -> SmtpSender:
    return SmtpSender("127.0.0.1", port, tls, username, password, SENDER, timeout=timeout,
                      tls_context=tls_context)


async def test_smtp_plain_delivers_headers_and_body() -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port:
        await smtp_sender(port).send(email_message(subject="Your Cloud Platform code"))

    envelope = handler.received[0]
    assert envelope.mail_from == "no-reply@example.test"
    assert envelope.rcpt_tos == ["alice@example.test"]
    msg = handler.only_message()
    assert msg["From"] == SENDER
    assert msg["To"] == "alice@example.test"
    assert msg["Subject"] == "Your Cloud Platform code"
    assert msg["Message-ID"] == "<msg-0001@example.test>"
    assert msg["Date"] is not None
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content().strip() == f"Your code is {CODE}. Ærlig talt."


async def test_smtp_message_id_with_unsafe_characters_is_hashed() -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port:
        await smtp_sender(port).send(email_message(message_id="a b<c>@d"))
    message_id = handler.only_message()["Message-ID"]
    assert message_id.startswith("<") and message_id.endswith("@example.test>")
    assert " " not in message_id and message_id.count("@") == 1


async def test_smtp_implicit_tls(tls_pair: TlsPair) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, ssl_context=tls_pair.server) as port:
        await smtp_sender(port, "tls", tls_context=tls_pair.client).send(email_message())
    assert CODE in handler.only_message().get_content()


async def test_smtp_starttls_with_auth(tls_pair: TlsPair) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, tls_context=tls_pair.server, require_starttls=True,
                     authenticator=good_login, auth_required=True) as port:
        await smtp_sender(port, "starttls", tls_context=tls_pair.client,
                          username="mailer", password="s3cret").send(email_message())
    assert CODE in handler.only_message().get_content()


async def test_smtp_bad_credentials_are_retryable(tls_pair: TlsPair) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, tls_context=tls_pair.server, require_starttls=True,
                     authenticator=good_login, auth_required=True) as port:
        sender = smtp_sender(port, "starttls", tls_context=tls_pair.client,
                             username="mailer", password="wrong")
        with pytest.raises(DeliveryError) as caught:
            await sender.send(email_message())
    assert caught.value.retryable  # the operator fixes the password; keep the message
    assert "authentication failed" in str(caught.value) and "535" in str(caught.value)
    assert not handler.received


async def test_smtp_untrusted_certificate_is_retryable(tls_pair: TlsPair) -> None:
    handler = RecordingHandler()
    # The default context trusts the system CAs, not the test certificate.
    with (smtp_server(handler, ssl_context=tls_pair.server) as port,
          pytest.raises(DeliveryError) as caught):
        await smtp_sender(port, "tls").send(email_message())
    assert caught.value.retryable
    assert not handler.received


async def test_smtp_starttls_required_but_not_offered_is_retryable(tls_pair: TlsPair) -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port, pytest.raises(DeliveryError) as caught:
        await smtp_sender(port, "starttls", tls_context=tls_pair.client).send(
            email_message())
    assert caught.value.retryable
    assert not handler.received  # never fall back to plain text


async def test_smtp_closed_port_is_retryable() -> None:
    with unused_port() as port, pytest.raises(DeliveryError) as caught:
        await smtp_sender(port).send(email_message())
    assert caught.value.retryable
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert_no_code(caught.value)


async def test_smtp_silent_server_times_out_retryably() -> None:
    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(DeliveryError) as caught:
            await smtp_sender(port, timeout=0.2).send(email_message())
    assert caught.value.retryable
    assert "timed out" in str(caught.value)


@pytest.mark.parametrize(("where", "reply", "retryable"), [
    ("rcpt", "550 5.1.1 no such user", False),
    ("rcpt", "451 4.3.0 try later", True),
    ("rcpt", "452 mailbox full", True),
    ("data", "554 5.7.1 message rejected", False),
    ("data", "451 try later", True),
])
async def test_smtp_reply_classes(where: str, reply: str, retryable: bool) -> None:
    handler = RecordingHandler()
    if where == "rcpt":
        handler.rcpt_reply = reply
    else:
        handler.data_reply = reply
    with smtp_server(handler) as port, pytest.raises(DeliveryError) as caught:
        await smtp_sender(port).send(email_message())

    err = caught.value
    assert err.retryable is retryable
    code = reply.split()[0]
    assert f"reply {code}" in str(err)
    if reply.split()[1][0].isdigit():
        assert f"({reply.split()[1]})" in str(err)  # the RFC 3463 enhanced status
    assert_no_code(err)


@pytest.mark.parametrize("to", [
    "alice@example.test, mallory@evil.test",
    "Alice <alice@example.test>",
    "alice@example.test\r\nBcc: mallory@evil.test",
    "no-at-sign",
])
async def test_smtp_refuses_anything_but_one_plain_address(to: str) -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port, pytest.raises(DeliveryError) as caught:
        await smtp_sender(port).send(email_message(to=to))
    assert not caught.value.retryable
    assert not handler.received


async def test_smtp_header_injection_in_subject_is_refused() -> None:
    # The port refuses connections: the sender must give up before connecting.
    with unused_port() as port, pytest.raises(DeliveryError) as caught:
        await smtp_sender(port).send(email_message(subject="Hi\r\nBcc: x@evil.test"))
    assert not caught.value.retryable


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    async with http_server_running() as state:
        yield state


def basic_auth(header: str) -> str:
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(value).decode()


async def test_webhook_posts_json_with_idempotency_key(http_server: HttpServer) -> None:
    sender = WebhookSender(http_server.url("/v1/messages"),
                           headers={"Authorization": "Bearer gateway-token"})
    try:
        await sender.send(phone_message(Channel.SMS, message_id="m-42"))
        await sender.send(phone_message(Channel.VOICE, message_id="m-43"))
    finally:
        await sender.aclose()

    sms, voice = http_server.requests
    assert (sms.method, sms.path) == ("POST", "/v1/messages")
    assert sms.headers["content-type"] == "application/json"
    assert sms.headers["idempotency-key"] == "m-42"
    assert sms.headers["authorization"] == "Bearer gateway-token"
    assert json.loads(sms.body) == {"to": "+4520123456", "channel": "sms",
                                    "text": f"Code: {CODE}", "message_id": "m-42"}
    assert json.loads(voice.body)["channel"] == "voice"
    assert voice.headers["idempotency-key"] == "m-43"


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_webhook_accepts_any_2xx(http_server: HttpServer, status: int) -> None:
    """A gateway that queues the message answers 202 (or 201, or 204 with no body): sent,
    no error, and exactly one request (a success is never retried)."""
    http_server.status = status
    http_server.body = b"" if status == 204 else b"{}"
    sender = WebhookSender(http_server.url())
    try:
        await sender.send(phone_message(message_id="m-2xx"))  # raises on failure
    finally:
        await sender.aclose()
    (request,) = http_server.requests
    assert request.headers["idempotency-key"] == "m-2xx"


@pytest.mark.parametrize("status", [301, 302, 304])
async def test_webhook_does_not_take_a_redirect_for_success(
        http_server: HttpServer, status: int) -> None:
    """Just outside 2xx: a redirect is not a delivery (httpx does not follow it), and
    resending will not change it."""
    http_server.status = status
    http_server.body = b""
    sender = WebhookSender(http_server.url())
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(phone_message())
    finally:
        await sender.aclose()
    assert caught.value.retryable is False and f"HTTP {status}" in str(caught.value)
    assert len(http_server.requests) == 1


@pytest.mark.parametrize(("status", "retryable"), [
    (500, True), (502, True), (503, True), (408, True), (425, True), (429, True),
    (400, False), (401, False), (403, False), (404, False), (422, False),
])
async def test_http_status_classification(http_server: HttpServer, status: int,
                                          retryable: bool) -> None:
    http_server.status = status
    http_server.body = json.dumps({"code": 21211, "message": "The 'To' number +4520123456 "
                                   f"cannot receive {CODE}"}).encode()
    async with httpx.AsyncClient() as client:
        senders: list[Sender] = [
            WebhookSender(http_server.url(), client=client),
            TwilioSender(http_server.url(""), "AC123", "token", "+4570000000", client=client),
        ]
        for sender in senders:
            with pytest.raises(DeliveryError) as caught:
                await sender.send(phone_message())
            err = caught.value
            assert err.retryable is retryable
            assert f"HTTP {status}" in str(err)
            assert_no_code(err)
            assert "+4520123456" not in str(err)  # the provider's free text is left out
    assert len(http_server.requests) == 2


async def test_twilio_error_code_is_reported(http_server: HttpServer) -> None:
    http_server.status = 400
    http_server.body = b'{"code": 21211, "message": "invalid To", "status": 400}'
    async with httpx.AsyncClient() as client:
        sender = TwilioSender(http_server.url(""), "AC123", "token", "+4570000000",
                              client=client)
        with pytest.raises(DeliveryError, match="Twilio error 21211") as caught:
            await sender.send(phone_message())
    assert not caught.value.retryable


async def test_429_retry_after_is_passed_on(http_server: HttpServer) -> None:
    http_server.status = 429
    http_server.headers = {"Retry-After": "7"}
    sender = WebhookSender(http_server.url())
    try:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(phone_message())
    finally:
        await sender.aclose()
    assert caught.value.retryable and caught.value.retry_after_seconds == 7.0


async def test_twilio_sms_shape(http_server: HttpServer) -> None:
    http_server.status = 201
    http_server.body = b'{"sid": "SM0123456789abcdef", "status": "queued"}'
    sender = TwilioSender(http_server.url("/"), "AC123", "tok/en", "+4570000000")
    try:
        await sender.send(phone_message(Channel.SMS, message_id="m-7"))
    finally:
        await sender.aclose()

    (request,) = http_server.requests
    assert (request.method, request.path) == ("POST", "/2010-04-01/Accounts/AC123/Messages.json")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert basic_auth(request.headers["authorization"]) == "AC123:tok/en"
    assert request.headers["i-twilio-idempotency-token"] == "m-7"
    assert request.form() == {"To": "+4520123456", "From": "+4570000000",
                              "Body": f"Code: {CODE}"}


async def test_twilio_voice_says_escaped_text(http_server: HttpServer) -> None:
    http_server.status = 201
    http_server.body = b'{"sid": "CA0123456789abcdef"}'
    text = "Your code is: 4, 9, 3, 8, 1, 7. I repeat: 4, 9, 3, 8, 1, 7. <Hangup/> & bye"
    sender = TwilioSender(http_server.url(""), "AC123", "token", "+4570000000")
    try:
        await sender.send(phone_message(Channel.VOICE, text=text, message_id="m-8"))
    finally:
        await sender.aclose()

    (request,) = http_server.requests
    assert request.path == "/2010-04-01/Accounts/AC123/Calls.json"
    assert basic_auth(request.headers["authorization"]) == "AC123:token"
    assert request.headers["i-twilio-idempotency-token"] == "m-8"
    form = request.form()
    assert form["To"] == "+4520123456" and form["From"] == "+4570000000"
    assert "Body" not in form
    assert "&lt;Hangup/&gt; &amp; bye" in form["Twiml"]
    root = ET.fromstring(form["Twiml"])
    assert root.tag == "Response"
    (say,) = list(root)
    assert say.tag == "Say" and len(say) == 0  # the text did not become an element
    assert say.text == text
    assert say.text.count("4, 9, 3, 8, 1, 7") == 2


@pytest.mark.parametrize("channel", [Channel.SMS, Channel.VOICE])
async def test_http_server_not_listening_is_retryable(channel: Channel) -> None:
    with unused_port() as port:
        url = f"http://127.0.0.1:{port}"
        senders: list[Sender] = [WebhookSender(url + "/send"),
                                 TwilioSender(url, "AC123", "token", "+4570000000")]
        for sender in senders:
            try:
                with pytest.raises(DeliveryError) as caught:
                    await sender.send(phone_message(channel))
            finally:
                await sender.aclose()
            assert caught.value.retryable
            assert_no_code(caught.value)


async def test_http_timeout_is_retryable() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        sender = WebhookSender(f"http://127.0.0.1:{port}/send", timeout=0.2)
        try:
            with pytest.raises(DeliveryError, match="timed out") as caught:
                await sender.send(phone_message())
        finally:
            await sender.aclose()
    assert caught.value.retryable


async def test_a_passed_in_client_is_left_open(http_server: HttpServer) -> None:
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(http_server.url(), client=client)
        await sender.aclose()
        assert not client.is_closed
        await sender.send(phone_message())
    assert len(http_server.requests) == 1


async def test_an_owned_client_is_closed(http_server: HttpServer) -> None:
    sender = TwilioSender(http_server.url(""), "AC123", "token", "+4570000000")
    await sender.aclose()
    with pytest.raises(RuntimeError):
        await sender.send(phone_message())
    assert not http_server.requests


# -- logging ---------------------------------------------------------------------------------


async def test_real_senders_never_log_the_code(caplog: pytest.LogCaptureFixture,
                                               http_server: HttpServer) -> None:
    handler = RecordingHandler()
    http_server.status = 201
    http_server.body = b'{"sid": "SM1"}'
    with caplog.at_level(logging.DEBUG), smtp_server(handler) as port:
        await smtp_sender(port).send(email_message())
        async with httpx.AsyncClient() as client:
            await WebhookSender(http_server.url(), client=client).send(phone_message())
            await TwilioSender(http_server.url(""), "AC123", "token", "+4570000000",
                               client=client).send(phone_message(Channel.VOICE))
    assert handler.received and len(http_server.requests) == 2
    ours = [r for r in caplog.records if r.name.startswith("mfa_service")]
    assert ours  # the senders do log something (ids and statuses)
    for record in ours:
        assert CODE not in record.getMessage()
        assert all(CODE not in str(value) for value in vars(record).values())


