"""What both apps are told at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    #: mfa-service's gRPC address, HOST:PORT.
    mfa_target: str
    #: Signs the shared login cookie; both apps must have the same one.
    secret: str
    #: Where the apps are, as the browser sees them (origins, no trailing slash).
    portal_url: str = "http://localhost:8080"
    backoffice_url: str = "http://localhost:8081"
