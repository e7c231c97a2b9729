"""The generated stubs are importable as documented and name every RPC of the contract.
(Fresh against scripts/gen_protos.py, buf lint and the wheels: tests/system/test_generated.py.)"""

from __future__ import annotations


def test_generated_stubs_are_importable_as_documented() -> None:
    from mfa.v1 import two_factor_service_pb2, two_factor_service_pb2_grpc

    service = two_factor_service_pb2.DESCRIPTOR.services_by_name["TwoFactorService"]
    assert [m.name for m in service.methods] == [
        "Enroll", "Challenge", "Verify", "Disable", "CheckSession", "ListFactors",
        "RevokeSession", "RegenerateRecoveryCodes", "ListAuditEvents", "RecognizeDevice",
        "ListDevices", "ForgetDevice"]
    assert hasattr(two_factor_service_pb2_grpc, "TwoFactorServiceStub")
