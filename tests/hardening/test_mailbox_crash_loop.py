"""Crash safety of the mailbox model: SIGKILL `popbox serve` while mail arrives over
LMTP, three devices of one mailbox delete and QUIT, commits move mail to Trash and the
sweeper inside the server empties it, then audit what each device would see.

After every kill: no acknowledged message is gone while some device never even sent a
DELE for it, no device sees again a message whose deletion its QUIT confirmed with
+OK, no message is in two folders or twice in one, and every device sees a message
under the same UIDL.
"""

from __future__ import annotations

import asyncio
import poplib
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from popbox.store.mailbox import MailboxView
from popbox.store.maildir import MaildirStore
from support.crash import deliver_until_killed, kill_rounds, sessions_until_killed
from support.serverproc import PASSWORD, make_server

USER = "team"
DEVICES = ("phone", "laptop", "tablet")
# Bounded for CI on two cores: about a second a round.
ROUNDS = 12
KILL_AFTER = (0.1, 1.0)
MESSAGE_ID = re.compile(rb"^Message-ID: <crash-(\d+)@popbox\.test>\r?$", re.MULTILINE | re.I)
# Every commit that empties a message for all three devices moves it to Trash, and
# the server's own sweeper empties Trash (trash_days = 0) every fraction of a second.
MAILBOX = """
[mailbox]
disposition = "trash"
trash_days = 0
sweep_interval = 0.2
"""


class Ledger:
    """What clients were promised, shared by the client threads of all rounds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_number = 1
        self.acked: set[int] = set()
        self.deleted: dict[str, set[int]] = defaultdict(set)  # QUIT said +OK
        self.maybe_deleted: dict[str, set[int]] = defaultdict(set)  # QUIT was sent
        self.uidls: dict[int, str] = {}
        self.quits = 0

    def new_message(self, rng: random.Random) -> tuple[int, bytes]:
        with self.lock:
            number = self.next_number
            self.next_number += 1
        lines = rng.randint(1, 200)
        body = b"".join(rng.randbytes(20).hex().encode() + b"\r\n" for _ in range(lines))
        return number, f"Message-ID: <crash-{number}@popbox.test>\r\n\r\n".encode() + body

    def saw_uidl(self, number: int, uidl: str) -> None:
        with self.lock:
            first = self.uidls.setdefault(number, uidl)
        assert first == uidl, f"message {number} changed UIDL {first} -> {uidl}"


def next_delivery(
    ledger: Ledger, rng: random.Random
) -> tuple[str, bytes, Callable[[], None]]:
    number, data = ledger.new_message(rng)

    def acked() -> None:
        with ledger.lock:
            ledger.acked.add(number)

    return USER, data, acked


def device_session(client: poplib.POP3, ledger: Ledger, rng: random.Random) -> None:
    device = rng.choice(DEVICES)
    client.user(f"{USER}~{device}")
    try:
        client.pass_(PASSWORD)
    except poplib.error_proto as exc:
        if "IN-USE" in str(exc):
            return
        raise
    doomed = []
    for entry in client.uidl()[1]:
        number_text, uidl = entry.decode().split()
        match = MESSAGE_ID.search(b"\r\n".join(client.top(int(number_text), 0)[1]))
        assert match is not None
        number = int(match.group(1))
        ledger.saw_uidl(number, uidl)
        with ledger.lock:
            assert number not in ledger.deleted[device], f"{device} sees {number} again"
        if rng.random() < 0.6:
            client.dele(int(number_text))
            doomed.append(number)
    with ledger.lock:
        ledger.maybe_deleted[device].update(doomed)
    if client.quit().startswith(b"+OK"):
        with ledger.lock:
            ledger.deleted[device].update(doomed)
            ledger.quits += 1


def numbers_in(maildir: Path) -> Counter[int]:
    found: Counter[int] = Counter()
    for sub in ("new", "cur"):
        directory = maildir / sub
        if not directory.exists():
            continue
        for path in directory.iterdir():
            match = MESSAGE_ID.search(path.read_bytes())
            assert match is not None, path
            found[int(match.group(1))] += 1
    return found


async def audit(root: Path, ledger: Ledger) -> int:
    inbox = numbers_in(root / USER)
    trash = numbers_in(root / USER / ".Trash")
    both = inbox + trash
    assert not [n for n, count in both.items() if count > 1], "a message in two places"
    for number in ledger.acked:
        wanted_by = [d for d in DEVICES if number not in ledger.maybe_deleted[d]]
        if wanted_by:
            assert inbox[number] == 1, f"message {number} gone while {wanted_by} still want it"
    store = MaildirStore(root)
    try:
        for device in DEVICES:
            drop = await store.open_maildrop(USER, MailboxView(device=device))
            try:
                for index, info in enumerate(drop.messages):
                    data = b"".join([chunk async for chunk in drop.read_message(index)])
                    match = MESSAGE_ID.search(data)
                    assert match is not None
                    number = int(match.group(1))
                    assert number not in ledger.deleted[device], (
                        f"{device}: message {number} came back after its QUIT +OK"
                    )
                    ledger.saw_uidl(number, info.uidl)
            finally:
                await drop.release()
    finally:
        await store.close()
    return sum(inbox.values())


def test_sigkill_during_device_commits_trash_moves_and_sweeps_keeps_every_promise(
    tmp_path: Path,
) -> None:
    rng = random.Random(12_2026)
    server = make_server(tmp_path, (USER,), extra=MAILBOX)
    ledger = Ledger()
    errors: list[BaseException] = []
    server.start()
    for device in DEVICES:  # every device known before the mail comes
        server.pop3(f"{USER}~{device}").quit()
    server.kill()
    kill_rounds(
        server,
        rng,
        rounds=ROUNDS,
        kill_after=KILL_AFTER,
        clients=[
            lambda r: deliver_until_killed(server, r, lambda r: next_delivery(ledger, r)),
            lambda r: sessions_until_killed(
                server, r, errors, lambda client, r: device_session(client, ledger, r)
            ),
        ],
        errors=errors,
        audit=lambda: asyncio.run(audit(server.maildir_root, ledger)),
    )
    stored = asyncio.run(audit(server.maildir_root, ledger))
    gone_for_all = [
        n for n in ledger.acked if all(n in ledger.deleted[d] for d in DEVICES)
    ]
    assert len(ledger.acked) >= ROUNDS
    assert ledger.quits >= 3
    print(
        f"mailbox crash loop: {ROUNDS} kills, {len(ledger.acked)} acked, {ledger.quits} QUITs, "
        f"{len(gone_for_all)} deleted by every device, {stored} still in INBOX"
    )
