"""The software WebAuthn authenticator lives in the package (mfa_service/loadtest/
softauthn.py) so the load generator's passkey scenario can use it; tests import it here."""

from mfa_service.loadtest.softauthn import CredentialExcluded as CredentialExcluded
from mfa_service.loadtest.softauthn import NoCredential as NoCredential
from mfa_service.loadtest.softauthn import SoftAuthenticator as SoftAuthenticator
from mfa_service.loadtest.softauthn import SoftAuthnError as SoftAuthnError
from mfa_service.loadtest.softauthn import UnsupportedAlgorithm as UnsupportedAlgorithm
from mfa_service.loadtest.softauthn import b64url as b64url
from mfa_service.loadtest.softauthn import b64url_decode as b64url_decode
