"""Login names end to end, with the standard library's poplib on real sockets: devices,
folders, recent mode, shared mailboxes (``support*bob`` and SASL PLAIN's authzid),
LOGIN-DELAY and what CAPA says before and after login (RFC 2449 sections 6.5, 6.7)."""

from __future__ import annotations

import asyncio
import base64
import logging
import poplib
from typing import Any

import pytest

from popbox.store.mailbox import DAY
from support.pop3service import MESSAGES, PASSWORD, Connect, Server, StartServer
from support.wire import wire

AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
SHARED = {"support": {"popbox_shared_with": "bob, carol"}, "carol": {}, "dave": {}}


class Clock:
    """The time the store believes it is."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _pop(server: Server, name: str, password: str = PASSWORD) -> poplib.POP3:
    client = poplib.POP3(*server.plain, timeout=10)
    try:
        client.user(name)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


async def count(server: Server, name: str) -> int:
    """How many messages ``name`` sees; the session QUITs without deleting."""

    def session() -> int:
        client = _pop(server, name)
        number = client.stat()[0]
        client.quit()
        return number

    return await asyncio.to_thread(session)


async def delete(server: Server, name: str, *numbers: int) -> None:
    def session() -> None:
        client = _pop(server, name)
        for number in numbers:
            client.dele(number)
        client.quit()

    await asyncio.to_thread(session)


async def refused(server: Server, name: str, password: str = PASSWORD) -> bytes:
    """The reply to a login that fails."""

    def session() -> bytes:
        client = poplib.POP3(*server.plain, timeout=10)
        try:
            client.user(name)
            with pytest.raises(poplib.error_proto) as caught:
                client.pass_(password)
            return caught.value.args[0]  # type: ignore[no-any-return]
        finally:
            client.close()

    return await asyncio.to_thread(session)


async def capa(server: Server, name: str | None = None) -> dict[str, list[str]]:
    """CAPA before login, or after logging in as ``name``."""

    def session() -> dict[str, list[str]]:
        client = _pop(server, name) if name else poplib.POP3(*server.plain, timeout=10)
        try:
            return client.capa()
        finally:
            client.quit()

    return await asyncio.to_thread(session)


async def test_every_device_sees_every_message_and_deletes_only_for_itself(
    server: Server,
) -> None:
    assert await count(server, "alice~phone") == 3
    await delete(server, "alice~laptop", 1)
    assert await count(server, "alice~laptop") == 2
    # The phone still sees it, and the message is still stored.
    assert await count(server, "alice~phone") == 3
    assert (await server.store.usage("alice")).messages == 3


async def test_a_message_goes_when_the_last_device_deletes_it(server: Server) -> None:
    for device in ("phone", "laptop", "tablet"):
        assert await count(server, f"alice~{device}") == 3
    await delete(server, "alice~laptop", 1)
    await delete(server, "alice~phone", 1)
    assert (await server.store.usage("alice")).messages == 3
    assert await count(server, "alice~tablet") == 3
    await delete(server, "alice~tablet", 1)
    assert (await server.store.usage("alice")).messages == 2
    assert await server.messages() == MESSAGES[1:]


async def test_alice_and_alice_default_are_one_device(server: Server) -> None:
    await delete(server, "alice~default", 3)
    assert await count(server, "alice") == 2


async def test_recent_mode_offers_what_another_device_deleted_and_holds_nothing(
    start_server: StartServer,
) -> None:
    clock = Clock()
    server = await start_server(messages=[], clock=clock)
    await server.store.deliver("alice", b"Subject: old\r\n\r\nold\r\n")
    clock.now += 20 * DAY
    await server.store.deliver("alice", b"Subject: a\r\n\r\na\r\n")
    await server.store.deliver("alice", b"Subject: b\r\n\r\nb\r\n")
    assert await count(server, "alice~laptop") == 3
    await delete(server, "alice~phone", 2)
    clock.now += 20 * DAY

    def recent() -> list[bytes]:
        client = _pop(server, "recent:alice~tablet")
        subjects = [client.top(n, 0)[1][0] for n in range(1, client.stat()[0] + 1)]
        client.quit()
        return subjects

    # The last 30 days: "a", which the phone deleted, and not "old".
    assert await asyncio.to_thread(recent) == [b"Subject: a", b"Subject: b"]
    # A recent-mode device holds nothing back: once the laptop deletes "a", it goes.
    await delete(server, "alice~laptop", 2)
    assert (await server.store.usage("alice")).messages == 2
    assert await asyncio.to_thread(recent) == [b"Subject: b"]


async def test_a_member_opens_the_shared_mailbox_with_their_own_password(
    start_server: StartServer,
) -> None:
    server = await start_server(users=SHARED)
    await server.store.deliver("support", b"Subject: ticket\r\n\r\nhelp\r\n")
    assert await count(server, "support*bob") == 1
    assert await count(server, "support~laptop*carol") == 1
    devices = {report.device for report in await server.store.devices("support")}
    assert devices == {"bob", "carol/laptop"}
    # bob's own mailbox is untouched by it.
    assert await count(server, "bob") == 1


@pytest.mark.parametrize(
    ("name", "password"),
    [
        pytest.param("support*bob", "wrong", id="member-with-a-wrong-password"),
        pytest.param("support*dave", PASSWORD, id="right-password-not-a-member"),
        pytest.param("nosuch*bob", PASSWORD, id="no-such-mailbox"),
        pytest.param("support*nobody", PASSWORD, id="no-such-member"),
        pytest.param("alice~../../etc", PASSWORD, id="path-traversal-in-device"),
        pytest.param("alice~a~b", PASSWORD, id="separators-twice"),
    ],
)
async def test_refusals_of_shared_and_odd_logins_look_like_a_wrong_password(
    start_server: StartServer, connect: Connect, name: str, password: str
) -> None:
    server = await start_server(
        users=SHARED, max_auth_failures=1, auth_failure_delay=0.2, auth_penalty_max=0.01
    )
    penalty = server.service._hub.penalty  # type: ignore[union-attr]
    client = await connect(server.plain)
    assert (await client.line()).startswith(b"+OK")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(f"USER {name}\r\nPASS {password}\r\n".encode())
    assert await client.line() == b"+OK\r\n"
    # The same words, the same failure delay (a lower bound: a sleep never ends
    # early), counted against the connection (closed at max_auth_failures = 1) and
    # against the address, as for a wrong password.
    assert await client.line() == AUTH_FAILED + b"\r\n"
    assert loop.time() - started >= 0.2
    assert await client.closed() == b""
    assert penalty.delay("127.0.0.1") > 0


async def test_sasl_plain_authzid_opens_the_shared_mailbox_as_the_member(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(users=SHARED)
    ticket = b"Subject: ticket\r\n\r\nhelp\r\n"
    await server.store.deliver("support", ticket)

    async def plain(authzid: str, authcid: str) -> tuple[bytes, bytes]:
        client = await connect(server.plain)
        await client.line()
        message = f"{authzid}\0{authcid}\0{PASSWORD}".encode()
        await client.send(b"AUTH PLAIN " + base64.b64encode(message) + b"\r\nSTAT\r\n")
        return await client.line(), await client.line()

    assert await plain("support", "bob") == (
        b"+OK Logged in, 1 messages (%d octets).\r\n" % len(ticket),
        b"+OK 1 %d\r\n" % len(ticket),
    )
    assert (await plain("support", "dave"))[0] == AUTH_FAILED + b"\r\n"
    assert [r.device for r in await server.store.devices("support")] == ["bob"]


async def test_session_slots_count_the_mailbox_user(start_server: StartServer) -> None:
    server = await start_server(users=SHARED, max_sessions_per_user=1)
    await server.store.deliver("support", b"x\r\n", folder="tickets")

    def sessions() -> bytes:
        first = _pop(server, "support*bob")
        try:
            # Another folder (its own lock), but the same mailbox user: no slot left.
            with pytest.raises(poplib.error_proto) as caught:
                _pop(server, "support+tickets*carol")
            # bob's own mailbox is another user's slot.
            _pop(server, "bob").quit()
        finally:
            first.quit()
        _pop(server, "support+tickets*carol").quit()
        return caught.value.args[0]  # type: ignore[no-any-return]

    assert await asyncio.to_thread(sessions) == b"-ERR [IN-USE] Too many sessions for this user."


async def test_folder_logins_and_a_missing_folder(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(max_auth_failures=1)
    await server.store.deliver("alice", b"Subject: invoice\r\n\r\n42 EUR\r\n", folder="invoices")
    assert await count(server, "alice+invoices") == 1
    assert await count(server, "alice+invoices~phone") == 1
    assert await count(server, "alice") == 3
    client = await connect(server.plain)
    await client.line()
    await client.send(f"USER alice+nosuch\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert await client.line() == b"-ERR [SYS/PERM] Folder nosuch does not exist.\r\n"
    # Not a failed login: the connection is still there for a correct one.
    await client.send(f"USER alice+invoices\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert (await client.line()).startswith(b"+OK Logged in, 1 messages")


async def test_a_user_whose_name_has_a_plus_is_that_user_not_a_folder(
    start_server: StartServer,
) -> None:
    server = await start_server(users={"bob+work": {}})
    await server.store.deliver("bob+work", b"Subject: w\r\n\r\nw\r\n")
    await server.store.deliver("bob+work", b"Subject: v\r\n\r\nv\r\n")
    assert await count(server, "bob+work") == 2
    assert await count(server, "bob+work~phone") == 2
    # bob has no folder "work"; the name never meant it.
    assert await server.store.folders("bob") == ["INBOX"]


async def test_login_delay_refusal_is_not_a_failed_login(
    start_server: StartServer, connect: Connect
) -> None:
    clock = Clock()
    server = await start_server(
        users={"carol": {"popbox_login_delay": "60"}}, clock=clock, max_auth_failures=1
    )
    assert await count(server, "carol") == 0
    client = await connect(server.plain)
    await client.line()
    for _ in range(2):
        await client.send(f"USER carol\r\nPASS {PASSWORD}\r\n".encode())
        await client.line()
        reply = await client.line()
        assert reply.startswith(b"-ERR [LOGIN-DELAY] "), reply
    # The delay is per device; and once it is up, the device is let in again.
    assert await count(server, "carol~phone") == 0
    clock.now += 61
    await client.send(f"USER carol\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert (await client.line()).startswith(b"+OK Logged in")


def _expire_and_delay(capabilities: dict[str, Any]) -> tuple[list[str], list[str] | None]:
    return capabilities["EXPIRE"], capabilities.get("LOGIN-DELAY")


async def test_capa_before_login_bounds_every_user_and_after_login_tells_the_users_own(
    start_server: StartServer,
) -> None:
    server = await start_server(
        mailbox={"retention_days": 30},
        users={
            "carol": {"popbox_retention_days": "5", "popbox_login_delay": "900"},
            "dave": {"popbox_retention_days": "never"},
            "support": {"popbox_shared_with": "bob", "popbox_retention_days": "7"},
        },
    )
    # RFC 2449: the smallest EXPIRE and the largest LOGIN-DELAY of any user, tagged
    # USER: a second CAPA after login tells the user's own.
    assert _expire_and_delay(await capa(server)) == (["5", "USER"], ["900", "USER"])
    assert _expire_and_delay(await capa(server, "bob")) == (["30"], None)
    assert _expire_and_delay(await capa(server, "carol")) == (["5"], ["900"])
    assert _expire_and_delay(await capa(server, "dave")) == (["NEVER"], None)
    # A member sees the shared mailbox's rules, which are what apply to its mail.
    assert _expire_and_delay(await capa(server, "support*bob")) == (["7"], None)


async def test_capa_without_per_user_values_has_no_user_tag(start_server: StartServer) -> None:
    server = await start_server(mailbox={"retention_days": 10, "login_delay": 60})
    assert _expire_and_delay(await capa(server)) == (["10"], ["60"])
    assert _expire_and_delay(await capa(server, "alice")) == (["10"], ["60"])


async def test_pop3_expire_is_the_retention_capa_announces(start_server: StartServer) -> None:
    server = await start_server()
    assert _expire_and_delay(await capa(server)) == (["NEVER"], None)


async def test_expire_0_removes_what_was_retrieved_whole_at_quit(
    start_server: StartServer,
) -> None:
    server = await start_server(mailbox={"retention_days": 0})

    def session() -> None:
        client = _pop(server, "alice")
        client.retr(1)
        client.top(2, 0)  # a TOP is no retrieval
        client.quit()

    await asyncio.to_thread(session)
    assert await server.messages() == MESSAGES[1:]


async def test_a_session_that_drops_keeps_what_it_retrieved(
    start_server: StartServer, connect: Connect
) -> None:
    server = await start_server(mailbox={"retention_days": 0})
    client = await connect(server.plain)
    await client.login()
    assert await client.retr(1) == wire(MESSAGES[0]).replace(b"\n.", b"\n..") + b".\r\n"
    client.close()
    while server.service.session_count:
        await asyncio.sleep(0.01)
    assert await server.messages() == MESSAGES


async def test_logout_line_names_mailbox_device_and_folder(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(users=SHARED)
    await server.store.deliver("support", b"x\r\n", folder="tickets")
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    await count(server, "support+tickets~laptop*bob")
    await count(server, "recent:alice~phone")
    while server.service.session_count:
        await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert " user=support device=bob/laptop folder=tickets peer=" in lines[0]
    assert " user=alice device=phone folder=INBOX recent=yes peer=" in lines[1]
