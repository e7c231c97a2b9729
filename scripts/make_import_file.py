#!/usr/bin/env python3
"""Write a synthetic `mfa-service import` file (JSON Lines) for measuring the importer.

    scripts/make_import_file.py 100000 > /tmp/factors.jsonl

Every user gets an authenticator app (one in four with SHA256, 8 digits, 60 s; the rest
SHA1/6/30 with an 80- or 160-bit secret), every second user an email address, every fifth
a Danish mobile number, until COUNT lines are written. Secrets come from `secrets`: the
file is as sensitive as a real export, so write it somewhere private and delete it after.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
from urllib.parse import quote


def lines(count: int, prefix: str) -> list[str]:
    out: list[str] = []
    user = 0
    while len(out) < count:
        user += 1
        user_id = f"{prefix}{user}"
        account = quote(f"{user_id}@example.com")
        if user % 4 == 0:
            secret = base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=")
            uri = (f"otpauth://totp/Legacy:{account}?secret={secret}&issuer=Legacy"
                   "&algorithm=SHA256&digits=8&period=60")
        else:
            secret = base64.b32encode(secrets.token_bytes(20 if user % 2 else 10)).decode()
            uri = f"otpauth://totp/Legacy:{account}?secret={secret.rstrip('=')}&issuer=Legacy"
        factors = [{"user_id": user_id, "method": "authenticator_app", "otpauth_uri": uri,
                    "confirmed_at": "2024-05-01T12:00:00Z"}]
        if user % 2 == 0:
            factors.append({"user_id": user_id, "method": "email",
                            "email": f"{user_id}@example.com"})
        if user % 5 == 0:
            factors.append({"user_id": user_id, "method": "phone",
                            "phone_number": f"+45{20_100_000 + user % 9_000_000:08d}",
                            "channel": "sms" if user % 10 else "voice"})
        out.extend(json.dumps(f, separators=(",", ":")) for f in factors)
    return out[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("count", type=int, help="lines (factors) to write")
    parser.add_argument("--prefix", default="legacy-", help="user id prefix (default legacy-)")
    args = parser.parse_args()
    sys.stdout.write("\n".join(lines(args.count, args.prefix)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
