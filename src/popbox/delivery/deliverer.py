"""Deliver one message to one recipient: map, look up, size, quota, trace headers, store.

Both ways mail comes in (the LMTP listener and ``popbox deliver``) go through the same
``Deliverer`` so that an MTA gets the same verdict from either. Verdicts are popbox
errors, and each front end turns them into its own answer (an LMTP reply line, a
sysexits code)::

    UnknownRecipient        no such user (or not our domain)     550 5.1.1 / 67
    MessageTooBig           over lmtp.max_message_size           552 5.3.4 / 65
    QuotaExceeded           over the user's quota                452 4.2.2 / 75
                            (permanent per quota.over_quota)     552 5.2.2 / 77
    TemporaryDeliveryError  our own fault (store, user database) 451 4.3.0 / 75

Quota rules: a per-user value from the user database (``UserRecord.quota_*``, filled
from the passwd file's extra fields like Dovecot's ``userdb_quota_rule``) wins over
``[quota]`` in the config; 0 means no limit. Sizes are wire sizes (CRLF octets), the
same numbers the store reports and POP3's LIST shows, so "2 MB used" means the same
everywhere. The check and the write are not one atomic step: two deliveries racing
for the last free octets may both pass, exactly as with Dovecot's quota plug-in; a
quota is a bound on growth, not an exact ledger.

Every delivery over LMTP or ``popbox deliver`` carries a delivery id (``delivery_id``:
a digest of the user, the folder and the message exactly as received, before popbox
adds anything to it), so an MTA that retries after losing our 250 (a connection cut
after DATA) makes a store that records ids (PostgreSQL, memory) return the first
copy's key instead of storing a second. Replies per recipient are unchanged.

A detail in the address (``alice+invoices@``) or ``popbox deliver -m`` asks for a
folder; delivery.folders decides where such mail goes (INBOX for anything doubtful,
never a bounce). Mail that comes as a file rather than over SMTP (the collector's popbox sink) goes
through ``deliver_file``, streamed into the store, and ``holds`` answers whether a
maildrop already has a message as ``deliver_file`` would have stored it (after a crash
left the outcome of a delivery unknown).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.archive.base import Archive, ArchiveSource
from popbox.auth.base import PassDB, UserRecord
from popbox.config import Config
from popbox.delivery.folders import delivery_folder, wants_folder
from popbox.delivery.recipients import Recipient, parse_recipient
from popbox.delivery.spooled import (
    HEAD_OCTETS,
    FileDeliveringStore,
    measure_file,
    normalised_digest,
    prefixed,
)
from popbox.errors import (
    ArchiveError,
    AuthError,
    InvalidUsername,
    MaildropInUse,
    MessageTooBig,
    QuotaExceeded,
    StoreError,
    TemporaryDeliveryError,
    UnknownRecipient,
)
from popbox.store.base import MailStore
from popbox.store.mailbox import INBOX, INSPECT_VIEW
from popbox.wireform import wire_size

__all__ = [
    "Delivered",
    "Deliverer",
    "ResolvedRecipient",
    "delivery_id",
    "has_return_path",
    "trace_headers",
]

log = logging.getLogger("popbox.delivery")

# Header field names as Dovecot's LMTP writes them (RFC 5321 section 4.4 for
# Return-Path; Delivered-To is the Postfix/qmail convention every MDA follows).
RETURN_PATH: Final = b"Return-Path"
DELIVERED_TO: Final = b"Delivered-To"
# A stored copy may differ from the message in line ends (a final one added), which
# changes its wire size by at most this much. The size only picks the copies worth
# reading; their content decides.
SIZE_SLACK: Final = 2


@dataclass(frozen=True, slots=True)
class ResolvedRecipient:
    """A recipient that names an existing user, with the user database's record."""

    recipient: Recipient
    record: UserRecord

    @property
    def user(self) -> str:
        return self.record.name


@dataclass(frozen=True, slots=True)
class Delivered:
    """A successful delivery: who got it, under which store key, how many octets."""

    user: str
    key: str
    size: int
    folder: str = INBOX


def _line_ending(data: bytes) -> bytes:
    """The message's own line ending, so prepended headers match the rest of it."""
    first = data.find(b"\n")
    if first > 0 and data[first - 1 : first] == b"\r":
        return b"\r\n"
    if first == -1:
        # No line at all (an empty or one-line message): the wire form is CRLF.
        return b"\r\n"
    return b"\n"


def _encode_address(address: str) -> bytes:
    # SMTPUTF8 addresses arrive as str; RFC 6532 puts them into headers as UTF-8.
    # surrogateescape gives back the exact octets of a non-UTF-8 address.
    return address.encode("utf-8", "surrogateescape")


def trace_headers(recipient: str, sender: str | None, data: bytes) -> bytes:
    """``Return-Path`` and ``Delivered-To`` as Dovecot's LMTP prepends them.

    ``sender`` is the envelope sender ("" for the null sender of bounces, which
    becomes ``<>``); None means unknown, and then no Return-Path is written.
    """
    eol = _line_ending(data)
    lines = []
    if sender is not None:
        lines.append(RETURN_PATH + b": <" + _encode_address(sender) + b">" + eol)
    # Delivered-To carries a bare address (no angle brackets), as Postfix's local(8)
    # and Dovecot write it; loop detection in MTAs and filters compares it verbatim.
    lines.append(DELIVERED_TO + b": " + _encode_address(recipient) + eol)
    return b"".join(lines)


def delivery_id(user: str, folder: str, data: bytes) -> str:
    """What recognises a delivery when an MTA makes it again (store.base.MailStore
    .deliver's ``delivery_id``): SHA-256 of the user, the folder and the message
    exactly as received, before the trace headers, which are not the same twice."""
    digest = hashlib.sha256()
    for part in (user.encode("utf-8", "surrogateescape"), folder.encode("utf-8")):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(data)
    return digest.hexdigest()


def has_return_path(data: bytes) -> bool:
    """True when the header block of ``data`` already holds a Return-Path field."""
    header_end = len(data)
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = data.find(separator)
        if found != -1:
            header_end = min(header_end, found)
    prefix = RETURN_PATH.lower() + b":"
    header = b"\n" + data[:header_end]
    return any(line.lower().startswith(prefix) for line in header.split(b"\n"))


class Deliverer:
    """The one delivery path for LMTP, the LDA and the collector's popbox sink.

    ``resolve`` answers "is this recipient ours?" (LMTP asks it at RCPT time, like
    Dovecot); ``deliver_to`` stores one message for a resolved recipient; ``deliver``
    does both for callers that only have an address; ``deliver_file`` and ``holds``
    serve mail that comes as a file.
    """

    def __init__(
        self, config: Config, store: MailStore, passdb: PassDB, archive: Archive | None = None
    ) -> None:
        """``archive``: where a copy of each delivery goes for the users whose archive
        policy keeps deliveries (``[archive] keep``); None keeps none."""
        self._config = config
        self._store = store
        self._passdb = passdb
        self._archive = archive

    @property
    def max_message_size(self) -> int:
        return self._config.lmtp.max_message_size

    async def resolve(self, address: str) -> ResolvedRecipient:
        """Map ``address`` to an existing user.

        Raises UnknownRecipient when it names nobody, TemporaryDeliveryError when
        the user database cannot be asked (the MTA should retry, not bounce).
        """
        try:
            recipient = parse_recipient(address, self._config.lmtp)
        except InvalidUsername as exc:
            raise UnknownRecipient(f"{address}: {exc}") from exc
        try:
            record = None
            if recipient.qualified:
                record = await self._passdb.lookup(recipient.qualified)
            if record is None:
                record = await self._passdb.lookup(recipient.user)
        except InvalidUsername as exc:
            raise UnknownRecipient(f"{address}: {exc}") from exc
        except AuthError as exc:
            raise TemporaryDeliveryError(f"user database unavailable: {exc}") from exc
        if record is None:
            raise UnknownRecipient(f"{address}: no such user")
        return ResolvedRecipient(recipient, record)

    def check_size(self, data: bytes) -> None:
        """Raise MessageTooBig when the message as received exceeds the limit."""
        self._check_octets(len(data))

    def _check_octets(self, octets: int) -> None:
        limit = self.max_message_size
        if octets > limit:
            raise MessageTooBig(f"message of {octets} octets exceeds the limit of {limit}")

    def _limits(self, record: UserRecord) -> tuple[int, int]:
        quota = self._config.quota
        messages = quota.messages if record.quota_messages is None else record.quota_messages
        octets = quota.octets if record.quota_octets is None else record.quota_octets
        return messages, octets

    async def check_quota(self, record: UserRecord, size: int) -> None:
        """Raise QuotaExceeded if one more message of ``size`` octets would not fit."""
        max_messages, max_octets = self._limits(record)
        if not max_messages and not max_octets:
            return
        usage = await self._store.usage(record.name)
        permanent = self._config.quota.over_quota == "permanent"
        if max_messages and usage.messages + 1 > max_messages:
            raise QuotaExceeded(
                f"{record.name} holds {usage.messages} of {max_messages} messages",
                permanent=permanent,
            )
        if max_octets and usage.octets + size > max_octets:
            raise QuotaExceeded(
                f"{record.name} would hold {usage.octets + size} of {max_octets} octets",
                permanent=permanent,
            )

    async def deliver_to(
        self,
        target: ResolvedRecipient,
        sender: str | None,
        data: bytes,
        *,
        add_trace: bool = True,
        folder: str | None = None,
    ) -> Delivered:
        """Store ``data`` for a resolved recipient; return once it is durable.

        ``add_trace=False`` keeps the message exactly as given, for an LDA behind an
        MTA whose local delivery agent already wrote Return-Path and Delivered-To.
        ``folder`` asks for a folder in place of the address's detail (``-m``).
        """
        self.check_size(data)
        message = data
        if add_trace:
            message = trace_headers(target.recipient.address, sender, data) + data
        where = await self.folder_for(target, folder)
        delivery = delivery_id(target.user, where, data)

        async def write() -> str:
            await self._keep_copy(target, data, where, ArchiveSource.DELIVERED)
            return await self._store.deliver(
                target.user, message, folder=where, delivery_id=delivery
            )

        return await self._checked_store(target, wire_size(message), write, where)

    async def folder_for(self, target: ResolvedRecipient, folder: str | None = None) -> str:
        """The folder mail for ``target`` goes to: the one ``folder`` or else the
        address's detail asks for, as ``mailbox.folder_delivery`` allows (INBOX for
        anything else; delivery.folders has the rules)."""
        mode = self._config.mailbox.folder_delivery
        wanted = wants_folder(target.recipient.detail if folder is None else folder, mode)
        if wanted is None:
            return INBOX
        try:
            existing = await self._store.folders(target.user)
        except (StoreError, OSError) as exc:
            text = f"cannot list the folders of {target.user}: {exc}"
            raise TemporaryDeliveryError(text) from exc
        return delivery_folder(wanted, mode, existing)

    async def deliver(
        self,
        recipient: str,
        sender: str | None,
        data: bytes,
        *,
        add_trace: bool = True,
        folder: str | None = None,
    ) -> Delivered:
        """Resolve ``recipient`` and deliver to it; raise a DeliveryError/QuotaExceeded."""
        target = await self.resolve(recipient)
        return await self.deliver_to(target, sender, data, add_trace=add_trace, folder=folder)

    async def deliver_file(self, recipient: str, sender: str | None, path: Path) -> Delivered:
        """Deliver the message in ``path`` (left as it is) to ``recipient``.

        For mail that did not come over SMTP (the collector's): Delivered-To is always
        written; Return-Path only when ``sender`` is known and the message carries
        none, since a message fetched from another maildrop usually holds the one its
        first delivery wrote (RFC 5321 section 4.4: the final delivery writes it). Streamed
        into a store that takes files. Always into INBOX, where ``holds`` looks for it
        after a crash: a detail names no folder here. The verdicts of ``deliver``.
        """
        target = await self.resolve(recipient)
        try:
            measured = await asyncio.to_thread(measure_file, path)
        except OSError as exc:
            raise TemporaryDeliveryError(f"cannot read the message {path}: {exc}") from exc
        self._check_octets(measured.octets)
        trace = self._file_trace(target, sender, measured.head)
        store = self._store

        async def write() -> str:
            await self._keep_copy(target, path, INBOX, ArchiveSource.COLLECTED)
            if isinstance(store, FileDeliveringStore):
                with path.open("rb") as source:
                    return await store.deliver_file(target.user, prefixed(trace, source))
            data = await asyncio.to_thread(path.read_bytes)
            return await store.deliver(target.user, trace + data)

        return await self._checked_store(target, wire_size(trace) + measured.wire_size, write)

    async def holds(self, recipient: str, sender: str | None, path: Path) -> bool:
        """Whether ``recipient``'s maildrop already holds the message in ``path`` as
        ``deliver_file`` would have stored it, trace headers included.

        Asked when a crash left a delivery's outcome unknown. The maildrop is opened
        as a POP3 session would (under its lock, deleting nothing); raises
        MaildropInUse while a session holds it, since answering blind could
        duplicate or lose the message; otherwise the verdicts of ``deliver``.
        """
        target = await self.resolve(recipient)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise TemporaryDeliveryError(f"cannot read the message {path}: {exc}") from exc
        expected = self._file_trace(target, sender, data[:HEAD_OCTETS]) + data
        size, wanted = wire_size(expected), normalised_digest(expected)
        try:
            maildrop = await self._store.open_maildrop(target.user, INSPECT_VIEW)
        except MaildropInUse:
            raise
        except (StoreError, OSError) as exc:
            text = f"cannot open the maildrop of {target.user}: {exc}"
            raise TemporaryDeliveryError(text) from exc
        try:
            for index, info in enumerate(maildrop.messages):
                if abs(info.size - size) > SIZE_SLACK:
                    continue
                stored = b"".join([chunk async for chunk in maildrop.read_message(index)])
                if normalised_digest(stored) == wanted:
                    return True
            return False
        except (StoreError, OSError) as exc:
            text = f"cannot read the maildrop of {target.user}: {exc}"
            raise TemporaryDeliveryError(text) from exc
        finally:
            await maildrop.release()

    async def archive_file(self, recipient: str, path: Path) -> Delivered:
        """Keep the message in ``path`` in ``recipient``'s archive only (the collector's
        archive sink): whatever the user's archive policy, since the account asked
        for it. Keeping it again is harmless: the archive holds a user's identical
        message once, so a retry after a crash stores nothing twice."""
        target = await self.resolve(recipient)
        if self._archive is None:
            raise TemporaryDeliveryError("this popbox has no archive to keep the message in")
        try:
            added = await self._archive.add(
                target.user, path, source=ArchiveSource.COLLECTED, folder=INBOX
            )
        except (ArchiveError, OSError) as exc:
            text = f"cannot archive for {target.user}: {exc}"
            raise TemporaryDeliveryError(text) from exc
        log.info(
            "archived for user=%s id=%d size=%d%s", target.user, added.entry.id,
            added.entry.size, "" if added.new else " (kept already)",
        )
        return Delivered(target.user, f"archive:{added.entry.id}", added.entry.size)

    async def _keep_copy(
        self,
        target: ResolvedRecipient,
        message: bytes | Path,
        folder: str,
        source: ArchiveSource,
    ) -> None:
        """Archive the message as it came, before the mailbox takes it, when the user's
        archive policy keeps ``source`` (deliveries, or what the collector fetched).

        As it came, without the trace headers naming each recipient: a message to
        five users is then the same octets five times, which the archive stores once.
        Before the mailbox, so that a delivery acknowledged is an archived one; an
        MTA's retry after a failure in between archives nothing twice (the archive
        keeps a user's identical message once) and delivers as it would anyway.
        """
        if self._archive is None:
            return
        policy = self._config.archive.policy_for(target.user, target.record.extra)
        if not policy.keeps(source):
            return
        try:
            await self._archive.add(target.user, message, source=source, folder=folder)
        except (ArchiveError, OSError) as exc:
            text = f"cannot archive for {target.user}: {exc}"
            raise TemporaryDeliveryError(text) from exc

    def _file_trace(self, target: ResolvedRecipient, sender: str | None, head: bytes) -> bytes:
        if sender is not None and has_return_path(head):
            sender = None
        return trace_headers(target.recipient.address, sender, head)

    async def _checked_store(
        self,
        target: ResolvedRecipient,
        size: int,
        write: Callable[[], Awaitable[str]],
        folder: str = INBOX,
    ) -> Delivered:
        """Check the quota for ``size`` more octets, then ``write``; return once durable."""
        try:
            await self.check_quota(target.record, size)
            key = await write()
        except QuotaExceeded:
            raise
        except (StoreError, OSError) as exc:
            # A store is meant to translate OSError itself; taking it here too means a
            # disk error can never turn into a bounce or a traceback.
            raise TemporaryDeliveryError(f"cannot store for {target.user}: {exc}") from exc
        log.info(
            "delivered to=%s user=%s folder=%s key=%s size=%d", target.recipient.address,
            target.user, folder, key, size,
        )
        return Delivered(user=target.user, key=key, size=size, folder=folder)
