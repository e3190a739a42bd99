"""X-UIDL headers: the UIDL that qpopper, UW's ipop3d and others wrote into each message.

Those servers kept a message's UIDL in the message itself, so a mailbox carried over
from one (as a Maildir, or as the mbox they served) still holds what clients saw.
The first X-UIDL header counts, unfolded and stripped; a message without one never
had a UIDL a client could keep, and gets one from popbox. Order: arrival (the time at
the start of a Maildir name), as every Maildir reader lists them; an mbox's order is
its own.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from popbox.migrate.maildirs import first_header, message_files, read_header
from popbox.migrate.plan import SourceMessage

__all__ = ["MboxMessage", "XUidlFolder", "mbox_messages", "xuidl_of", "xuidl_sources"]


def xuidl_of(header: bytes) -> str | None:
    value = first_header(header, "X-UIDL")
    return value or None


@dataclass(slots=True)
class XUidlFolder:
    sources: list[SourceMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _arrival(key: str) -> tuple[int, str]:
    digits = len(key) - len(key.lstrip("0123456789"))
    return (int(key[:digits]) if digits else 1 << 62), key


def xuidl_sources(maildir: Path) -> XUidlFolder:
    folder = XUidlFolder()
    files = message_files(maildir)
    for key in files.duplicates:
        folder.problems.append(f"{key}: two files with this key; the first is imported")
    for key in sorted(files.by_key, key=_arrival):
        path = files.by_key[key]
        uidl = xuidl_of(read_header(path))
        folder.sources.append(
            SourceMessage(key, path, uidl, "X-UIDL header" if uidl else "no X-UIDL header")
        )
    return folder


@dataclass(frozen=True, slots=True)
class MboxMessage:
    source: SourceMessage
    data: bytes


def mbox_messages(path: Path) -> Iterator[MboxMessage]:
    """The messages of an mbox file, in order, each with its X-UIDL; keys are
    ``mbox-<position>`` (the position is what identifies a message in an mbox)."""
    box = mailbox.mbox(path, create=False)
    try:
        for position, key in enumerate(box.iterkeys(), start=1):
            data = box.get_bytes(key)
            end = data.find(b"\n\n")
            uidl = xuidl_of(data[: end + 1] if end >= 0 else data)
            origin = "X-UIDL header" if uidl else "no X-UIDL header"
            yield MboxMessage(SourceMessage(f"mbox-{position}", None, uidl, origin), data)
    finally:
        box.close()
