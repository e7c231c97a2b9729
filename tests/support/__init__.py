"""Helpers the tests share (no fixtures: those live in the conftest.py files).

- ``config``: the repository root, the test keyring, settings for an in-process server,
  the PostgreSQL admin URL and migrating a database;
- ``client``: what a caller does through the generated client (enrol an app, log in, open
  a challenge, new recovery codes) and reading an AIP-193 error;
- ``rig``: the delivery rig (a server whose outbox reaches real SMTP/HTTP receivers);
- ``fakes``: those receivers (aiosmtpd, a small HTTP server) on loopback, port 0;
- ``certs``: a throwaway CA and the certificates it signs;
- ``softauthn``: the software WebAuthn authenticator;
- ``passkey``: enrolling and challenging a passkey through the client;
- ``statements``: counting the SQL statements a block of code sends;
- ``replica``: one of several in-process servers on one PostgreSQL database;
- ``processes``: ``mfa-service`` as a subprocess (free ports, waiting for SERVING);
- ``pgcluster``: a throwaway PostgreSQL cluster (initdb, pg_ctl);
- ``docs``: checking the Markdown documents' relative links.
"""
