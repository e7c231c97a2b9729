"""What a 2FA session is worth to a caller's own policy (CheckSession): how it was
established, as RFC 8176 method references; whether it resists phishing; whether a
remembered browser opened it; whether it meets NIST SP 800-63B AAL2.

Pure, from the session row alone (its method, channel and device), so CheckSession's one
read and its cache answer it without a join.

- amr (RFC 8176): the authenticator app "otp"; a phone "sms" or "tel" by the channel the
  code went by (a session from before the channel was recorded names none); a passkey
  "swk" - proof of possession of a key, the weakest claim true of every passkey (a synced
  one lives in software; "hwk" would need the attestation this service does not check);
  an email code "email" and a recovery code "recovery_code" (RFC 8176 has a value for
  neither); then "mfa": a session exists only after the caller's password step and this
  factor. A trusted-device session performed no method: empty.
- phishing_resistant: a passkey only (WebAuthn binds the assertion to the origin; a code
  can be typed into a look-alike page).
- aal2: SP 800-63B's AAL2 needs two factors; the password and this one are, except an
  email code (SP 800-63B-4: email SHALL NOT be used for out-of-band authentication;
  MFA_EMAIL_COUNTS_FOR_AAL2 lets an operator decide otherwise) and a trusted-device
  session (no authenticator was used: the browser's token is a bearer secret, not an
  authentication). Phone codes count (a restricted authenticator in SP 800-63B, allowed
  at AAL2), as do recovery codes (look-up secrets).
"""

from __future__ import annotations

from dataclasses import dataclass

from mfa_service.domain import Channel, Method, Session

MFA = "mfa"
_BY_METHOD: dict[Method, str] = {
    Method.AUTHENTICATOR_APP: "otp",
    Method.PASSKEY: "swk",
    Method.EMAIL: "email",
    Method.RECOVERY_CODE: "recovery_code",
}
_BY_PHONE_CHANNEL: dict[Channel, str] = {Channel.SMS: "sms", Channel.VOICE: "tel"}


@dataclass(frozen=True)
class SessionAssurance:
    amr: tuple[str, ...]
    phishing_resistant: bool
    trusted_device: bool
    aal2: bool


@dataclass(frozen=True)
class Assurance:
    """The rules above; ``email_counts_for_aal2`` is MFA_EMAIL_COUNTS_FOR_AAL2."""

    email_counts_for_aal2: bool = False

    def of(self, session: Session) -> SessionAssurance:
        if session.device_id is not None:
            return SessionAssurance(amr=(), phishing_resistant=False, trusted_device=True,
                                    aal2=False)
        if session.method is Method.PHONE:
            method = _BY_PHONE_CHANNEL.get(session.channel) if session.channel else None
        else:
            method = _BY_METHOD[session.method]
        return SessionAssurance(
            amr=(method, MFA) if method else (MFA,),
            phishing_resistant=session.method is Method.PASSKEY,
            trusted_device=False,
            aal2=session.method is not Method.EMAIL or self.email_counts_for_aal2)
