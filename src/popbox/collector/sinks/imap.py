"""The IMAP sink: APPEND each message into a folder of an IMAP server (Gmail, Microsoft
365, Fastmail, Dovecot), the bridge for POP3 mailboxes whose mail lives over there now.

This module shapes the messages (CRLF line ends, the id header, INTERNALDATE), finds
them again and APPENDs them; ``imap_connection`` opens, logs in and pools the
connections (IMAPClient, in worker threads).

Exactly once. APPEND gives no way to say "this message, once": a kill -9 after the
server stored a message and before the poll engine recorded it leaves a message that
the next run offers again. So before appending a message whose earlier attempt may
have reached the server (``message.attempt > 1``, or an APPEND of this process that
got no answer), the sink looks it up in the folder: by the ``X-Popbox-Id`` header it
added (``identify = "header"``), or by Message-ID and exact size
(``identify = "message_id"``; a message without Message-ID cannot be found again).
Found means delivered; it is not appended again.

Outcomes:

- the mailbox's trouble, whichever message it is: SinkUnavailable, the run stops and
  no message is counted as failed (``imap_connection``: login refused, TLS, no
  password or token; here: the server unreachable after a second try, the folder
  missing with ``create_folder`` off or not creatable). A dead OAuth2 login is a
  TemporarySinkError caused by OAuthLoginRequired, which stops the run too;
- a lost connection (network errors, timeouts, BYE) is reopened once, then
  TemporarySinkError, as are ``NO [OVERQUOTA]``, ``NO [TRYCREATE]`` for a folder
  just created and any other refusal (the message waits on the POP3 server and
  counts an attempt);
- ``NO [TOOBIG]`` or ``NO [LIMIT]`` (Dovecot's answer to a message over its size
  limit), or a message over the server's ``APPENDLIMIT`` (RFC 7889, checked before
  sending): PermanentSinkError (quarantine).

Passwords and tokens never reach logs or error text: errors quote the server's
answers only.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.imap_connection import (
    ConnectionLost,
    ConnectionPool,
    ImapConnection,
    Refused,
    Unreachable,
    checked,
)
from popbox.collector.sinks.message_head import popbox_id, read_head
from popbox.errors import (
    OAuthLoginRequired,
    PermanentSinkError,
    SinkError,
    SinkUnavailable,
    TemporarySinkError,
)

if TYPE_CHECKING:
    from popbox.collector.config import ImapSinkSettings
    from popbox.collector.sinks import SinkContext
    from popbox.collector.tokens import TokenProvider

__all__ = ["ImapSink", "create_sink"]

log = logging.getLogger(__name__)

# One MULTIAPPEND (RFC 3502) carries at most this many messages: with LITERAL+ the
# whole command is one round trip, and fifty keeps a refused batch cheap to redo.
MULTIAPPEND_MAX_MESSAGES: Final = 50
# ... and at most this many octets (a message alone may be bigger): the bytes of the
# batches in flight sit in memory, one batch per connection.
MULTIAPPEND_MAX_BYTES: Final = 8 * 1024 * 1024
# Keys this process appended (or sent without an answer) that it remembers: the poll
# engine offers a failed batch's messages again within the same run, so a few
# batches' worth is enough.
KEY_MEMORY_MAX: Final = 4096

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)
# IMAP message text has CRLF line ends only (RFC 3501 section 4.3): a bare CR or LF
# becomes CRLF, as imaplib would do anyway for a single APPEND.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def create_sink(settings: ImapSinkSettings, context: SinkContext) -> ImapSink:
    tokens = context.token_provider(settings) if settings.auth == "oauth2" else None
    return ImapSink(settings, tokens)


@dataclass(slots=True)
class _Item:
    """One message as it will be appended."""

    message: FetchedMessage
    data: bytes
    date: datetime | None
    criteria: list[str | int] | None
    """The UID SEARCH that finds it again; None when nothing can (no Message-ID)."""

    @property
    def key(self) -> str:
        return self.message.idempotency_key


class _KeyMemory:
    """A bounded set of idempotency keys, oldest forgotten first."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > KEY_MEMORY_MAX:
            self._keys.popitem(last=False)

    def discard(self, key: str) -> None:
        self._keys.pop(key, None)


class ImapSink:
    """APPENDs messages into ``settings.folder``; a BatchSink (MULTIAPPEND if offered)."""

    def __init__(self, settings: ImapSinkSettings, tokens: TokenProvider | None) -> None:
        self.settings = settings
        self._pool = ConnectionPool(settings, tokens)
        self._appended = _KeyMemory()
        self._uncertain = _KeyMemory()

    @property
    def name(self) -> str:
        return self.settings.label

    async def deliver(self, message: FetchedMessage) -> None:
        await self.deliver_batch([message])

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        todo = [m for m in messages if m.idempotency_key not in self._appended]
        if not todo:
            return
        queue = list(_chunks(todo, self.settings.connections))
        queue.reverse()
        errors: list[BaseException] = []

        async def worker() -> None:
            while queue and not errors:
                chunk = queue.pop()
                try:
                    items = await asyncio.to_thread(self._prepare, chunk)
                    await self._deliver_chunk(items)
                except Exception as exc:
                    errors.append(exc)

        workers = min(self.settings.connections, len(queue))
        await asyncio.gather(*(worker() for _ in range(workers)))
        if errors:
            # The mailbox's trouble wins (the run stops, no message is blamed); then a
            # refusal for good: the poll engine offers each message alone, and only
            # the refused one is quarantined.
            for wanted in (_mailbox_trouble, _refused_for_good):
                for error in errors:
                    if wanted(error):
                        raise error
            raise errors[0]

    async def close(self) -> None:
        await self._pool.close()

    # ---------------------------------------------------------------- messages

    def _prepare(self, messages: Sequence[FetchedMessage]) -> list[_Item]:
        """Read and shape the messages (in a worker thread: files, hashing)."""
        items = []
        for message in messages:
            try:
                data = message.read_bytes()
            except OSError as exc:
                raise TemporarySinkError(
                    f"{self.name}: cannot read spooled message: {exc}"
                ) from exc
            if _BARE_LINE_END.search(data):
                data = _BARE_LINE_END.sub(b"\r\n", data)
            head = read_head(data)
            date, message_id = head.date, head.message_id
            criteria: list[str | int] | None
            if self.settings.identify == "header":
                value = popbox_id(message)
                data = f"{self.settings.id_header}: {value}\r\n".encode() + data
                criteria = ["HEADER", self.settings.id_header, value]
            elif message_id is not None:
                # RFC 3501 section 6.4.4: LARGER and SMALLER are strict, so the two
                # together mean exactly this size.
                size = len(data)
                criteria = [
                    "HEADER",
                    "Message-ID",
                    message_id,
                    "LARGER",
                    size - 1,
                    "SMALLER",
                    size + 1,
                ]
            else:
                criteria = None
            if self.settings.internal_date == "now":
                date = None
            items.append(_Item(message, data, date, criteria))
        return items

    async def _deliver_chunk(self, items: list[_Item]) -> None:
        """Append ``items`` on one connection, reopened once if it breaks."""
        for attempt in (1, 2):
            try:
                async with self._pool.connection() as connection:
                    await self._append(connection, items)
                return
            except Unreachable as exc:
                if attempt == 2:
                    # Refused, no such host, timed out, twice: the server is down.
                    raise SinkUnavailable(f"{self.name}: {exc}") from exc
                log.info("imap server unreachable sink=%s: %s; trying again", self.name, exc)
            except ConnectionLost as exc:
                if attempt == 2:
                    raise TemporarySinkError(f"{self.name}: connection lost: {exc}") from exc
                log.info("imap connection lost sink=%s: %s; reconnecting", self.name, exc)
            except (Refused, imaplib.IMAP4.error) as exc:
                # A NO or BAD outside APPEND (SEARCH, CAPABILITY): the server's trouble.
                raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def _append(self, connection: ImapConnection, items: list[_Item]) -> None:
        limit = connection.append_limit
        for item in items:
            if limit is not None and len(item.data) > limit:
                raise PermanentSinkError(
                    f"{self.name}: message of {len(item.data)} octets is over the "
                    f"server's APPENDLIMIT of {limit}"
                )
        suspect = [i for i in items if i.message.attempt > 1 or i.key in self._uncertain]
        if suspect:
            found = await connection.call(self._look_up, connection, suspect)
            for item in suspect:
                if item.key in found:
                    log.info(
                        "already in the folder sink=%s account=%s uid=%s attempt=%d",
                        self.name,
                        item.message.account,
                        item.message.uidl,
                        item.message.attempt,
                    )
                    self._taken(item)
            items = [i for i in items if i.key not in found]
        if not items:
            return
        for item in items:
            self._uncertain.add(item.key)
        try:
            try:
                await connection.call(self._append_items, connection, items)
            except Refused as exc:
                if exc.code != "TRYCREATE":
                    raise
                await self._create_folder(connection, exc)
                await connection.call(self._append_items, connection, items)
        except (Refused, SinkUnavailable) as exc:
            # A tagged NO: nothing of this command was stored (RFC 3502 section 6.3.11).
            for item in items:
                self._uncertain.discard(item.key)
            if isinstance(exc, SinkUnavailable):
                raise
            raise self._refusal(exc) from exc
        for item in items:
            self._taken(item)

    def _taken(self, item: _Item) -> None:
        self._appended.add(item.key)
        self._uncertain.discard(item.key)

    async def _create_folder(self, connection: ImapConnection, trycreate: Refused) -> None:
        """Create the missing folder, or fail the run: without it no message fits."""
        folder = self.settings.folder
        if not self.settings.create_folder:
            why = f"folder {folder!r} does not exist (create_folder is off)"
            raise SinkUnavailable(f"{self.name}: {why}: {trycreate}") from trycreate
        try:
            await connection.call(self._create_folder_now, connection)
        except Refused as exc:
            raise SinkUnavailable(f"{self.name}: cannot create folder {folder!r}: {exc}") from exc

    def _refusal(self, exc: Refused) -> SinkError:
        folder = self.settings.folder
        if exc.code in ("TOOBIG", "LIMIT"):
            # TOOBIG (RFC 7889), or LIMIT (RFC 5530) as Dovecot answers a message over
            # its size limit: the same message will never fit.
            return PermanentSinkError(
                f"{self.name}: the server refuses the message as too big: {exc}"
            )
        if exc.code == "TRYCREATE":
            # Just created, and gone again (another program deleted it meanwhile).
            return TemporarySinkError(f"{self.name}: folder {folder!r} does not exist: {exc}")
        if exc.code == "OVERQUOTA":
            return TemporarySinkError(f"{self.name}: the mailbox is over quota: {exc}")
        return TemporarySinkError(f"{self.name}: APPEND refused: {exc}")

    # ---------------------------------------------------------------- in the thread

    def _look_up(self, connection: ImapConnection, items: list[_Item]) -> set[str]:
        """Keys of ``items`` already in the folder (EXAMINE, UID SEARCH, CLOSE)."""
        client = connection.client
        searchable = [i for i in items if i.criteria is not None]
        if not searchable:
            return set()
        try:
            client.select_folder(self.settings.folder, readonly=True)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error:
            return set()  # no such folder (yet): nothing can be in it
        found = set()
        try:
            for item in searchable:
                assert item.criteria is not None
                uids = checked(client.search, item.criteria)
                if uids:
                    found.add(item.key)
        finally:
            # Leave the folder: APPENDs to a selected folder pile up EXISTS answers.
            checked(client.close_folder)
        return found

    def _append_items(self, connection: ImapConnection, items: list[_Item]) -> None:
        client = connection.client
        folder = self.settings.folder
        flags = list(self.settings.flags)
        if connection.multiappend:
            # Even for one message: IMAPClient sends MULTIAPPEND literals with LITERAL+
            # (one round trip), imaplib's own APPEND waits for the continuation.
            batch: list[dict[str, Any]] = []
            for item in items:
                entry: dict[str, Any] = {"msg": item.data, "flags": flags}
                if item.date is not None:
                    entry["date"] = item.date
                batch.append(entry)
            status, data = checked(client.multiappend, folder, batch)
            answer = _first_bytes(data)
            if status != "OK":
                raise Refused(answer.decode("utf-8", "replace"))
            self._note_appenduid(answer, len(items))
            return
        for item in items:
            answer = checked(client.append, folder, item.data, flags, item.date)
            self._note_appenduid(bytes(answer or b""), 1)

    def _create_folder_now(self, connection: ImapConnection) -> None:
        client = connection.client
        try:
            checked(client.create_folder, self.settings.folder)
            log.info("created folder sink=%s folder=%s", self.name, self.settings.folder)
        except Refused as exc:
            # Another connection (or mail program) may have created it meanwhile.
            if exc.code != "ALREADYEXISTS" and not checked(
                client.folder_exists, self.settings.folder
            ):
                raise

    def _note_appenduid(self, answer: bytes, count: int) -> None:
        match = _APPENDUID.search(answer)
        if match:
            log.debug(
                "appended sink=%s messages=%d uidvalidity=%s uid=%s",
                self.name,
                count,
                match.group(1).decode(),
                match.group(2).decode(),
            )


def _mailbox_trouble(error: BaseException) -> bool:
    return isinstance(error, SinkUnavailable) or isinstance(error.__cause__, OAuthLoginRequired)


def _refused_for_good(error: BaseException) -> bool:
    return isinstance(error, PermanentSinkError)


def _first_bytes(data: object) -> bytes:
    if isinstance(data, list) and data and isinstance(data[0], bytes):
        return data[0]
    return b""


def _chunks(messages: Iterable[FetchedMessage], connections: int) -> Iterable[list[FetchedMessage]]:
    """The messages in order, split so every connection gets some, each piece at most
    MULTIAPPEND_MAX_MESSAGES messages and (unless one message is bigger) bytes."""
    messages = list(messages)
    per_piece = max(1, min(MULTIAPPEND_MAX_MESSAGES, math.ceil(len(messages) / connections)))
    piece: list[FetchedMessage] = []
    octets = 0
    for message in messages:
        if piece and (len(piece) >= per_piece or octets + message.size > MULTIAPPEND_MAX_BYTES):
            yield piece
            piece, octets = [], 0
        piece.append(message)
        octets += message.size
    if piece:
        yield piece
