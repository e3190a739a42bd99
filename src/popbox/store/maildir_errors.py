"""How the Maildir backend's OSErrors become popbox errors: the one translation for it."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from popbox.errors import MaildropInUse, PermanentStoreError, StoreError

__all__ = ["os_errors", "store_error"]


def store_error(action: str, exc: OSError) -> StoreError:
    """THE translation of OSError into popbox errors for this backend."""
    if isinstance(exc, BlockingIOError):
        return MaildropInUse(f"{action}: maildrop is locked by another session")
    # Most filesystem trouble passes (space is freed, an operator fixes modes), so it
    # is temporary: the MTA retries and the client sees [SYS/TEMP], as with Dovecot.
    if exc.errno == errno.ENAMETOOLONG:
        return PermanentStoreError(f"{action}: {exc.strerror} ({exc.filename})")
    return StoreError(f"{action}: {exc.strerror or exc} ({exc.filename})")


@contextlib.contextmanager
def os_errors(action: str) -> Iterator[None]:
    """Raise the popbox error for any OSError raised inside, from it."""
    try:
        yield
    except OSError as exc:
        raise store_error(action, exc) from exc
