"""The crash auditor itself: each broken promise on a made-up maildrop is caught."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from popbox.store.maildir import MaildirStore
from support.crash import audit_maildrops

MESSAGE_ID = re.compile(rb"^Message-ID: <t-(\d+)@audit\.test>\r?$", re.MULTILINE)
SENT = {
    number: b"Message-ID: <t-%d@audit.test>\r\nSubject: %d\r\n\r\nbody line\r\n" % (number, number)
    for number in (1, 2, 3)
}
TRACE = b"Delivered-To: alice@example.test\r\n"


def made_up(root: Path, stored: Mapping[str, list[bytes]]) -> None:
    """Maildrops holding exactly ``stored``, as a killed server might have left them."""

    async def deliver() -> None:
        store = MaildirStore(root)
        try:
            for user, messages in stored.items():
                for data in messages:
                    await store.deliver(user, data)
        finally:
            await store.close()

    asyncio.run(deliver())


def audit(root: Path, **promises: Any) -> int:
    promises.setdefault("acked", [])
    return asyncio.run(
        audit_maildrops(root, ["alice"], message_id=MESSAGE_ID, sent=SENT, **promises)
    )


def test_a_maildrop_that_kept_every_promise_passes(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1], SENT[3]]})
    # Message 2 was never acknowledged: its absence is allowed.
    assert audit(tmp_path, acked=[("alice", 1), ("alice", 3)]) == 2


def test_an_acknowledged_message_that_is_missing_is_lost(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1]]})
    with pytest.raises(AssertionError, match=r"acknowledged with 250 but lost: \[2\]"):
        audit(tmp_path, acked=[("alice", 1), ("alice", 2)])


def test_a_deletion_that_may_have_committed_excuses_a_missing_message(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1]]})
    assert audit(tmp_path, acked=[("alice", 1), ("alice", 2)], maybe_deleted={("alice", 2)}) == 1


def test_a_message_stored_twice_is_caught(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1], SENT[2], SENT[1]]})
    with pytest.raises(AssertionError, match=r"delivered twice: \[1\]"):
        audit(tmp_path)


def test_a_truncated_message_is_partial(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1][:-6]]})
    with pytest.raises(AssertionError, match="message 1 is partial"):
        audit(tmp_path)


def test_a_confirmed_deletion_that_came_back_is_caught(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1], SENT[2]]})
    with pytest.raises(AssertionError, match="message 2 came back"):
        audit(tmp_path, deleted={("alice", 2)})


def test_with_trace_headers_a_message_must_be_exactly_them_and_the_message(
    tmp_path: Path,
) -> None:
    made_up(tmp_path, {"alice": [TRACE + SENT[1]]})
    assert audit(tmp_path, trace=lambda user: TRACE) == 1
    with pytest.raises(AssertionError, match="message 1 is partial"):
        audit(tmp_path, trace=lambda user: b"Delivered-To: bob@example.test\r\n")


def test_every_uidl_seen_is_reported(tmp_path: Path) -> None:
    made_up(tmp_path, {"alice": [SENT[1], SENT[2]]})
    seen: list[tuple[str, int, str]] = []
    audit(tmp_path, saw_uidl=lambda user, number, uidl: seen.append((user, number, uidl)))
    assert sorted((user, number) for user, number, _ in seen) == [("alice", 1), ("alice", 2)]
    assert all(uidl for _, _, uidl in seen)
