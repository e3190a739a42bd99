"""Delivery into a Maildir, without the session lock: tmp/ -> fsync -> link into new/
-> fsync of new/, under a name no other delivery can have (maildir(5)). A message that
keeps an imported UIDL has it appended to the folder's ``popbox.uidls`` (fsynced)
before the link, so it is never in new/ without it (store.maildir_uidls)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from popbox.fileio import fsync_dir, write_all
from popbox.store.maildir_errors import os_errors
from popbox.store.maildir_uidls import append_uidls
from popbox.wireform import CrlfNormaliser, WireSizeCounter

__all__ = ["MaildirDelivery", "link_no_clobber"]

# Maildir files are private to the mail owner (Dovecot, Postfix).
FILE_MODE: Final = 0o600
# errnos that mean "this filesystem has no hard links": fall back to rename(), which
# is as atomic but would replace an existing name (our names are unique anyway).
_NO_LINK_ERRNOS: Final = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


class MaildirDelivery:
    """Writes messages into users' Maildirs; ``deliver_sync`` runs in a worker thread.

    ``save_crlf``: store the message with CRLF line ends. ``make_maildir`` is called
    with the Maildir when its tmp/ is missing (a first delivery, or a removed Maildir)
    and must leave cur/, new/ and tmp/ in place, durably. ``clock`` is the time that
    starts every name: the delivery time that recent-mode logins and the Trash count
    from.
    """

    def __init__(
        self,
        *,
        save_crlf: bool,
        make_maildir: Callable[[Path], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._save_crlf = save_crlf
        self._make_maildir = make_maildir
        self._clock = clock
        # Cached once: gethostname() per delivery is a syscall for a constant. The
        # replacements are maildir(5)'s, plus ',' which starts the size fields.
        host = socket.gethostname() or "localhost"
        self._host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
        self._sequence = itertools.count(1)

    def unique_name(self) -> str:
        """A new message's base name (before the size fields)."""
        # time.MusecPpidQseqRrandom.host: Dovecot's shape. pid+seq make it unique in
        # this host's processes; the random part covers pid reuse and shared roots.
        now = self._clock()
        return (
            f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}"
            f"Q{next(self._sequence)}R{secrets.token_hex(8)}.{self._host}"
        )

    def deliver_sync(
        self, user: str, maildir: Path, chunks: Iterable[bytes], uidl: str | None = None
    ) -> str:
        """Store the message made of ``chunks`` durably in new/; return its file name.

        ``uidl``: a checked UIDL (mailbox.check_uidl) the message keeps for ever."""
        action = f"deliver to {user}"
        with os_errors(action):
            base = self.unique_name()
            tmp_path = maildir / "tmp" / base
            counter = WireSizeCounter()
            # CRLF on disk (Dovecot's mail_save_crlf): the file is then its own wire
            # form but for dot-stuffing, and RETR can send it with sendfile.
            normaliser = CrlfNormaliser() if self._save_crlf else None
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(tmp_path, flags, FILE_MODE)
            except FileNotFoundError:
                # The first delivery to this user (or the Maildir was removed): make
                # it. Checking first would cost every other delivery five syscalls.
                self._make_maildir(maildir)
                fd = os.open(tmp_path, flags, FILE_MODE)
            try:
                try:
                    for chunk in chunks:
                        if normaliser is not None:
                            chunk = normaliser.convert(chunk)
                        counter.feed(chunk)
                        write_all(fd, chunk)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # W= means Dovecot's virtual size, which is the wire size only for a
                # message that ends with a line end; for one that does not, W= is
                # left out so whoever indexes it counts it exactly (a rare case:
                # SMTP and LMTP always end a message with CRLF).
                name = f"{base},S={counter.stored}"
                if counter.terminated:
                    name += f",W={counter.virtual}"
                if uidl is not None:
                    # The name has no ':' info yet: it is the message's key.
                    append_uidls(maildir, [(name, uidl)])
                link_no_clobber(tmp_path, maildir / "new" / name)
            finally:
                # Gone after the link; on any failure this removes the partial file.
                with contextlib.suppress(OSError):
                    tmp_path.unlink(missing_ok=True)
            try:
                fsync_dir(maildir / "new")
            except OSError:
                # Not durable, so not delivered: take it back rather than report a
                # failure for a message that may still show up.
                with contextlib.suppress(OSError):
                    (maildir / "new" / name).unlink()
                raise
        return name


def link_no_clobber(source: Path, target: Path) -> None:
    """link() then the caller unlinks: never replaces an existing message (maildir(5))."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        os.rename(source, target)
