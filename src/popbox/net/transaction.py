"""The transaction stage: one locked maildrop, streamed bodies, and the QUIT commit.

This side of a session sees exactly one Maildrop and never a credential. Bodies go
from ``maildrop.read_message`` through a ``WireEncoder`` to the transport chunk by
chunk, waiting on the transport's flow control, so a 200 MB RETR holds only a chunk
or two in memory. A RETR of a wire-ready file (``Maildrop.open_wire_ready``) on a
plain connection skips all that: the outlet sends the file itself (net.zerocopy).
Whatever ends the session other than QUIT releases the maildrop
without deleting (RFC 1939 section 6, DESIGN.md).
"""

from __future__ import annotations

import logging
import os
from typing import Final, Protocol

from popbox.errors import StoreError
from popbox.net.log import SessionStats
from popbox.proto.events import Quit, Retrieve
from popbox.proto.server import ServerConnection
from popbox.proto.wire import WireEncoder
from popbox.store.base import Maildrop, WireReadyFile
from popbox.wireform import DotStuffer

__all__ = ["BodyInterrupted", "Outlet", "TransactionStage"]

log = logging.getLogger("popbox.pop3")

# Encoded output is gathered up to this size before one gathered write: four of the
# Maildir store's 64 KiB chunks per syscall and per flow-control wait, while a session
# still holds well under 1 MiB (this batch plus the transport's 256 KiB high water).
WRITE_BATCH: Final = 256 * 1024


class Outlet(Protocol):
    """Where the stage writes: the session's transport, behind its flow control."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: list[bytes]) -> None:
        """Write the pieces in order, as one gathered write where the transport can."""
        ...

    async def drain(self) -> None:
        """Return once the transport wants more; raise ConnectionError if it is gone."""
        ...

    @property
    def can_send_files(self) -> bool:
        """Whether ``send_file`` works here: a plain socket, no TLS layer in between."""
        ...

    async def send_file(self, head: bytes, file: WireReadyFile) -> int | None:
        """Send ``head``, then the file's dot-stuffed wire form and the terminator.

        Returns the octets sent after ``head``, or None if it could not start (nothing
        was sent; out of file descriptors). Raises ConnectionError if the peer left,
        another OSError if the file could not be read.
        """
        ...


class BodyInterrupted(Exception):
    """The store failed after the +OK went out; the session must close, not go on.

    The client cannot tell a truncated body from a whole one except by the missing
    terminator, so the only honest thing left is to drop the connection.
    """


class TransactionStage:
    """The post-login half of a session: owns the maildrop until commit or release."""

    __slots__ = ("_finished", "_maildrop", "_session_id", "_stats")

    def __init__(self, maildrop: Maildrop, stats: SessionStats, session_id: str) -> None:
        self._maildrop = maildrop
        self._stats = stats
        self._session_id = session_id
        self._finished = False

    @property
    def messages_count(self) -> int:
        return len(self._maildrop.messages)

    async def retrieve(self, conn: ServerConnection, event: Retrieve, out: Outlet) -> None:
        """Answer RETR or TOP: the +OK line, the dot-stuffed body, the terminator.

        If the message cannot be opened the client gets ``-ERR [SYS/TEMP]`` and the
        session goes on; if the store fails mid-body, BodyInterrupted is raised.
        """
        if event.body_lines is None:
            try:
                ready = await self._maildrop.open_wire_ready(event.index)
            except StoreError as exc:
                self._unavailable(conn, event, out, exc)
                return
            if ready is not None:
                with ready:
                    if not (out.can_send_files and await self._send_file(conn, event, out, ready)):
                        await self._stream_wire_ready(conn, event, out, ready)
                return
        chunks = self._maildrop.read_message(event.index)
        try:
            try:
                first = await anext(chunks, b"")
            except StoreError as exc:
                self._unavailable(conn, event, out, exc)
                return
            encoder = WireEncoder(event.body_lines)
            # The +OK line goes out with the first piece of the body, and the
            # terminator with the last: one gathered write each, no concatenation.
            batch = [conn.message_start(event), encoder.encode(first)]
            batched = len(batch[1])
            sent = 0
            try:
                while not encoder.done:
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    encoded = encoder.encode(chunk)
                    batch.append(encoded)
                    batched += len(encoded)
                    if batched >= WRITE_BATCH:
                        out.writelines(batch)
                        sent += batched
                        batch = []
                        batched = 0
                        await out.drain()
            except StoreError as exc:
                # What was read goes out, so the client sees the +OK and a body that
                # stops without its terminator rather than a silent drop.
                out.writelines(batch)
                raise BodyInterrupted(f"message {event.number}: {exc}") from exc
            ending = encoder.finish()
            batch.append(ending)
            out.writelines(batch)
            sent += batched + len(ending)
            await out.drain()
        finally:
            # TOP stops early and a client may vanish mid-body: close the store's
            # generator now so its file handle does not wait for the garbage collector.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        if event.body_lines is None:
            self._retrieved(event, sent)
        else:
            self._stats.tops += 1

    async def _send_file(
        self, conn: ServerConnection, event: Retrieve, out: Outlet, ready: WireReadyFile
    ) -> bool:
        """Send by the outlet's zero-copy path; False if it could not start (nothing sent)."""
        try:
            sent = await out.send_file(conn.message_start(event), ready)
        except ConnectionError:
            raise  # the peer left: the session ends as for any lost connection
        except OSError as exc:
            # The file failed mid-body (an I/O error, a file cut short): as with a
            # store failure while streaming, the session must end.
            raise BodyInterrupted(f"message {event.number}: {exc}") from exc
        if sent is None:
            return False
        self._retrieved(event, sent)
        return True

    async def _stream_wire_ready(
        self, conn: ServerConnection, event: Retrieve, out: Outlet, ready: WireReadyFile
    ) -> None:
        """RETR of a wire-ready file through the transport (TLS): only the dots to add.

        Reads happen on the event loop, as read_message's do (a page-cache read is
        cheaper than a hop to a thread). The caller closes ``ready``.
        """
        batch = [conn.message_start(event)]
        batched = 0
        sent = 0
        remaining = ready.size
        stuffer = DotStuffer()
        while remaining > 0:
            try:
                chunk = os.read(ready.fd, min(remaining, WRITE_BATCH))
            except OSError as exc:
                out.writelines(batch)
                raise BodyInterrupted(f"message {event.number}: {exc}") from exc
            if not chunk:
                out.writelines(batch)
                raise BodyInterrupted(
                    f"message {event.number}: file ended {remaining} octets early"
                )
            remaining -= len(chunk)
            wire = stuffer.stuff(chunk)
            batch.append(wire)
            batched += len(wire)
            if batched >= WRITE_BATCH and remaining > 0:
                out.writelines(batch)
                sent += batched
                batch = []
                batched = 0
                await out.drain()
        ending = stuffer.ending()
        batch.append(ending)
        out.writelines(batch)
        sent += batched + len(ending)
        await out.drain()
        self._retrieved(event, sent)

    def _retrieved(self, event: Retrieve, sent: int) -> None:
        """A whole RETR went out (TOP does not count): a retention counts from the
        first one (RFC 2449 EXPIRE), so the maildrop hears of it."""
        self._stats.retrieved += 1
        self._stats.bytes_retrieved += sent
        self._maildrop.mark_retrieved(event.index)

    def _unavailable(
        self, conn: ServerConnection, event: Retrieve, out: Outlet, exc: StoreError
    ) -> None:
        log.warning(
            "session=%s message %d unavailable: %s",
            self._session_id, event.number, exc, exc_info=exc,
        )
        out.write(conn.message_unavailable(event))

    async def quit(self, conn: ServerConnection, event: Quit) -> bytes:
        """Commit the deletions durably, then return QUIT's reply (RFC 1939 UPDATE state).

        A failed commit answers ``-ERR [SYS/TEMP]``; the store released the lock either
        way, so this stage is finished.
        """
        self._finished = True
        ok = True
        try:
            await self._maildrop.commit_deletions(event.deletions)
        except StoreError as exc:
            ok = False
            log.error(
                "session=%s user=%s deletions not committed: %s",
                self._session_id, self._stats.user, exc, exc_info=exc,
            )
        else:
            self._stats.deleted = len(event.deletions)
        remaining = self.messages_count - (len(event.deletions) if ok else 0)
        return conn.quit_result(ok, remaining)

    async def release(self) -> None:
        """End without deleting anything (drop, timeout, shutdown, error). Idempotent."""
        if self._finished:
            return
        self._finished = True
        try:
            await self._maildrop.release()
        except StoreError as exc:
            log.error(
                "session=%s user=%s maildrop release failed: %s",
                self._session_id, self._stats.user, exc, exc_info=exc,
            )

    @property
    def finished(self) -> bool:
        return self._finished
