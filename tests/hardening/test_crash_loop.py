"""Crash safety, proven: SIGKILL `popbox serve` at random moments while clients deliver
over LMTP, log in to maildrops with new mail (index updates) and QUIT with deletions,
then restart it and audit what a user would see.

After every kill: no message acknowledged with LMTP 250 is lost, no message whose
deletion a QUIT confirmed with +OK comes back, nothing partial is visible, and every
surviving message keeps the UIDL it was first seen with. Deliveries and QUITs whose
reply never arrived may have happened or not; either is allowed.
"""

from __future__ import annotations

import asyncio
import poplib
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path

from support.crash import (
    audit_maildrops,
    deliver_until_killed,
    kill_rounds,
    sessions_until_killed,
)
from support.serverproc import PASSWORD, make_server

USERS = ("alice", "bob", "carol")
# Bounded for CI on two cores: about a second a round.
ROUNDS = 15
KILL_AFTER = (0.05, 0.9)
MESSAGE_ID = re.compile(rb"^Message-ID: <kill-(\d+)@popbox\.test>\r?$", re.MULTILINE | re.I)


class Ledger:
    """What clients were promised, shared by the client threads of all rounds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[int, bytes] = {}
        self.acked: set[tuple[str, int]] = set()
        self.deleted: set[tuple[str, int]] = set()  # DELE committed by a QUIT +OK
        # DELEs whose QUIT was sent: the commit may have happened before the kill even
        # if its +OK never arrived, so these may be gone without being "lost".
        self.maybe_deleted: set[tuple[str, int]] = set()
        self.uidls: dict[tuple[str, int], str] = {}
        self.next_number = 1
        self.quits = 0

    def new_message(self, rng: random.Random) -> tuple[int, bytes]:
        with self.lock:
            number = self.next_number
            self.next_number += 1
        lines = rng.randint(1, 3000)
        body = b"".join(rng.randbytes(24).hex().encode() + b"\r\n" for _ in range(lines))
        data = (
            f"Message-ID: <kill-{number}@popbox.test>\r\nSubject: {number}\r\n\r\n".encode() + body
        )
        with self.lock:
            self.sent[number] = data
        return number, data

    def saw_uidl(self, user: str, number: int, uidl: str) -> None:
        with self.lock:
            first = self.uidls.setdefault((user, number), uidl)
        assert first == uidl, f"{user}: message {number} changed UIDL {first} -> {uidl}"


def next_delivery(
    ledger: Ledger, rng: random.Random
) -> tuple[str, bytes, Callable[[], None]]:
    user = rng.choice(USERS)
    number, data = ledger.new_message(rng)

    def acked() -> None:
        with ledger.lock:
            ledger.acked.add((user, number))

    return user, data, acked


def pop_session(client: poplib.POP3, ledger: Ledger, rng: random.Random) -> None:
    """Log in (the index catches up with new mail), map UIDLs, delete some, QUIT."""
    user = rng.choice(USERS)
    client.user(user)
    try:
        client.pass_(PASSWORD)
    except poplib.error_proto as exc:
        if "IN-USE" in str(exc):
            return
        raise
    doomed = []
    _, listing, _ = client.uidl()
    for entry in listing:
        number_text, uidl = entry.decode().split()
        _, head, _ = client.top(int(number_text), 0)
        match = MESSAGE_ID.search(b"\r\n".join(head))
        assert match is not None, head
        message = int(match.group(1))
        ledger.saw_uidl(user, message, uidl)
        if rng.random() < 0.5:
            client.dele(int(number_text))
            doomed.append((user, message))
    with ledger.lock:
        ledger.maybe_deleted.update(doomed)
    reply = client.quit()
    if reply.startswith(b"+OK"):
        with ledger.lock:
            ledger.deleted.update(doomed)
            ledger.quits += 1


async def audit(root: Path, ledger: Ledger) -> int:
    """Open every maildrop as the restarted server would and check the promises."""
    return await audit_maildrops(
        root,
        USERS,
        message_id=MESSAGE_ID,
        sent=ledger.sent,
        acked=ledger.acked,
        deleted=ledger.deleted,
        maybe_deleted=ledger.maybe_deleted,
        saw_uidl=ledger.saw_uidl,
    )


def test_sigkill_during_quits_deliveries_and_index_updates_loses_and_resurrects_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(5_2026)
    server = make_server(tmp_path, USERS)
    ledger = Ledger()
    errors: list[BaseException] = []
    kill_rounds(
        server,
        rng,
        rounds=ROUNDS,
        kill_after=KILL_AFTER,
        clients=[
            lambda r: deliver_until_killed(server, r, lambda r: next_delivery(ledger, r)),
            lambda r: sessions_until_killed(
                server, r, errors, lambda client, r: pop_session(client, ledger, r)
            ),
        ],
        errors=errors,
        audit=lambda: asyncio.run(audit(server.maildir_root, ledger)),
    )
    stored = asyncio.run(audit(server.maildir_root, ledger))
    # The loop really delivered, committed deletions, and interrupted work in flight.
    assert len(ledger.acked) >= ROUNDS
    assert ledger.quits >= 1
    assert ledger.deleted
    print(
        f"crash loop: {ROUNDS} kills, {len(ledger.sent)} sent, {len(ledger.acked)} acked, "
        f"{ledger.quits} QUITs, {len(ledger.deleted)} deletions committed, {stored} stored"
    )
