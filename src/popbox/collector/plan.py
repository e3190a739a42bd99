"""Planning a poll: a uid for each message on the server, and what to fetch, skip and delete.

Decisions come from the listing, the account's policies and the state DB; what the plan
skips (oversize, filtered out) is recorded, so the next run does not ask again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Final

from popbox.collector.base import FetchedMessage
from popbox.collector.client import MAX_HEADER_BYTES, Pop3Session
from popbox.collector.config import AccountSettings
from popbox.collector.state import CollectorState, MessageRecord
from popbox.errors import RemoteServerError
from popbox.proto.client import UidListing

__all__ = [
    "Plan",
    "apply_filters",
    "header_uid",
    "header_uid_of",
    "make_plan",
    "message_uids",
    "pending",
]

log = logging.getLogger("popbox.collector")

SECONDS_PER_DAY: Final = 86400.0
# Prefix of uids computed from headers, so they never collide with a server's UIDL.
HEADER_UID_PREFIX: Final = "hdr:"


def header_uid(data: bytes) -> str:
    """A uid from the header section (of TOP n 0 output or a whole message), for
    servers whose UIDLs cannot be trusted."""
    headers = data.split(b"\r\n\r\n", 1)[0]
    return HEADER_UID_PREFIX + hashlib.sha256(headers).hexdigest()[:40]


def header_uid_of(message: FetchedMessage) -> str:
    """``header_uid`` of a fetched message, from memory or its file (blocking I/O)."""
    if message.data is not None:
        return header_uid(message.data[:MAX_HEADER_BYTES])
    return _header_uid_of_file(message.path)


def _header_uid_of_file(path: Path) -> str:
    with path.open("rb") as handle:
        return header_uid(handle.read(MAX_HEADER_BYTES))


@dataclass(slots=True)
class Plan:
    """Message numbers to fetch (server order) and to delete, and which of those
    fetched go straight to quarantine for their size."""

    fetch: list[int] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    oversize: set[int] = field(default_factory=set)
    skipped: int = 0
    """Left on the server for good (oversize, under ``oversize = "skip"``)."""


async def message_uids(
    account: AccountSettings,
    state: CollectorState,
    session: Pop3Session,
    sizes: dict[int, int],
    listing: UidListing | None,
    notes: list[str],
) -> dict[int, str]:
    """Message number -> uid: the server's UIDL, or a header hash when it cannot be
    trusted (and then a note says why)."""
    source = account.uid_source
    reason = None
    if source == "header_hash":
        reason = "configured"
    elif listing is None:
        reason = "server has no UIDL"
    elif listing.problems:
        reason = "; ".join(listing.problems[:3])
    elif source == "auto":
        known = await state.records(account.name)
        for number, uid in listing.entries:
            record = known.get(uid)
            # Same UIDL, different size: the server reuses or changes UIDLs.
            if record is not None and record.size and record.size != sizes.get(number):
                reason = f"UIDL {uid} changed size"
                break
    if reason is None:
        assert listing is not None
        return dict(listing.entries)
    log.info("using header hashes account=%s reason=%s", account.name, reason)
    notes.append(f"header-hash uids: {reason}")
    uids: dict[int, str] = {}
    seen: dict[str, int] = {}
    async for number, headers in session.headers(sorted(sizes)):
        uid = header_uid(headers)
        count = seen.get(uid, 0) + 1
        seen[uid] = count
        # Identical headers (a message sent twice): tell copies apart by order.
        uids[number] = uid if count == 1 else f"{uid}#{count}"
    await session.finish_pending()
    if len(uids) != len(sizes):
        raise RemoteServerError("TOP failed; the server has no usable unique-ids")
    adopted = await state.adopt_header_uids(account.name, set(uids.values()))
    if adopted:
        log.info("recognised %d delivered messages by their headers", adopted)
    return uids


async def make_plan(
    account: AccountSettings,
    state: CollectorState,
    sizes: dict[int, int],
    uids: dict[int, str],
) -> Plan:
    """What this run fetches and deletes, under the account's delete policy and its
    per-run and size limits; first sightings and skips are recorded."""
    now = time.time()
    known = await state.records(account.name)
    await state.note_listing(
        account.name,
        [(uid, sizes.get(number, 0)) for number, uid in uids.items() if uid not in known],
    )
    plan = Plan()
    octets = 0
    for number in sorted(uids):
        uid, size = uids[number], sizes.get(number, 0)
        record: MessageRecord | None = known.get(uid)
        if record is not None and record.delivered_at is not None:
            if account.delete == "after_delivery" or (
                account.delete == "after_days"
                and now - record.delivered_at > account.delete_after_days * SECONDS_PER_DAY
            ):
                plan.delete.append(number)
            continue
        if record is not None and (record.quarantined or record.skipped):
            continue
        if account.max_message_size and size > account.max_message_size:
            if account.oversize == "skip":
                await state.record_skipped(account.name, uid, size, "oversize")
                plan.skipped += 1
                log.info(
                    "skipped account=%s uid=%s size=%d reason=oversize", account.name, uid, size
                )
                continue
            plan.oversize.add(number)
        if account.max_messages_per_run and len(plan.fetch) >= account.max_messages_per_run:
            continue
        if account.max_bytes_per_run and octets >= account.max_bytes_per_run:
            continue
        plan.fetch.append(number)
        octets += size
    return plan


def _filter_decision(account: AccountSettings, headers: bytes) -> str:
    parsed = BytesHeaderParser(policy=default_policy).parsebytes(headers)
    for rule in account.filters:
        for value in parsed.get_all(rule.header, []):
            if re.search(rule.pattern, str(value)):
                return rule.action
    return account.filter_default


async def apply_filters(
    account: AccountSettings,
    state: CollectorState,
    session: Pop3Session,
    plan: Plan,
    sizes: dict[int, int],
    uids: dict[int, str],
) -> int:
    """Drop from ``plan.fetch`` what the account's header filters turn away (TOP n 0),
    recording each as skipped; return how many."""
    keep: list[int] = []
    skipped = 0
    async for number, headers in session.headers(plan.fetch):
        if _filter_decision(account, headers) == "fetch":
            keep.append(number)
        else:
            await state.record_skipped(account.name, uids[number], sizes[number], "filter")
            skipped += 1
    await session.finish_pending()
    plan.fetch = keep
    return skipped


def pending(uids: Mapping[int, str], records: Mapping[str, MessageRecord]) -> int:
    """Messages on the server still to deliver (not delivered, quarantined or skipped)."""
    return sum(
        1
        for uid in uids.values()
        if (record := records.get(uid)) is None
        or (record.delivered_at is None and not record.quarantined and not record.skipped)
    )
