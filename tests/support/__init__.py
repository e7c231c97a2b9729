"""Helpers the tests share: plain modules, no fixtures (those live in the conftest.py files,
docs/TESTING.md).

- ``config``: the repository root, the test keyring and start time, settings for an
  in-process server, the PostgreSQL admin URL and migrating a database;
- ``client``: what a caller does through the generated client (enrol an app, log in, open
  a challenge, new recovery codes) and reading an AIP-193 error;
- ``rig``: the delivery rig (a server whose outbox reaches real SMTP/HTTP receivers);
- ``fakes``: those receivers (aiosmtpd, a small HTTP server) on loopback, port 0;
- ``messages``: outgoing messages with a known code, for the sender tests;
- ``certs``: a throwaway CA and the certificates it signs;
- ``softauthn``: the software WebAuthn authenticator; ``passkey``: passkeys through the
  client with it;
- ``statements``: counting the SQL statements a server sends;
- ``replica``: one of several in-process servers on one PostgreSQL database;
- ``admin``: rows as a server leaves them, for the operator commands' tests;
- ``processes``: ``mfa-service`` as a subprocess (free ports, waiting for SERVING);
- ``pgcluster``: a throwaway PostgreSQL cluster (initdb, pg_ctl);
- ``packaging``: the two distributions' pyproject metadata;
- ``docs``: the Markdown documents' relative links and the README's length;
- ``examples``: how many examples the property-based tests run (full, or a third in a
  fast-tier run).
"""
