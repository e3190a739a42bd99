"""SCRAM keys as Dovecot writes them, the credentials the user database gives SCRAM,
and the exchange itself (popbox.auth.scram) against scramp's client and Dovecot."""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramClient

from popbox.auth.base import ScramCredentials
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.auth.schemes import hash_password, scram_credentials_of, verify_password
from popbox.auth.scram import (
    ClientFirst,
    ScramFailure,
    ScramServerExchange,
    derive_credentials,
    parse_scram_key,
)
from support.auth import WritePasswd
from support.dovecot import start_dovecot

DOVEADM = shutil.which("doveadm")
needs_doveadm = pytest.mark.skipif(DOVEADM is None, reason="doveadm is not installed")

HASHES = ["SCRAM-SHA-256", "SCRAM-SHA-1"]


def doveadm_pw(scheme: str, password: str) -> str:
    assert DOVEADM is not None
    result = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def doveadm_verifies(stored: str, password: str) -> bool:
    assert DOVEADM is not None
    result = subprocess.run(
        [DOVEADM, "pw", "-t", stored, "-p", password], capture_output=True, text=True
    )
    return result.returncode == 0 and "(verified)" in result.stdout


def run_exchange(
    credentials: ScramCredentials, mechanism: str, username: str, password: str
) -> bytes | ScramFailure:
    """A whole exchange between scramp's client and popbox's server side."""
    client = ScramClient([mechanism], username, password)
    server = ScramServerExchange(mechanism, {}, plus_offered=False)
    first = server.receive_first(client.get_client_first().encode())
    assert isinstance(first, ClientFirst)
    server_first = server.server_first(credentials)
    assert isinstance(server_first, bytes)
    client.set_server_first(server_first.decode())
    final = server.receive_final(client.get_client_final().encode())
    if isinstance(final, bytes):
        client.set_server_final(final.decode())  # the server signed with the right key
    return final


# -- stored keys -------------------------------------------------------------------------


@needs_doveadm
@pytest.mark.parametrize("scheme", HASHES)
@pytest.mark.parametrize("password", ["s3cret pass", "pässwörd ünïcode"])
def test_keys_made_by_doveadm_verify_in_popbox_and_popbox_keys_in_doveadm(
    scheme: str, password: str
) -> None:
    dovecot_made = doveadm_pw(scheme, password)
    assert dovecot_made.startswith(f"{{{scheme}}}4096,")
    assert verify_password(password, dovecot_made)
    assert not verify_password(password + "x", dovecot_made)
    popbox_made = hash_password(password, scheme)
    iterations, salt, _, _ = popbox_made.split("}", 1)[1].split(",")
    assert iterations == "4096"
    assert len(base64.b64decode(salt)) == 16
    assert doveadm_verifies(popbox_made, password)
    assert not doveadm_verifies(popbox_made, password + "x")
    assert verify_password(password, popbox_made)


@needs_doveadm
@pytest.mark.parametrize("scheme", HASHES)
def test_a_doveadm_key_serves_a_scram_login(scheme: str) -> None:
    stored = doveadm_pw(scheme, "s3cret")
    credentials = scram_credentials_of(stored, scheme, username="bob", iterations=4096)
    assert isinstance(credentials, ScramCredentials)
    assert isinstance(run_exchange(credentials, scheme, "bob", "s3cret"), bytes)
    failure = run_exchange(credentials, scheme, "bob", "wrong")
    assert isinstance(failure, ScramFailure)
    assert failure.server_error == "invalid-proof"


def test_a_password_saslprep_changes_verifies_in_either_form() -> None:
    """Keys popbox writes are of the SASLprep'd password (as SCRAM clients compute);
    Dovecot's are of its bytes as typed. A USER/PASS login checks both forms."""
    typed = "pass\u00a0word\u2168"  # a no-break space and ROMAN NUMERAL NINE
    stored = hash_password(typed, "SCRAM-SHA-256")
    credentials = scram_credentials_of(stored, "SCRAM-SHA-256", username="u", iterations=4096)
    assert isinstance(credentials, ScramCredentials)
    assert isinstance(run_exchange(credentials, "SCRAM-SHA-256", "u", "pass wordIX"), bytes)
    assert verify_password(typed, stored)
    assert verify_password("pass wordIX", stored)
    assert not verify_password("pass word", stored)
    assert not verify_password("pass\u00a0word", stored)
    assert not verify_password("pass\u0007word", stored)  # SASLprep prohibits it


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("4096,c2FsdA==,AAAA,AAAA", "salt is shorter"),
        ("100,MTIzNDU2Nzg5MDEyMzQ1Ng==,AAAA,AAAA", "iteration count"),
        ("4096,MTIzNDU2Nzg5MDEyMzQ1Ng==,AAAA,AAAA", "keys must be 32 bytes"),
        ("4096,MTIzNDU2Nzg5MDEyMzQ1Ng==,AAAA", "iter,salt,StoredKey,ServerKey"),
        ("4096,!!!,AAAA,AAAA", "not base64"),
    ],
)
def test_malformed_keys_say_what_is_wrong_and_never_verify(data: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_scram_key(data, "SCRAM-SHA-256")
    assert not verify_password("anything", "{SCRAM-SHA-256}" + data)


# -- what the user database gives SCRAM ------------------------------------------------------


async def test_the_passwd_file_gives_keys_derived_keys_and_fakes(write_passwd: WritePasswd) -> None:
    bob_key = hash_password("bob pw", "SCRAM-SHA-256")
    path = write_passwd(
        f"bob:{bob_key}\n"
        "alice:{PLAIN}alice pw\n"
        f"carol:{hash_password('carol pw', 'SHA512-CRYPT')}\n"
        f"dave:{hash_password('dave pw', 'SCRAM-SHA-1')}\n"
    )
    db = PasswdFilePassDB(path)
    bob = await db.scram_credentials("bob", "SCRAM-SHA-256")
    assert bob == parse_scram_key(bob_key.split("}", 1)[1], "SCRAM-SHA-256")
    alice = await db.scram_credentials("alice", "SCRAM-SHA-256")
    assert not alice.problem
    assert alice == await db.scram_credentials("alice", "SCRAM-SHA-256")  # a stable salt
    assert isinstance(run_exchange(alice, "SCRAM-SHA-256", "alice", "alice pw"), bytes)
    carol = await db.scram_credentials("carol", "SCRAM-SHA-256")
    assert "SHA512-CRYPT hash gives no SCRAM keys" in carol.problem
    failure = run_exchange(carol, "SCRAM-SHA-256", "carol", "carol pw")
    assert isinstance(failure, ScramFailure)
    dave = await db.scram_credentials("dave", "SCRAM-SHA-256")  # a SHA-1 key only
    assert dave.problem
    assert not (await db.scram_credentials("dave", "SCRAM-SHA-1")).problem
    nobody = await db.scram_credentials("nobody", "SCRAM-SHA-256")
    assert nobody.problem == "unknown user"
    assert nobody == await db.scram_credentials("nobody", "SCRAM-SHA-256")
    assert nobody.salt != (await db.scram_credentials("nobody2", "SCRAM-SHA-256")).salt
    assert (len(nobody.salt), nobody.iterations) == (len(bob.salt), bob.iterations)


async def test_fakes_show_the_iteration_count_most_keys_have(write_passwd: WritePasswd) -> None:
    from popbox.auth.schemes import HashCost

    slow = HashCost(scram_iterations=8192)
    lines = [f"u{n}:{hash_password('pw', 'SCRAM-SHA-256', cost=slow)}" for n in range(3)]
    db = PasswdFilePassDB(write_passwd("\n".join(lines) + "\nplain:{PLAIN}pw\n"))
    assert (await db.scram_credentials("nobody", "SCRAM-SHA-256")).iterations == 8192
    assert (await db.scram_credentials("plain", "SCRAM-SHA-256")).iterations == 8192
    # USER/PASS against a file of SCRAM keys: unknown users cost a key's derivation.
    assert await db.verify("u1", "pw") is not None
    assert await db.verify("nobody", "pw") is None


@pytest.mark.parametrize(
    ("lines", "derivations"),
    [
        # Most users {PLAIN}: their keys cost a PBKDF2 at each login, so a name without
        # keys costs one as well (the first server message comes as late).
        (["alice:{PLAIN}a", "carol:{PLAIN}c", "bob:KEY"], 1),
        # Most users with stored keys: no PBKDF2 for anyone before the proof.
        (["alice:{PLAIN}a", "bob:KEY", "dave:KEY"], 0),
    ],
)
async def test_a_name_without_keys_costs_what_most_users_cost(
    write_passwd: WritePasswd,
    monkeypatch: pytest.MonkeyPatch,
    lines: list[str],
    derivations: int,
) -> None:
    import popbox.auth.checks as checks

    key = hash_password("pw", "SCRAM-SHA-256")
    db = PasswdFilePassDB(write_passwd("\n".join(lines).replace("KEY", key) + "\n"))
    calls: list[str] = []
    real = checks.derive_credentials

    def counting(*args: Any, **kwargs: Any) -> ScramCredentials:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "derive_credentials", counting)
    nobody = await db.scram_credentials("nobody", "SCRAM-SHA-256")
    assert nobody.problem == "unknown user"
    assert len(calls) == derivations


def test_saslnames_and_the_authzid_are_decoded() -> None:
    server = ScramServerExchange("SCRAM-SHA-256", {}, plus_offered=False)
    first = server.receive_first(b"n,a=sup=2Cport=3D,n=a=2Cb=3Dc,r=nonce")
    assert first == ClientFirst("a,b=c", "sup,port=")
    bad = ScramServerExchange("SCRAM-SHA-256", {}, plus_offered=False)
    failure = bad.receive_first(b"n,,n=a=2Xb,r=nonce")
    assert isinstance(failure, ScramFailure)
    assert failure.server_error == "invalid-username-encoding"


def _client_final(
    password: str, credentials: ScramCredentials, *, bare: str, server_first: str, cbind_input: str
) -> tuple[str, str]:
    """RFC 5802 section 3's client-final message (SCRAM-SHA-256) computed by hand, not
    by scramp, and the server signature it should earn."""
    nonce = server_first.split(",")[0].removeprefix("r=")
    without_proof = f"c={base64.b64encode(cbind_input.encode()).decode()},r={nonce}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), credentials.salt, credentials.iterations
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    server_signature = hmac.new(credentials.server_key, auth_message, "sha256").digest()
    return f"{without_proof},p={proof.decode()}", base64.b64encode(server_signature).decode()


@pytest.mark.parametrize(
    ("cbind_input", "accepted"),
    [("n,a=support,", True), ("n,,", False)],
    ids=["header-as-sent", "header-without-authzid"],
)
def test_the_clients_binding_covers_the_authzid_it_sent(cbind_input: str, accepted: bool) -> None:
    """RFC 5802 section 7: c= is the whole GS2 header, authzid included. scramp's
    server refuses an authzid; popbox's exchange hands it the header as sent
    (_AuthzidGs2Header). A scramp release that reads the header elsewhere fails here,
    independently of gsasl."""
    credentials = derive_credentials("bob pw", "SCRAM-SHA-256", salt=b"s" * 16, iterations=4096)
    server = ScramServerExchange("SCRAM-SHA-256", {}, plus_offered=False)
    bare = "n=bob,r=client-nonce"
    assert server.receive_first(f"n,a=support,{bare}".encode()) == ClientFirst("bob", "support")
    server_first = server.server_first(credentials)
    assert isinstance(server_first, bytes)
    final, signature = _client_final(
        "bob pw",
        credentials,
        bare=bare,
        server_first=server_first.decode(),
        cbind_input=cbind_input,
    )
    reply = server.receive_final(final.encode())
    if accepted:
        assert reply == f"v={signature}".encode()
    else:
        assert isinstance(reply, ScramFailure)
        assert reply.server_error == "channel-bindings-dont-match"


# -- Dovecot takes popbox's keys ------------------------------------------------------------


@pytest.mark.interop
async def test_dovecot_logs_in_users_whose_keys_popbox_wrote(
    tls_files: Any, shared_tmp: Path
) -> None:
    server = start_dovecot(
        shared_tmp / "dovecot",
        tls_files.cert,
        tls_files.key,
        "auth_mechanisms = plain login scram-sha-256 scram-sha-1\n",
    )
    try:
        server.add_user("bob", "bob pw", stored=hash_password("bob pw", "SCRAM-SHA-256"))
        server.add_user("dave", "dave pw", stored=hash_password("dave pw", "SCRAM-SHA-1"))
        context = ssl.create_default_context(cafile=str(tls_files.ca))
        for user, mechanism in (("bob", "SCRAM-SHA-256"), ("dave", "SCRAM-SHA-1")):
            # A password login Dovecot checks against the key...
            pop = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=context)
            pop.user(user)
            assert pop.pass_(f"{user} pw").startswith(b"+OK")
            pop.quit()
            # ... and a SCRAM login Dovecot runs on it.
            pop = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=context)
            scram = ScramClient([mechanism], user, f"{user} pw")
            first = base64.b64encode(scram.get_client_first().encode()).decode()
            reply = pop._shortcmd(f"AUTH {mechanism} {first}")  # type: ignore[attr-defined]
            scram.set_server_first(base64.b64decode(reply[2:]).decode())
            final = base64.b64encode(scram.get_client_final().encode()).decode()
            reply = pop._shortcmd(final)  # type: ignore[attr-defined]
            scram.set_server_final(base64.b64decode(reply[2:]).decode())
            assert pop._shortcmd("").startswith(b"+OK")  # type: ignore[attr-defined]
            pop.quit()
    finally:
        server.stop()
