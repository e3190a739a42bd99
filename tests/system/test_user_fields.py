"""The passwd file's fields, app passwords and APOP secrets, against a real `popbox serve`.

Each test runs the server as a subprocess and talks to it over real sockets from
127.0.0.1 with stdlib poplib, curl and smtplib (LMTP), and edits users with the
`popbox user` commands while it runs, as an operator would.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
from pathlib import Path

import pytest

from support.serverproc import PASSWORD, POPBOX, ServerProcess, make_server, running

# Refusals are the point here: no per-address penalty between the tries.
NO_PENALTY = "auth_penalty_max = 0\n"


def write_passwd(server: ServerProcess, lines: list[str]) -> None:
    passwd = server.directory / "passwd"
    passwd.write_text("".join(line + "\n" for line in lines))
    passwd.chmod(0o600)


def popbox(server: ServerProcess, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [*POPBOX, *args, "--config", str(server.config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def login_reply(server: ServerProcess, user: str, password: str) -> str:
    """The server's answer to USER/PASS: '+OK ...' or the -ERR line."""
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    try:
        client.user(user)
        return client.pass_(password).decode()
    except poplib.error_proto as exc:
        return str(exc.args[0], "ascii", "replace") if isinstance(exc.args[0], bytes) else str(exc)
    finally:
        client.close()


def test_allow_nets_nologin_and_proxy_fields(tmp_path: Path) -> None:
    server = make_server(tmp_path / "srv", limits=NO_PENALTY)
    write_passwd(
        server,
        [
            f"near:{{PLAIN}}{PASSWORD}::::::allow_nets=127.0.0.0/8,::1",
            f"far:{{PLAIN}}{PASSWORD}::::::allow_nets=10.0.0.0/8",
            f"gone:{{PLAIN}}{PASSWORD}::::::nologin reason=Moved to pop.example.net, see you there",
            f"proxied:{{PLAIN}}{PASSWORD}::::::proxy host=10.1.1.1",
            "open:::::::nopassword allow_nets=127.0.0.1",
            "wideopen:::::::nopassword",
        ],
    )
    with running(server):
        assert login_reply(server, "near", PASSWORD).startswith("+OK")
        # From outside allow_nets: exactly what a wrong password gets.
        refused = login_reply(server, "far", PASSWORD)
        assert refused == login_reply(server, "far", "wrong") == login_reply(server, "x", "y")
        assert refused == "-ERR [AUTH] Authentication failed."
        # nologin: refused after the right password, with the reason (Dovecot's form).
        assert login_reply(server, "gone", PASSWORD) == (
            "-ERR [AUTH] Moved to pop.example.net, see you there"
        )
        assert login_reply(server, "gone", "wrong") == "-ERR [AUTH] Authentication failed."
        assert login_reply(server, "proxied", PASSWORD).startswith("-ERR [SYS/PERM]")
        # nopassword: any password, but only from allow_nets; never on its own.
        assert login_reply(server, "open", "anything at all").startswith("+OK")
        assert login_reply(server, "wideopen", "anything").startswith("-ERR [AUTH]")
        # curl, another client, through the same door.
        curl = subprocess.run(
            ["curl", "-sS", "-u", f"near:{PASSWORD}", f"pop3://127.0.0.1:{server.pop3_port}/"],
            capture_output=True,
            timeout=30,
        )
        assert curl.returncode == 0, curl.stderr
        curl = subprocess.run(
            ["curl", "-sS", "-u", f"far:{PASSWORD}", f"pop3://127.0.0.1:{server.pop3_port}/"],
            capture_output=True,
            timeout=30,
        )
        assert curl.returncode != 0
    log = server.log_text()
    assert re.search(r"login=far refused by the allow_nets field: 127\.0\.0\.1 is not in", log)
    assert "login=gone refused by the nologin field" in log
    assert "login=proxied refused by the proxy field" in log
    assert "user wideopen cannot log in: nopassword without allow_nets" in log
    check = subprocess.run(
        [*POPBOX, "check-config", "--config", str(server.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "warning: user proxied: proxy is set" in check.stderr
    assert "warning: user proxied: host is set" in check.stderr
    assert "warning: user wideopen: nopassword without allow_nets" in check.stderr


def test_app_password_add_login_revoke_without_restart(tmp_path: Path) -> None:
    server = make_server(tmp_path / "srv", limits=NO_PENALTY)
    with running(server):
        shown = popbox(server, "user", "app-password", "add", "alice", "phone")
        password = shown.strip().splitlines()[-1]
        assert re.fullmatch(r"([a-z2-7]{4}-){7}[a-z2-7]{4}", password)
        popbox(server, "user", "app-password", "add", "alice", "laptop")
        assert "phone" in popbox(server, "user", "app-password", "list", "alice")
        assert login_reply(server, "alice", password).startswith("+OK")
        assert login_reply(server, "alice", PASSWORD).startswith("+OK")  # still hers
        assert login_reply(server, "bob", password).startswith("-ERR [AUTH]")
        popbox(server, "user", "app-password", "revoke", "alice", "phone")
        assert login_reply(server, "alice", password) == "-ERR [AUTH] Authentication failed."
        assert "phone" not in popbox(server, "user", "app-password", "list", "alice")
    assert "login=alice with app password phone" in server.log_text()
    side = server.directory / "passwd.app-passwords"
    assert side.stat().st_mode & 0o777 == 0o600
    assert password.replace("-", "") not in side.read_text()


def test_apop_uses_its_own_secret(tmp_path: Path) -> None:
    server = make_server(tmp_path / "srv", limits=NO_PENALTY)
    server.config.write_text(
        server.config.read_text().replace(
            'plaintext_auth = "always"\n', 'plaintext_auth = "always"\napop = true\n'
        )
    )
    with running(server):
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            client.apop("alice", PASSWORD)  # no APOP secret yet; the password is none
        client.close()
        secret = popbox(server, "user", "apop-secret", "alice").strip().splitlines()[-1]
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            client.apop("alice", PASSWORD)
        client.close()
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        assert client.apop("alice", secret).startswith(b"+OK")
        client.quit()


def test_mail_location_lmtp_in_pop3_out(tmp_path: Path) -> None:
    vmail = tmp_path / "vmail"
    server = make_server(
        tmp_path / "srv",
        limits=NO_PENALTY,
        extra=f'[storage]\nmail_location = "maildir:{vmail}/%d/%n/Maildir"\n',
    )
    write_passwd(
        server,
        [
            f"alice@example.org:{{PLAIN}}{PASSWORD}::::::",
            f"bob:{{PLAIN}}{PASSWORD}::::{tmp_path}/home/bob::mail=maildir:~/Maildir",
        ],
    )
    with running(server):
        # One recipient per transaction: smtplib reads one reply to DATA, LMTP sends one
        # per recipient.
        for recipient in ("alice@example.org", "bob@example.org"):
            with smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=10) as lmtp:
                lmtp.ehlo("test")
                lmtp.mail("sender@example.net")
                assert lmtp.rcpt(recipient)[0] == 250
                assert lmtp.data(b"Subject: where\r\n\r\nin the tree\r\n")[0] == 250
        for user in ("alice@example.org", "bob"):
            client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
            client.user(user)
            client.pass_(PASSWORD)
            assert b"in the tree" in b"\n".join(client.retr(1)[1])
            client.quit()
    assert len(list((vmail / "example.org" / "alice" / "Maildir").glob("cur/*"))) == 1
    assert len(list((tmp_path / "home" / "bob" / "Maildir").glob("cur/*"))) == 1
    assert not (server.maildir_root / "alice@example.org").exists()
    assert not (server.maildir_root / "bob").exists()
    show = popbox(server, "user", "show", "alice@example.org")
    assert f"  maildir: {vmail}/example.org/alice/Maildir\n" in show
