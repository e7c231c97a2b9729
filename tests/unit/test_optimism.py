"""The hints that choose which calls try without the user's lock (service/optimism.py):
kept per process and bounded, so a busy process never grows them without end."""

from __future__ import annotations

from mfa_service.service.optimism import Hints


def test_a_login_challenge_on_a_quiet_method_lets_its_verify_try() -> None:
    hints = Hints()
    hints.opened("c1", "f1", login=True, quiet=True, sends_code=False)
    hints.opened("c2", "f2", login=False, quiet=True, sends_code=False)  # a confirmation
    hints.opened("c3", "f3", login=True, quiet=False, sends_code=False)  # recovery codes
    assert hints.verify_may_try("c1")
    assert not hints.verify_may_try("c2")
    assert not hints.verify_may_try("c3")
    assert not hints.verify_may_try("never-seen")


def test_a_factor_that_sends_codes_is_challenged_under_the_lock() -> None:
    hints = Hints()
    assert hints.challenge_may_try("f1")  # unknown: try
    hints.opened("c1", "f1", login=True, quiet=True, sends_code=True)
    assert not hints.challenge_may_try("f1")
    hints.needed_lock("f2")
    assert not hints.challenge_may_try("f2")


def test_the_oldest_hint_is_forgotten_first_and_a_used_one_is_kept() -> None:
    hints = Hints(size=3)
    for n in range(3):
        hints.opened(f"c{n}", f"f{n}", login=True, quiet=True, sends_code=True)
    hints.needed_lock("f0")  # seen again: now the newest
    hints.opened("c3", "f3", login=True, quiet=True, sends_code=True)
    assert [hints.verify_may_try(f"c{n}") for n in range(4)] == [False, True, True, True]
    assert [hints.challenge_may_try(f"f{n}") for n in range(4)] == [False, True, False, False]
