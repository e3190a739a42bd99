"""The asyncio load generator: POP3 scenarios against any server, with their own CPU use.

Each scenario returns a ``Result``: its figure, the wall time, and the CPU seconds the
server tree and this process spent, so the report can show that the load generator was
not the bottleneck (its CPU next to the server's; both share the machine's cores).

The client is deliberately minimal and works on whole buffers: the socket reads into
one bytearray (a BufferedProtocol, no StreamReader copies), replies are found with
``bytearray.find``, RETR bodies are compared in place with the expected bytes (a
memcmp, ExpectedBodies), so a client costs much less CPU per byte than a server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.mailgen import MailboxManifest
from bench.servers import Server

__all__ = ["Pop3Client", "Result", "client_tls_context"]

# Free space offered to each socket read; the receive buffer starts at INITIAL_BUFFER
# and doubles when a reply (a 5 MB message) needs more.
READ_SIZE: Final = 256 * 1024
INITIAL_BUFFER: Final = 1024 * 1024
# A reply that takes longer than this means the server is stuck; fail the scenario.
REPLY_TIMEOUT: Final = 600.0


class Pop3Error(Exception):
    """An -ERR reply or a broken conversation."""


def client_tls_context(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    return context


def _announced_octets(status: bytes) -> int:
    """The size in ``+OK 1234 octets`` (RFC 1939's RETR reply), 0 if there is none."""
    parts = status.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class _ReceiveBuffer(asyncio.BufferedProtocol):
    """The client's connection: the transport reads straight into one bytearray.

    No StreamReader: asyncio's reader copies every chunk into its buffer, read()
    copies it out and the caller appends it to its own, three copies per byte before
    the hash. Here the socket's bytes land where they are hashed, and the waiting
    coroutine is woken only once as many bytes as it asked for have arrived.
    """

    def __init__(self) -> None:
        self.data = bytearray(INITIAL_BUFFER)
        self.start = 0
        self.end = 0
        self.transport: asyncio.Transport | None = None
        self.closed: BaseException | None = None
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        free = len(self.data) - self.end
        if free < READ_SIZE:
            pending = self.end - self.start
            if self.start and len(self.data) - pending >= READ_SIZE:
                # Move what is unread to the front (same length: allowed while the
                # transport may still hold a view of the buffer).
                self.data[:pending] = self.data[self.start : self.end]
            else:
                # A new, larger buffer; the old one is dropped, never resized.
                bigger = bytearray(max(2 * len(self.data), pending + READ_SIZE))
                bigger[:pending] = self.data[self.start : self.end]
                self.data = bigger
            self.start, self.end = 0, pending
        return memoryview(self.data)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self._waiter is not None and self.end - self.start >= self._want:
            self._wake(None)

    def eof_received(self) -> bool | None:
        self._lost(Pop3Error("connection closed by the server"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or Pop3Error("connection closed by the server"))

    def _lost(self, exc: BaseException) -> None:
        if self.closed is None:
            self.closed = exc
        self._wake(exc)

    def _wake(self, exc: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    async def wait_for(self, count: int) -> None:
        """Return once at least ``count`` unread bytes are buffered."""
        while self.end - self.start < count:
            if self.closed is not None:
                raise Pop3Error("connection closed by the server") from self.closed
            self._want = count
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class Pop3Client:
    """One POP3 connection with its own receive buffer."""

    def __init__(self, transport: asyncio.Transport, buffer: _ReceiveBuffer) -> None:
        self.transport = transport
        self.buffer = buffer

    @classmethod
    async def connect(cls, server: Server, security: str, tls: ssl.SSLContext | None) -> Pop3Client:
        """security: "plain", "stls" (STLS after the greeting) or "tls" (implicit)."""
        loop = asyncio.get_running_loop()
        if security == "tls":
            transport, buffer = await loop.create_connection(
                _ReceiveBuffer, server.host, server.pop3s_port, ssl=tls,
                server_hostname="localhost",
            )
        else:
            transport, buffer = await loop.create_connection(
                _ReceiveBuffer, server.host, server.pop3_port
            )
        client = cls(transport, buffer)
        try:
            await client.expect_ok()
            if security == "stls":
                client.write(b"STLS\r\n")
                await client.expect_ok()
                assert tls is not None
                upgraded = await loop.start_tls(
                    transport, buffer, tls, server_hostname="localhost"
                )
                if upgraded is None:
                    raise Pop3Error("connection closed during the TLS handshake")
                client.transport = upgraded
        except BaseException:
            transport.abort()
            raise
        return client

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def line(self) -> bytes:
        buffer = self.buffer
        while (end := buffer.data.find(b"\r\n", buffer.start, buffer.end)) < 0:
            await buffer.wait_for(buffer.end - buffer.start + 1)
        line = bytes(buffer.data[buffer.start : end])
        buffer.start = end + 2
        return line

    async def expect_ok(self) -> bytes:
        line = await self.line()
        if not line.startswith(b"+OK"):
            raise Pop3Error(line.decode("utf-8", "replace"))
        return line

    async def command(self, text: str) -> bytes:
        self.write(text.encode() + b"\r\n")
        return await self.expect_ok()

    async def _terminated(self, octets: int) -> int:
        """Wait for the rest of a multi-line reply; its end (offset of ".\r\n") in data.

        ``octets`` is the size the +OK line announced (RETR), 0 if none: the content
        before the terminator is at least that long, so the search for the terminator
        starts there instead of rescanning the whole message.
        """
        buffer = self.buffer
        await buffer.wait_for(octets + 3)
        if buffer.data.startswith(b".\r\n", buffer.start):
            # The body's first line cannot be "." alone (it would be stuffed): empty.
            return buffer.start
        search = buffer.start + max(0, octets - 2)
        while (end := buffer.data.find(b"\r\n.\r\n", search, buffer.end)) < 0:
            # Positions before the last 4 bytes cannot start the terminator.
            search = max(search, buffer.end - 4)
            offset = search - buffer.start
            await buffer.wait_for(buffer.end - buffer.start + 1)
            search = buffer.start + offset  # the buffer may have moved
        return end + 2

    async def body(self, octets: int = 0) -> bytes:
        """The rest of a multi-line reply, un-stuffed, CRLF line ends kept.

        When exactly ``octets`` octets came nothing was dot-stuffed and the un-stuffing
        pass is skipped. The hash the caller compares catches a server whose size is
        wrong.
        """
        end = await self._terminated(octets)
        buffer = self.buffer
        data = bytes(buffer.data[buffer.start : end])
        buffer.start = end + 3
        if len(data) != octets:
            data = data.replace(b"\r\n..", b"\r\n.")
            if data.startswith(b".."):
                data = data[1:]
        return data

    async def retr_match(self, number: int, expected: ExpectedBodies) -> tuple[int, int | None]:
        """RETR ``number``: (octets received before the terminator, which body they are).

        The body is compared in place, dot-stuffed as received, with the expected
        bodies of its length (``ExpectedBodies.match``, memcmp): no copy, no hash and
        no un-stuffing pass, so the load generator spends little CPU per byte and the
        server gets the rest of the cores. None means no expected body matched.
        """
        status = await self.command(f"RETR {number}")
        end = await self._terminated(_announced_octets(status))
        buffer = self.buffer
        start = buffer.start
        buffer.start = end + 3
        return end - start, expected.match(buffer.data, start, end)

    async def multi(self, text: str) -> bytes:
        status = await self.command(text)
        return await self.body(_announced_octets(status) if text.startswith("RETR") else 0)

    async def login(self, user: str, password: str, mechanism: str = "user") -> None:
        if mechanism == "plain":
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await self.command(f"AUTH PLAIN {token}")
        else:
            await self.command(f"USER {user}")
            await self.command(f"PASS {password}")

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            await self.close()

    async def close(self) -> None:
        self.transport.close()
        buffer = self.buffer
        if buffer.closed is None:
            with contextlib.suppress(Pop3Error, OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(buffer.wait_for(1 << 62), 5)


@dataclass
class Result:
    """One scenario's figure with the CPU both sides used meanwhile."""

    value: float
    unit: str
    wall: float
    server_cpu: float
    client_cpu: float
    extra: dict[str, float] = field(default_factory=dict)


Body = Callable[[], Awaitable[tuple[float, str, dict[str, float]]]]


async def measured(server: Server, body: Body) -> Result:
    """Run ``body`` and attach wall time and the CPU of server tree and load generator."""
    cpu0 = server.cpu_seconds()
    own0 = time.process_time()
    start = time.perf_counter()
    value, unit, extra = await body()
    wall = time.perf_counter() - start
    own = time.process_time() - own0
    cpu = server.cpu_seconds() - cpu0
    return Result(value, unit, wall, cpu, own, extra)


async def login_rate(server: Server, users: Sequence[str], password: str, *, clients: int,
                     security: str, tls: ssl.SSLContext, duration: float,
                     mechanism: str = "user") -> Result:
    """Complete sessions per second: connect, [TLS], login, STAT, QUIT."""

    async def one_client(user: str, deadline: float, counts: list[int]) -> None:
        while time.perf_counter() < deadline:
            try:
                client = await Pop3Client.connect(server, security, tls)
                await client.login(user, password, mechanism)
                await client.command("STAT")
                await client.quit()
            except (OSError, ssl.SSLError, Pop3Error):
                # A refused or reset session is not a login; it is counted apart and
                # shown in the report, and the client tries again.
                counts[1] += 1
                continue
            counts[0] += 1

    async def body() -> tuple[float, str, dict[str, float]]:
        counts = [0, 0]
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(one_client(users[i % len(users)], deadline, counts)
                               for i in range(clients)))
        elapsed = time.perf_counter() - start
        return counts[0] / elapsed, "logins/s", {"sessions": counts[0], "failed": counts[1]}

    return await measured(server, body)


class ExpectedBodies:
    """The stuffed bodies a full download of a mailbox must produce, in any order.

    Received bytes are found among the bodies of their length and compared with
    ``bytearray.startswith`` (a memcmp): byte-exact, the same check for every server,
    at a small fraction of a hash's CPU. Identical bodies count as one body expected
    as many times.
    """

    def __init__(self, bodies: Sequence[bytes]) -> None:
        first: dict[bytes, int] = {}
        self.by_length: dict[int, list[tuple[int, bytes]]] = {}
        self.counts: Counter[int] = Counter()
        for index, body in enumerate(bodies):
            which = first.setdefault(body, index)
            if which == index:
                self.by_length.setdefault(len(body), []).append((index, body))
            self.counts[which] += 1

    def match(self, data: bytearray, start: int, end: int) -> int | None:
        """Which expected body ``data[start:end]`` is, or None."""
        for which, body in self.by_length.get(end - start, ()):
            if data.startswith(body, start):
                return which
        return None


async def download_mailbox(client: Pop3Client, expected: ExpectedBodies, mailbox: str) -> int:
    """RETR every message; check them byte-exact against ``expected``; return octets."""
    stat = await client.command("STAT")
    count = int(stat.split()[1])
    got: Counter[int | None] = Counter()
    octets = 0
    for number in range(1, count + 1):
        size, which = await client.retr_match(number, expected)
        octets += size
        got[which] += 1
    if got != expected.counts:
        raise Pop3Error(f"{mailbox}: downloaded messages differ from the generated ones")
    return octets


async def retr_throughput(server: Server, users: Sequence[str],
                          manifests: dict[str, MailboxManifest], password: str, *,
                          clients: int, security: str, tls: ssl.SSLContext,
                          duration: float) -> Result:
    """MB/s of whole-mailbox downloads, every message checked byte-exact.

    Each client downloads its own mailbox again and again (without DELE) until the
    duration is over, finishing the session it is in.
    """

    expected = {user: ExpectedBodies(manifests[user].stuffed_bodies) for user in users[:clients]}

    async def one_client(user: str, deadline: float, totals: list[int]) -> None:
        while True:
            client = await Pop3Client.connect(server, security, tls)
            await client.login(user, password)
            # Not ``totals[0] += await ...``: that reads totals[0] before the await and
            # writes it back after, losing what the other clients added meanwhile (with
            # 4 clients about three quarters of the octets went uncounted).
            octets = await download_mailbox(client, expected[user], user)
            totals[0] += octets
            totals[1] += len(manifests[user].hashes)
            await client.quit()
            if time.perf_counter() >= deadline:
                return

    async def body() -> tuple[float, str, dict[str, float]]:
        totals = [0, 0]
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(one_client(users[i], deadline, totals) for i in range(clients)))
        elapsed = time.perf_counter() - start
        return totals[0] / elapsed / 1e6, "MB/s", {"octets": totals[0], "messages": totals[1]}

    result = await measured(server, body)
    gigabytes = result.extra["octets"] / 1e9
    result.extra["server_cpu_s_per_gb"] = result.server_cpu / gigabytes
    result.extra["client_cpu_s_per_gb"] = result.client_cpu / gigabytes
    return result


async def bigbox_login(server: Server, user: str, password: str, expected: int) -> Result:
    """Seconds from connect to the last line of UIDL on a big maildrop."""

    async def body() -> tuple[float, str, dict[str, float]]:
        start = time.perf_counter()
        client = await Pop3Client.connect(server, "plain", None)
        await client.login(user, password)
        listing = await client.multi("UIDL")
        elapsed = time.perf_counter() - start
        lines = listing.count(b"\r\n")
        await client.quit()
        if lines != expected:
            raise Pop3Error(f"UIDL listed {lines} messages, expected {expected}")
        return elapsed, "s", {}

    return await measured(server, body)


# Sessions opened and closed before the idle baseline is taken.
WARMUP_SESSIONS: Final = 100


async def idle_memory(server: Server, users: Sequence[str], password: str, *, security: str,
                      tls: ssl.SSLContext, settle: float = 2.0, parallel: int = 50) -> Result:
    """PSS of the server tree per authenticated idle session, above the baseline."""

    async def body() -> tuple[float, str, dict[str, float]]:
        gate = asyncio.Semaphore(parallel)

        async def warm_one(user: str) -> None:
            async with gate:
                client = await Pop3Client.connect(server, security, tls)
                await client.login(user, password)
                await client.command("STAT")
                await client.quit()

        # One-time costs (thread pools, loaded passwd files, TLS contexts, forked
        # helper processes) belong in the baseline, not in the per-session figure.
        await asyncio.gather(*(warm_one(user) for user in users[:WARMUP_SESSIONS]))
        await asyncio.sleep(settle)
        baseline = server.pss_kib()
        procs0 = server.process_count()
        clients: list[Pop3Client] = []

        async def open_one(user: str) -> None:
            async with gate:
                client = await Pop3Client.connect(server, security, tls)
                await client.login(user, password)
                await client.command("STAT")
                clients.append(client)

        try:
            await asyncio.gather(*(open_one(user) for user in users))
            await asyncio.sleep(settle)
            loaded = server.pss_kib()
            procs = server.process_count()
            # Every session must still answer: an idle session the server dropped
            # would make the memory figure a lie.
            for client in clients:
                client.write(b"NOOP\r\n")
            for client in clients:
                await client.expect_ok()
        finally:
            await asyncio.gather(*(client.close() for client in clients),
                                 return_exceptions=True)
        per_session = (loaded - baseline) / len(users)
        return per_session, "KiB/session", {
            "sessions": len(users), "baseline_kib": baseline, "loaded_kib": loaded,
            "processes_before": procs0, "processes_loaded": procs,
        }

    return await measured(server, body)


PIPELINE_MIX: Final = ("STAT", "LIST 1", "UIDL 2", "NOOP")


async def pipeline(server: Server, user: str, password: str, *, commands: int = 1000,
                   rounds: int = 20) -> Result:
    """Median milliseconds from one write of ``commands`` commands to the last reply."""

    async def body() -> tuple[float, str, dict[str, float]]:
        client = await Pop3Client.connect(server, "plain", None)
        await client.login(user, password)
        burst = "".join(f"{PIPELINE_MIX[i % len(PIPELINE_MIX)]}\r\n"
                        for i in range(commands)).encode()
        times: list[float] = []
        for _ in range(rounds):
            start = time.perf_counter()
            client.write(burst)
            for _ in range(commands):
                await client.expect_ok()
            times.append(time.perf_counter() - start)
        await client.quit()
        times.sort()
        return times[len(times) // 2] * 1000, "ms", {"best_ms": times[0] * 1000}

    return await measured(server, body)


# Concurrent LMTP connections of the churn scenario's deliveries at most (Postfix's
# default_destination_concurrency_limit is 20; a handful keeps 50/s going).
LMTP_CONNECTIONS: Final = 8


class Deliverer:
    """Puts new mail into the churn users' mailboxes over the server's own LMTP.

    Both servers get their mail the same way, one message per transaction, so the
    delivery is the server's work in either figure.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _lmtp_reply(self) -> bytes:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise Pop3Error("LMTP connection closed")
            if line[3:4] != b"-":
                if not line.startswith(b"2") and not line.startswith(b"3"):
                    raise Pop3Error(f"LMTP: {line!r}")
                return line

    async def deliver(self, user: str, data: bytes) -> None:
        """Deliver ``data`` (LF or CRLF line ends) to ``user``; return on its 250.

        MAIL, RCPT and DATA go in one write (PIPELINING, which both servers offer
        and Postfix's LMTP client uses), then the message.
        """
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.server.host, self.server.lmtp_port)
            await self._lmtp_reply()
            self.writer.write(b"LHLO bench.example\r\n")
            await self._lmtp_reply()
        stuffed = data.replace(b"\r\n", b"\n").replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.writer.write(b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                          % user.encode())
        for _ in range(3):
            await self._lmtp_reply()
        self.writer.write(stuffed + b".\r\n")
        await self._lmtp_reply()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError, Pop3Error):
                await self._lmtp_reply()
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = self.reader = None


async def mailbox_counts(server: Server, users: Sequence[str], password: str) -> Counter[str]:
    """Each user's message count as the server's POP3 side shows it (STAT)."""
    counts: Counter[str] = Counter()
    for user in users:
        client = await Pop3Client.connect(server, "plain", None)
        await client.login(user, password)
        counts[user] = int((await client.command("STAT")).split()[1])
        await client.quit()
    return counts


def check_churn_accounting(before: Counter[str], delivered: Counter[str],
                           retrieved: Counter[str], after: Counter[str], failed: int) -> None:
    """Every message delivered over LMTP was seen over POP3 exactly once, or is still there.

    Per user: messages before + delivered = retrieved and deleted by the polls + left
    after. A failed poll may have committed its deletions before it broke, uncounted,
    so with failures the retrieved side may only fall short, never exceed.
    """
    for user in sorted(set(before) | set(delivered) | set(retrieved) | set(after)):
        arrived = before[user] + delivered[user]
        accounted = retrieved[user] + after[user]
        if accounted > arrived or (accounted < arrived and not failed):
            raise Pop3Error(
                f"churn: {user} had {before[user]} messages and was delivered "
                f"{delivered[user]}, but the polls retrieved {retrieved[user]} and "
                f"{after[user]} are left")


async def churn(server: Server, users: Sequence[str], password: str, *, duration: float,
                deliveries_per_second: float, message_source: Callable[[int], bytes]) -> Result:
    """Poll sessions per second: STAT, UIDL, RETR all, DELE all, QUIT, while mail arrives.

    Mail arrives over the server's LMTP. Outside the measured time, each mailbox is
    counted before and after, and every delivered message must have been retrieved by
    a poll or still be there (``check_churn_accounting``).
    """
    delivered: Counter[str] = Counter()
    retrieved: Counter[str] = Counter()

    async def poller(user: str, deadline: float, totals: list[int]) -> None:
        while time.perf_counter() < deadline:
            try:
                client = await Pop3Client.connect(server, "plain", None)
                await client.login(user, password)
                stat = await client.command("STAT")
                count = int(stat.split()[1])
                await client.multi("UIDL")
                for number in range(1, count + 1):
                    await client.multi(f"RETR {number}")
                for number in range(1, count + 1):
                    await client.command(f"DELE {number}")
                await client.quit()
            except (OSError, Pop3Error):
                totals[3] += 1
                continue
            totals[0] += 1
            totals[1] += count
            retrieved[user] += count

    async def delivery(deadline: float, totals: list[int]) -> None:
        # Deliveries start at the offered rate whatever each one takes, on as many
        # connections as are busy (up to an MTA's concurrency), so a slow delivery
        # does not lower the load the server is measured under.
        idle: list[Deliverer] = []
        every: list[Deliverer] = []
        running: set[asyncio.Task[None]] = set()
        free = asyncio.Semaphore(LMTP_CONNECTIONS)
        rng = random.Random(7)
        interval = 1.0 / deliveries_per_second

        async def one(deliverer: Deliverer, user: str, data: bytes) -> None:
            try:
                await deliverer.deliver(user, data)
                delivered[user] += 1
                totals[2] += 1
            finally:
                idle.append(deliverer)
                free.release()

        next_at = time.perf_counter()
        try:
            while (now := time.perf_counter()) < deadline:
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at += interval
                await free.acquire()
                if not idle:
                    every.append(Deliverer(server))
                    idle.append(every[-1])
                data = message_source(totals[4])
                totals[4] += 1
                task = asyncio.create_task(one(idle.pop(), rng.choice(users), data))
                running.add(task)
                task.add_done_callback(running.discard)
            # The last ones finish (and are counted) before the mailboxes are.
            await asyncio.gather(*running)
        finally:
            for deliverer in every:
                await deliverer.close()

    # sessions, messages retrieved, delivered, failed sessions, deliveries started
    totals = [0, 0, 0, 0, 0]

    async def body() -> tuple[float, str, dict[str, float]]:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(delivery(deadline, totals),
                             *(poller(user, deadline, totals) for user in users))
        elapsed = time.perf_counter() - start
        return totals[0] / elapsed, "sessions/s", {
            "sessions": totals[0], "retrieved": totals[1], "delivered": totals[2],
            "failed": totals[3]}

    before = await mailbox_counts(server, users, password)
    result = await measured(server, body)
    after = await mailbox_counts(server, users, password)
    check_churn_accounting(before, delivered, retrieved, after, totals[3])
    return result
