"""The per-session counters, the session id, and the one log line each POP3 session leaves
when it ends.

Like Dovecot's logout line, it says who, from where, over what, what they did and why
it ended, so an operator can answer "did alice fetch her mail at 09:14?" from the log.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Final

__all__ = ["SESSION_LOG", "EndReason", "SessionStats", "next_session_id"]

SESSION_LOG: Final = logging.getLogger("popbox.pop3")

_ids = itertools.count(1)
# The pid keeps ids unique across worker processes sharing one log; taken once per
# process rather than by a getpid() syscall per connection.
_id_prefix = f"{os.getpid():x}."


def _forked() -> None:
    global _id_prefix
    _id_prefix = f"{os.getpid():x}."


os.register_at_fork(after_in_child=_forked)


def next_session_id() -> str:
    """A new session id: this process's pid and a counter, in hex (``1a2b.3f``)."""
    return f"{_id_prefix}{next(_ids):x}"


class EndReason:
    """Why a session ended; the values appear verbatim in the log line."""

    QUIT: Final = "quit"
    TIMEOUT: Final = "timeout"
    DISCONNECT: Final = "disconnect"
    SHUTDOWN: Final = "shutdown"
    ERROR: Final = "error"
    TLS_FAILED: Final = "tls handshake failed"
    TLS_ERROR: Final = "tls error"
    TOO_MANY_CONNECTIONS: Final = "too many connections"
    PROXY_HEADER: Final = "bad proxy header"


class SessionStats:
    """What one session did. Slots keep an idle session's footprint small."""

    __slots__ = (
        "bytes_retrieved",
        "commands",
        "deleted",
        "device",
        "folder",
        "peer",
        "recent",
        "retrieved",
        "session_id",
        "started",
        "tls",
        "tops",
        "user",
    )

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.started = time.monotonic()
        self.peer = "-"
        self.user: str | None = None
        """The mailbox's user (for a member of a shared mailbox, not the member)."""
        self.device = "-"
        self.folder = "-"
        self.recent = False
        self.tls = False
        self.commands = 0
        self.retrieved = 0
        self.bytes_retrieved = 0
        self.tops = 0
        self.deleted = 0

    def logged_in(self, user: str, device: str, folder: str, *, recent: bool) -> None:
        """Who read what: the mailbox's user, the device (a member's is named after
        them: ``bob`` or ``bob/laptop``), the folder, and recent mode."""
        self.user = user
        self.device = device
        self.folder = folder
        self.recent = recent

    def log_end(self, reason: str, detail: str | None = None) -> None:
        """Write the session's logout line to ``popbox.pop3`` (INFO)."""
        duration = time.monotonic() - self.started
        SESSION_LOG.info(
            "session=%s user=%s device=%s folder=%s%s peer=%s tls=%s commands=%d "
            "retr=%d/%d top=%d del=%d duration=%.3fs reason=%s%s",
            self.session_id,
            self.user or "-",
            self.device,
            self.folder,
            " recent=yes" if self.recent else "",
            self.peer,
            "yes" if self.tls else "no",
            self.commands,
            self.retrieved,
            self.bytes_retrieved,
            self.tops,
            self.deleted,
            duration,
            reason.replace(" ", "-") if " " in reason else reason,
            f" detail={detail!r}" if detail else "",
        )
