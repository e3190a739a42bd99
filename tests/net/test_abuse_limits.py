"""Abuse limits of issue 5, each named after the attack it stops: password guessing
across connections, address spraying, connection floods before login, and one user's
credentials used to open session after session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from popbox.net.limits import PENALTY_DECAY, PENALTY_INITIAL, AuthPenalty, penalty_key
from popbox.store.base import Maildrop, MailStore
from popbox.store.mailbox import DEFAULT_VIEW, MailboxView
from popbox.store.memory import MemoryStore
from support.pop3service import PASSWORD, Connect, StartServer, until_no_sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_guesser_penalty_doubles_per_failure_up_to_the_cap() -> None:
    clock = Clock()
    penalty = AuthPenalty(15.0, clock=clock)
    waits = []
    for _ in range(6):
        penalty.failed("192.0.2.7")
        waits.append(penalty.delay("192.0.2.7"))
    assert waits == [PENALTY_INITIAL, 4.0, 8.0, 15.0, 15.0, 15.0]
    # Another address is not punished for it.
    assert penalty.delay("192.0.2.8") == 0.0


def test_penalty_decays_and_a_good_login_clears_it() -> None:
    clock = Clock()
    penalty = AuthPenalty(15.0, clock=clock)
    penalty.failed("192.0.2.7")
    penalty.failed("192.0.2.7")
    clock.now += PENALTY_DECAY
    assert penalty.delay("192.0.2.7") == 0.0
    assert len(penalty) == 0
    penalty.failed("192.0.2.7")
    assert penalty.delay("192.0.2.7") == PENALTY_INITIAL  # starts afresh
    penalty.succeeded("192.0.2.7")
    assert penalty.delay("192.0.2.7") == 0.0


def test_address_spraying_cannot_grow_the_penalty_table_without_bound() -> None:
    penalty = AuthPenalty(15.0, max_entries=100, clock=Clock())
    for n in range(10_000):
        penalty.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(penalty) == 100
    # The most recent guessers are the ones still remembered.
    assert penalty.delay("10.0.39.15") == PENALTY_INITIAL
    assert penalty.delay("10.0.0.1") == 0.0


def test_ipv6_guesser_cannot_dodge_the_penalty_inside_its_slash_64() -> None:
    penalty = AuthPenalty(15.0, clock=Clock())
    penalty.failed("2001:db8:1:2::1")
    penalty.failed("2001:db8:1:2:ffff::9")
    assert penalty.delay("2001:db8:1:2:abcd::77") == 4.0
    assert penalty.delay("2001:db8:1:3::1") == 0.0
    assert penalty_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_penalty_off_when_cap_is_zero() -> None:
    penalty = AuthPenalty(0.0, clock=Clock())
    penalty.failed("192.0.2.7")
    assert penalty.delay("192.0.2.7") == 0.0
    assert len(penalty) == 0


class CountingPassDB:
    """Counts password checks, to show a penalised attempt is held before hashing."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.checks = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def verify(self, username: str, password: str) -> object:
        self.checks += 1
        return await self._inner.verify(username, password)  # type: ignore[attr-defined]


async def test_guessing_over_fresh_connections_waits_out_the_per_ip_penalty(
    connect: Connect, start_server: StartServer
) -> None:
    """A new connection does not reset the delay: it belongs to the address."""
    counter: list[CountingPassDB] = []

    def wrap(passdb: object) -> CountingPassDB:
        counter.append(CountingPassDB(passdb))
        return counter[0]

    server = await start_server(auth_penalty_max=0.5, wrap_passdb=wrap)
    hub = server.service._hub
    assert hub is not None
    first = await connect(server.plain)
    await first.line()
    await first.send(b"USER alice\r\nPASS guess1\r\n")
    await first.line()
    assert (await first.line()).startswith(b"-ERR [AUTH]")
    assert hub.penalty.delay("127.0.0.1") == 0.5  # 2 s, capped
    first.close()

    second = await connect(server.plain)
    await second.line()
    loop = asyncio.get_running_loop()
    await second.send(b"USER alice\r\nPASS guess2\r\n")
    await second.line()
    started = loop.time()
    await asyncio.sleep(0.1)
    assert counter[0].checks == 1  # the second guess is held before its hash
    assert (await second.line()).startswith(b"-ERR [AUTH]")
    # How long the guess was held is the penalty itself, and only the clock shows it
    # (a lower bound: a sleep never ends early, so this cannot fail on a loaded machine).
    assert loop.time() - started >= 0.3
    assert counter[0].checks == 2
    # The right password still gets in (after the wait) and clears the penalty.
    await second.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    await second.line()
    assert (await second.line()).startswith(b"+OK")
    assert hub.penalty.delay("127.0.0.1") == 0.0
    second.close()


async def test_connection_flood_before_login_is_capped_service_wide(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(max_login_sessions=2)
    first = await connect(server.plain)
    second = await connect(server.plain)
    assert (await first.line()).startswith(b"+OK")
    assert (await second.line()).startswith(b"+OK")
    third = await connect(server.plain)
    assert await third.closed() == b"-ERR [SYS/TEMP] too many connections\r\n"
    # Logging in frees a pre-login slot: the cap is on sessions that have not.
    await first.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    await first.line()
    assert (await first.line()).startswith(b"+OK")
    fourth = await connect(server.plain)
    assert (await fourth.line()).startswith(b"+OK")
    hub = server.service._hub
    assert hub is not None
    assert hub.login_sessions == 2
    for client in (first, second, fourth):
        client.close()
    await until_no_sessions(server)
    assert hub.login_sessions == 0


class GatedStore:
    """A store whose open_maildrop waits at a gate, so sessions pile up past the check."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self.gate = asyncio.Event()
        self.waiting = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> Maildrop:
        self.waiting += 1
        await self.gate.wait()
        return await self._inner.open_maildrop(user, view)


@pytest.fixture
async def gated() -> AsyncIterator[list[GatedStore]]:
    stores: list[GatedStore] = []
    yield stores
    for store in stores:
        store.gate.set()


async def test_one_users_credentials_cannot_open_unbounded_sessions(
    connect: Connect, start_server: StartServer, gated: list[GatedStore]
) -> None:
    def wrap(store: MemoryStore) -> MailStore:
        gated.append(GatedStore(store))
        return gated[0]  # type: ignore[return-value]

    server = await start_server(max_sessions_per_user=2, wrap_store=wrap)
    clients = []
    for _ in range(2):
        client = await connect(server.plain)
        await client.line()
        await client.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
        await client.line()
        clients.append(client)
    for _ in range(200):
        if gated[0].waiting == 2:
            break
        await asyncio.sleep(0.01)
    extra = await connect(server.plain)
    await extra.line()
    await extra.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    await extra.line()
    assert await extra.line() == b"-ERR [IN-USE] Too many sessions for this user.\r\n"
    assert gated[0].waiting == 2  # refused before the store was asked
    # Another user is not affected.
    other = await connect(server.plain)
    await other.line()
    await other.send(f"USER bob\r\nPASS {PASSWORD}\r\n".encode())
    await other.line()
    gated[0].gate.set()
    assert (await other.line()).startswith(b"+OK")
    replies = sorted([await client.line() for client in clients])
    # One gets the maildrop, the other the lock's IN-USE; slots come back after.
    assert replies[0].startswith(b"+OK")
    assert replies[1].startswith(b"-ERR [IN-USE]")
    for client in [*clients, extra, other]:
        client.close()
    await until_no_sessions(server)
    hub = server.service._hub
    assert hub is not None
    assert hub.broker.per_user == {}
