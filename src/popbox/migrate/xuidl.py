"""X-UIDL headers: the UIDL that qpopper, UW's ipop3d and others wrote into each message.

Those servers kept a message's UIDL in the message itself, so a mailbox carried over
from one as a Maildir (the mbox they served turned into one, by mb2md or the like)
still holds what clients saw. The first X-UIDL header counts, unfolded and stripped;
a message without one never had a UIDL a client could keep, and gets one from popbox.
Order: arrival (the time at the start of a Maildir name), as every Maildir reader
lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from popbox.migrate.maildirs import first_header, message_files, read_header
from popbox.migrate.plan import SourceMessage
from popbox.store.index import arrival_order

__all__ = ["XUidlFolder", "xuidl_of", "xuidl_sources"]


def xuidl_of(header: bytes) -> str | None:
    """The message's X-UIDL (its first, unfolded and stripped), None if it has none."""
    value = first_header(header, "X-UIDL")
    return value or None


@dataclass(slots=True)
class XUidlFolder:
    sources: list[SourceMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def xuidl_sources(maildir: Path) -> XUidlFolder:
    folder = XUidlFolder()
    files = message_files(maildir)
    for key in files.duplicates:
        folder.problems.append(f"{key}: two files with this key; the first is imported")
    for key in sorted(files.by_key, key=arrival_order):
        path = files.by_key[key]
        uidl = xuidl_of(read_header(path))
        folder.sources.append(
            SourceMessage(key, path, uidl, "X-UIDL header" if uidl else "no X-UIDL header")
        )
    return folder
