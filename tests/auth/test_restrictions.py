"""Dovecot's login-restricting extra fields, read for one login (auth.restrictions)."""

from __future__ import annotations

import pytest

from popbox.auth.restrictions import MAX_REASON, RefusalKind, login_refusal


@pytest.mark.parametrize(
    ("nets", "ip", "allowed"),
    [
        ("127.0.0.0/8", "127.0.0.1", True),
        ("10.0.0.0/8", "127.0.0.1", False),
        ("10.0.0.0/8,192.168.1.7", "192.168.1.7", True),
        ("10.0.0.0/8, 192.168.1.7", "192.168.1.8", False),
        ("::1", "::1", True),
        ("2001:db8::/32", "2001:db8::5", True),
        ("10.1.2.3", "::ffff:10.1.2.3", True),  # IPv4-mapped, compared as IPv4
        ("fe80::/10", "fe80::1%eth0", True),  # a scope id is not part of the address
        ("local", "127.0.0.1", False),
        ("local", "unknown", True),  # no IP address at all: a unix socket
        ("10.0.0.0/8", "unknown", False),
        ("not-a-net", "127.0.0.1", False),  # unreadable: fail closed
        ("", "127.0.0.1", False),
    ],
)
def test_allow_nets(nets: str, ip: str, allowed: bool) -> None:
    refusal = login_refusal({"allow_nets": nets}, ip=ip, real_ip=ip)
    if allowed:
        assert refusal is None
    else:
        assert refusal is not None
        assert (refusal.kind, refusal.field) == (RefusalKind.AS_WRONG_PASSWORD, "allow_nets")


def test_allow_real_nets_checks_the_connection_peer() -> None:
    extra = {"allow_real_nets": "10.0.0.0/8"}
    assert login_refusal(extra, ip="203.0.113.9", real_ip="10.0.0.2") is None
    refusal = login_refusal(extra, ip="10.0.0.2", real_ip="203.0.113.9")
    assert refusal is not None
    assert refusal.field == "allow_real_nets"
    # A peer the broker was not told of (behind PROXY): refused, not guessed.
    assert login_refusal(extra, ip="10.0.0.2", real_ip=None) is not None


def test_nologin_with_and_without_a_reason() -> None:
    refusal = login_refusal({"nologin": "", "reason": "Moved.\r\nSTAT"}, ip="::1", real_ip="::1")
    assert refusal is not None
    assert (refusal.kind, refusal.reason) == (RefusalKind.NOLOGIN, "Moved.STAT")
    long = login_refusal({"nologin": "y", "reason": "x" * 1000}, ip="::1", real_ip="::1")
    assert long is not None
    assert len(long.reason) == MAX_REASON
    bare = login_refusal({"nologin": ""}, ip="::1", real_ip="::1")
    assert bare is not None
    assert bare.reason == ""


@pytest.mark.parametrize("field", ["proxy", "proxy_maybe", "host"])
def test_proxy_and_referral_fields_are_not_served(field: str) -> None:
    refusal = login_refusal({field: "y", "nologin": ""}, ip="::1", real_ip="::1")
    assert refusal is not None
    assert (refusal.kind, refusal.field) == (RefusalKind.NOT_SERVED, field)
    assert field in refusal.detail


def test_a_network_refusal_comes_before_the_others() -> None:
    # From outside allow_nets, nologin's reason stays unsaid: it is a wrong password.
    extra = {"allow_nets": "10.0.0.0/8", "nologin": "", "reason": "secret plans"}
    refusal = login_refusal(extra, ip="127.0.0.1", real_ip="127.0.0.1")
    assert refusal is not None
    assert refusal.kind is RefusalKind.AS_WRONG_PASSWORD


def test_no_fields_no_refusal() -> None:
    assert login_refusal({"popbox_keep_days": "3"}, ip="127.0.0.1", real_ip="127.0.0.1") is None
