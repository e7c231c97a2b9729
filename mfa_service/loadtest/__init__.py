"""``mfa-service loadtest``: drive a local server through the generated async stubs.

It measures the service the way its callers use it: every call goes through the generated
``TwoFactorServiceStub`` on ``grpc.aio`` channels. Read it in this order:

- ``config``     the command line, parsed into frozen dataclasses (LoadConfig, SeedConfig)
- ``histogram``  latencies in an HdrHistogram (fixed memory, 3 significant digits)
- ``recorder``   times each call; counts errors, expected errors and outcomes per RPC
- ``users``      users, their lease pools (TOTP steps, lockouts) and the users file
- ``scenarios``  what one operation of each scenario sends and expects
- ``setup``      users enrolled through the API when no users file is given
- ``runner``     connect, set up, warm up, measure; ``--baseline`` first
- ``baseline``   the bare grpc.aio server measured by ``--baseline``, in its own process
- ``report``     the JSON report, ratios to the baseline, the terminal table
- ``seed``       ``loadtest seed``: users and sessions written straight into the store
- ``command``    ``main``: parse, run, print, exit status

Traffic stays on this machine: a non-loopback ``--target`` needs ``--allow-remote``.
"""

from mfa_service.loadtest.command import main
from mfa_service.loadtest.config import LoadConfig, LoadTestError, SeedConfig
from mfa_service.loadtest.histogram import Histogram
from mfa_service.loadtest.runner import run_loadtest
from mfa_service.loadtest.seed import seed

__all__ = ["Histogram", "LoadConfig", "LoadTestError", "SeedConfig", "main", "run_loadtest",
           "seed"]
