"""Logins over real sockets against a passwd file whose hashes run on the Hasher's threads."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest

from popbox.auth.hasher import Hasher
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.auth.schemes import HashCost, hash_password
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.pop3service import make_config

# Real SHA512-CRYPT, cheap enough for a test (the bench uses 5,000 rounds).
COST = HashCost(sha_crypt_rounds=1000)
USERS = {f"user{n}": f"secret-{n}" for n in range(24)}


async def start(
    tmp_path: Path, server_context: ssl.SSLContext, **limits: float
) -> tuple[Pop3Service, Hasher]:
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "".join(f"{u}:{hash_password(p, 'SHA512-CRYPT', cost=COST)}\n" for u, p in USERS.items())
    )
    os.chmod(passwd, 0o600)
    hasher = Hasher(2, name="net-test-hash")
    passdb = PasswdFilePassDB(passwd, check_interval=0, hasher=hasher)
    store = MemoryStore()
    for user in USERS:
        await store.deliver(user, f"Subject: for {user}\n\nhello\n".encode())
    service = Pop3Service(make_config(**limits), store, passdb, server_context)
    await service.start()
    return service, hasher


async def session(address: tuple[str, int], user: str, password: str) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        replies = [await reader.readline()]
        writer.write(f"USER {user}\r\nPASS {password}\r\nSTAT\r\nQUIT\r\n".encode())
        while len(replies) < 5:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                break
            replies.append(line)
        return replies
    finally:
        writer.close()


async def test_concurrent_logins_each_get_their_own_answer(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    service, hasher = await start(tmp_path, server_context)
    try:
        address = service.plain_addresses[0]
        # Distinct users at once (a maildrop is locked while in use), twice over.
        for _ in range(2):
            attempts = list(USERS.items())
            results = await asyncio.gather(*(session(address, u, p) for u, p in attempts))
            check(attempts, results)
    finally:
        await service.shutdown()
        hasher.close()


def check(attempts: list[tuple[str, str]], results: list[list[bytes]]) -> None:
    for (user, _), replies in zip(attempts, results, strict=True):
        assert replies[2].startswith(b"+OK"), (user, replies)  # PASS
        assert replies[3] == f"+OK 1 {len(f'Subject: for {user}') + 11}\r\n".encode()


async def test_wrong_passwords_among_right_ones_fail_after_the_delay(
    tmp_path: Path, server_context: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The delay is observed where it is served, not by the clock: every wait the
    # server asks the event loop for is recorded (and still waited).
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float, result: object = None) -> object:
        delays.append(delay)
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    service, hasher = await start(tmp_path, server_context, auth_failure_delay=0.3)
    try:
        address = service.plain_addresses[0]
        users = list(USERS.items())
        half = len(users) // 2
        good = [session(address, u, p) for u, p in users[:half]]
        bad = [session(address, u, p + "!") for u, p in users[half:]]
        results = await asyncio.gather(*good, *bad)
        for replies in results[:half]:
            assert replies[2].startswith(b"+OK")
        for replies in results[half:]:
            assert replies[2] == b"-ERR [AUTH] Authentication failed.\r\n"
        # Each refused login waited the failure delay before its -ERR; no accepted one did.
        assert delays.count(0.3) == len(users) - half
    finally:
        await service.shutdown()
        hasher.close()


@pytest.mark.timeout(30)
async def test_shutdown_with_logins_in_flight_does_not_hang(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    service, hasher = await start(tmp_path, server_context)
    address = service.plain_addresses[0]
    pending = [asyncio.ensure_future(session(address, u, p)) for u, p in USERS.items()]
    await asyncio.sleep(0.01)
    await service.shutdown()
    await asyncio.to_thread(hasher.close)
    await asyncio.gather(*pending, return_exceptions=True)


def test_session_ids_name_the_worker_process_they_come_from() -> None:
    # Workers are forked from one supervisor; their logout lines share one log, so an
    # id must carry the pid of the process that made it, not its parent's.
    from popbox.net.log import next_session_id

    assert next_session_id().startswith(f"{os.getpid():x}.")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        try:
            os.write(write_end, next_session_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_id = pipe.read().decode()
    os.waitpid(pid, 0)
    assert child_id.startswith(f"{pid:x}.")
