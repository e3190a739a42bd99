"""The local delivery agent behind ``popbox deliver``: one message on stdin, one user.

An MTA runs it as a mailbox_command or pipe transport and acts on the exit status
(sysexits.h, as Postfix's local(8) and pipe(8) and Exim's pipe transport expect)::

    0   EX_OK        delivered (durable: fsynced and renamed into new/)
    65  EX_DATAERR   too big, or the input could not be read        -> bounce
    67  EX_NOUSER    no such user                                   -> bounce
    73  EX_CANTCREAT the store says retrying cannot help            -> bounce (Exim: retry)
    75  EX_TEMPFAIL  our fault or a full mailbox (temporary quota)  -> retry
    77  EX_NOPERM    full mailbox with quota.over_quota = permanent -> bounce

The one line on stderr starts with an RFC 3463 status code: Postfix puts the
command's output into its bounce and, when it begins with such a code, uses it in
place of the one it derives from the exit status.

The input may begin with an mbox ``From sender date`` line (Postfix's local(8)
and Exim's pipe transport write one); it is envelope, not message, and is dropped,
giving the sender when ``--from`` is absent. When the message already carries a
``Return-Path`` header, the MTA has written the trace itself and we add none.

The ``Deliverer`` (with its store and user database) is built by the composition
root (``popbox.cli``) and handed in.
"""

from __future__ import annotations

import sys
from typing import BinaryIO, Final, TextIO

from popbox.delivery.deliverer import Deliverer, has_return_path
from popbox.errors import (
    MessageTooBig,
    NoSuchMailbox,
    PermanentStoreError,
    PopboxError,
    QuotaExceeded,
    TemporaryDeliveryError,
    UnknownRecipient,
)

__all__ = [
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_TEMPFAIL",
    "report_setup_failure",
    "run_lda",
]

# Exit statuses from sysexits.h; spelled out because os.EX_* is missing on Windows
# and the numbers are what MTAs document.
EX_OK: Final = 0
EX_DATAERR: Final = 65
EX_NOUSER: Final = 67
EX_CANTCREAT: Final = 73
EX_TEMPFAIL: Final = 75
EX_NOPERM: Final = 77

# The mbox postmark some MTAs put before the message (RFC 4155).
MBOX_FROM: Final = b"From "


def _read_message(source: BinaryIO, limit: int) -> bytes:
    """Read at most ``limit`` octets; MessageTooBig if the source holds more."""
    data = source.read(limit + 1)
    if len(data) > limit:
        raise MessageTooBig(f"message exceeds the limit of {limit} octets")
    return data


def _strip_postmark(data: bytes) -> tuple[bytes, str | None]:
    """Drop an mbox ``From sender date`` first line; return the rest and the sender."""
    if not data.startswith(MBOX_FROM):
        return data, None
    end = data.find(b"\n")
    if end == -1:
        return b"", None
    fields = data[len(MBOX_FROM) : end].split()
    sender = fields[0].decode("utf-8", "surrogateescape") if fields else None
    if sender == "MAILER-DAEMON":
        # Postfix and Exim write this for the null sender of a bounce.
        sender = ""
    return data[end + 1 :], sender


def _outcome(error: BaseException) -> tuple[int, str]:
    """The exit status and stderr line for a failed delivery."""
    if isinstance(error, UnknownRecipient):
        return EX_NOUSER, f"5.1.1 {error}"
    if isinstance(error, MessageTooBig):
        return EX_DATAERR, f"5.3.4 {error}"
    if isinstance(error, QuotaExceeded):
        if error.permanent:
            return EX_NOPERM, f"5.2.2 quota exceeded: {error}"
        return EX_TEMPFAIL, f"4.2.2 quota exceeded: {error}"
    cause = error.__cause__ if isinstance(error, TemporaryDeliveryError) else error
    if isinstance(cause, PermanentStoreError | NoSuchMailbox):
        return EX_CANTCREAT, f"5.2.0 cannot create the message: {cause}"
    return EX_TEMPFAIL, f"4.3.0 temporary failure: {error}"


async def run_lda(
    deliverer: Deliverer,
    recipient: str,
    sender: str | None,
    source: BinaryIO,
    *,
    folder: str | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Deliver the message read from ``source`` to ``recipient``; return a sysexits code.

    ``sender`` is the envelope sender (``--from``; "" for the null sender); None takes
    it from an mbox ``From`` line if there is one. ``folder`` (``-m``, as dovecot-lda's)
    asks for a folder in place of the recipient's detail, under the same rules: a
    folder that may not be used means INBOX, never a bounce. On failure one line goes
    to ``stderr`` (sys.stderr by default).
    """
    err = stderr if stderr is not None else sys.stderr
    try:
        # A blocking read is what an LDA wants: nothing else runs until the message
        # is in, and the MTA is waiting on this one process.
        data = _read_message(source, deliverer.max_message_size)
    except MessageTooBig as exc:
        code, reason = _outcome(exc)
        print(f"popbox deliver: {reason}", file=err)
        return code
    except (OSError, ValueError) as exc:
        # ValueError: a closed or non-binary stream; both mean we never got the mail.
        print(f"popbox deliver: 5.6.0 cannot read the message: {exc}", file=err)
        return EX_DATAERR
    data, postmark_sender = _strip_postmark(data)
    if sender is None:
        sender = postmark_sender
    try:
        await deliverer.deliver(
            recipient, sender, data, add_trace=not has_return_path(data), folder=folder
        )
    except (PopboxError, OSError) as exc:
        code, reason = _outcome(exc)
    else:
        return EX_OK
    print(f"popbox deliver: {reason}", file=err)
    return code


def report_setup_failure(error: PopboxError | OSError, *, stderr: TextIO | None = None) -> int:
    """The exit status (and stderr line) when the store or user database could not be
    set up (bad path, unreadable file): ours to fix and the MTA's to retry."""
    code, reason = _outcome(error)
    print(f"popbox deliver: {reason}", file=stderr if stderr is not None else sys.stderr)
    return code
