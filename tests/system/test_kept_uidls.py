"""UIDLs kept from the replaced server, as stdlib poplib sees them from a real `popbox serve`.

The mail is put in the Maildir the way `popbox import` does, beside the running server:
a Dovecot-like tree adopted in place before the switch, and deliveries with the old
UIDL (lockless, while the server runs). A client that left mail on the old server
must see the very UIDLs it remembers, in ``UIDL`` and ``UIDL n``, across a restart.
"""

from __future__ import annotations

import asyncio
import poplib
from pathlib import Path

from popbox.store import MaildirStore
from support.serverproc import deliver_lmtp, make_server, running

# As Dovecot's default pop3_uidl_format (%08Xu%08Xv) serves them.
OLD = ["00000001507C6B1A", "00000002507C6B1A", "00000003507C6B1A"]


def message(number: int) -> bytes:
    return f"Message-ID: <m{number}@popbox.test>\r\nSubject: {number}\r\n\r\n{number}\r\n".encode()


def dovecot_tree(maildir: Path) -> list[str]:
    """Two messages as Dovecot left them in cur/; their keys in Dovecot's order."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    keys = []
    for number, when in ((0, 1700000900), (1, 1700000100)):  # names out of UID order
        body = message(number)
        key = f"{when}.M1P{number}.oldhost,S={len(body)},W={len(body)}"
        (maildir / "cur" / f"{key}:2,S").write_bytes(body)
        keys.append(key)
    return keys


def listing(client: poplib.POP3) -> list[tuple[int, str]]:
    """``UIDL``'s answer as (message number, UIDL)."""
    _, lines, _ = client.uidl()
    return [(int(number), uidl.decode()) for number, uidl in (line.split() for line in lines)]


def test_poplib_lists_the_uidls_the_old_server_served(tmp_path: Path) -> None:
    server = make_server(tmp_path / "data")
    maildir = server.maildir_root / "alice"
    keys = dovecot_tree(maildir)

    async def adopt() -> None:
        store = MaildirStore(server.maildir_root)
        report = await store.adopt_uidls("alice", dict(zip(keys, OLD, strict=False)), order=keys)
        assert report.adopted == tuple(keys)
        assert report.ordered

    async def deliver() -> None:
        store = MaildirStore(server.maildir_root, save_crlf=True)
        await store.deliver("alice", message(2), uidl=OLD[2])

    asyncio.run(adopt())
    with running(server):
        asyncio.run(deliver())  # beside the running server, as `popbox import` does
        assert deliver_lmtp(server.lmtp_port, "alice", message(3)) == 250
        client = server.pop3("alice")
        try:
            listed = listing(client)
            assert listed[:3] == [(1, OLD[0]), (2, OLD[1]), (3, OLD[2])]  # the old numbering too
            number, own = listed[3]
            assert number == 4
            assert own not in OLD
            for n, uidl in listed:
                assert client.uidl(n).split()[2].decode() == uidl
                _, lines, _ = client.retr(n)
                assert lines[-1] == str(n - 1).encode()
            client.dele(2)
            client.quit()
        except BaseException:
            client.close()
            raise
        phone = server.pop3("alice~phone")
        try:
            assert listing(phone) == [(1, OLD[0]), (2, OLD[2]), (3, own)]
            phone.quit()
        except BaseException:
            phone.close()
            raise
    with running(server):  # restarted: nothing cached, the same UIDLs
        client = server.pop3("alice")
        try:
            assert listing(client) == [(1, OLD[0]), (2, OLD[2]), (3, own)]
            client.quit()
        except BaseException:
            client.close()
            raise
