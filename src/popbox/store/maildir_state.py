"""A Maildir folder's device state on disk: ``popbox.devices`` beside the index.

The file holds ``FolderState.to_bytes()`` (versioned JSON, store.devices): the folder's
devices, what each deleted, first retrievals and hidden messages. It is read and
written whole, under the folder's lock: a temporary file, fsync, rename over the old
one, fsync of the directory, so a crash leaves the old state or the new one. A missing
file is an empty state; a damaged one, or one written by a newer popbox, is refused
(StateFormatError) rather than guessed at, since a wrong guess could remove mail a
device still wants. Everything here is synchronous and raises OSError for the caller
to translate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from popbox.fileio import replace_file
from popbox.store.devices import FolderState
from popbox.store.index_file import IndexSignature, signature_of

__all__ = ["STATE_NAME", "STATE_TMP_NAME", "LoadedState", "read_state", "write_state"]

STATE_NAME: Final = "popbox.devices"
# Written beside the state and renamed over it, so a crash leaves the old or the new.
STATE_TMP_NAME: Final = "popbox.devices.tmp"


class LoadedState:
    """A folder's state as read from or written to its file.

    ``saved`` is the file's bytes (None: no file), so a commit writes only a state
    whose bytes changed; ``signature`` tells a later login whether another process
    replaced the file meanwhile (index_file.signature_of: every write is a new inode).
    """

    __slots__ = ("saved", "signature", "state")

    def __init__(
        self, state: FolderState, saved: bytes | None, signature: IndexSignature | None
    ) -> None:
        self.state = state
        self.saved = saved
        self.signature = signature

    def changed(self) -> bool:
        """Whether the state in memory differs from the file (no file is an empty
        state: a folder nobody logged in to gets none from a sweep)."""
        if self.saved is None:
            return not self.state.is_empty()
        return self.saved != self.state.to_bytes()


def read_state(maildir: Path, uidvalidity: int) -> LoadedState:
    """The state of the folder at ``maildir``; an empty one for ``uidvalidity`` if
    there is no file. Raises StateFormatError if the file is damaged or newer."""
    try:
        fd = os.open(maildir / STATE_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return LoadedState(FolderState(uidvalidity), None, None)
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 4096)):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return LoadedState(FolderState.from_bytes(data), data, signature)


def write_state(maildir: Path, loaded: LoadedState) -> None:
    """Replace the folder's state file with ``loaded.state``, durably; updates
    ``loaded.saved`` and ``loaded.signature``."""
    data = loaded.state.to_bytes()
    # The state decides what devices see: once written it must stay, like the
    # deletions it records, before QUIT's +OK (a durable replace).
    replace_file(maildir, STATE_NAME, STATE_TMP_NAME, (data,))
    loaded.saved = data
    loaded.signature = signature_of(maildir / STATE_NAME)
