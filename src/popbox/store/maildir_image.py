"""A Maildir folder as a whole image (store.image), read for a move and restored from one.

Reading (``open_image``) takes the folder's lock as a login does and brings the
index and device state up to date, so the image is the folder as the next session
would see it: UIDs, UIDVALIDITY and next UID from the index, kept UIDLs from
``popbox.uidls``, each message's arrival time from its name (the time recent mode
and the Trash age count from, store.maildir_view), and the device state's bytes.

Restoring (``restore_image``) keeps the lock for the whole restore, so no session
sees the folder half-done, and works in an order that a kill at any point leaves
resumable:

1. each message the folder lacks is written to ``tmp/KEY.part``, fsynced and renamed
   to ``tmp/KEY``, checked against the image's wire size. KEY starts with the
   arrival time and names the image's UIDVALIDITY and UID, so a resumed restore
   recognises a message it staged or linked already and does not copy it again;
2. messages the folder holds that the image lacks are removed;
3. the kept UIDLs are written (lines for keys not yet linked are harmless, and a
   staged ``tmp/KEY`` counts as arriving for store.maildir_uidls.drop_gone);
4. the index is written: the image's UIDVALIDITY, UIDs and next UID, so every UIDL
   (``f"{uidvalidity:08x}{uid:08x}"``, or the kept one) is the source's; then the
   device state, so every device's deletions, retrievals and logins carry over;
5. the staged messages are linked into cur/ (fsync), and the staged names removed.

A session only gets in after a kill (the lock dies with the process). Before step 4
it finds the folder as it was (for a new folder: empty) with popbox's own numbering;
after it, the image's numbering with some messages not linked yet, which it skips,
and which the resumed restore links under the same UIDs. ``popbox migrate`` keeps
sessions out of even that (store.routed: the user is served from the source until
the move is recorded).

Everything here runs in worker threads but the body reads, and raises popbox errors
(store.maildir_errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from popbox.errors import NoSuchFolder, PermanentStoreError, StoreError
from popbox.fileio import FileLock, fsync_dir, replace_file, write_all
from popbox.store.devices import FolderState
from popbox.store.image import FolderImage, ImageMessage, ReadBody, RestoreReport
from popbox.store.index import IndexEntry, MaildirIndex, scan_messages
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import INDEX_NAME, INDEX_TMP_NAME, write_index
from popbox.store.mailbox import INBOX
from popbox.store.maildir_errors import os_errors
from popbox.store.maildir_folders import FOLDER_MARKER, FolderLayout, Mailboxes
from popbox.store.maildir_state import STATE_NAME, STATE_TMP_NAME, write_state
from popbox.store.maildir_sync import SEEN_INFO
from popbox.store.maildir_uidls import (
    UIDLS_NAME,
    UIDLS_TMP_NAME,
    append_uidls,
    compact,
)
from popbox.store.maildir_view import NO_TIME, arrivals_of
from popbox.store.maildrop import CHUNK_SIZE, LOCK_NAME, record_uidvalidity, recorded_uidvalidity
from popbox.store.moves import MARK_NAME
from popbox.wireform import WireSizeCounter

__all__ = ["MaildirImageSource", "image_key", "open_image", "remove_folder", "restore_image"]

# The end of a restored message's key: says who wrote it, and keeps it apart from
# the keys of Maildir writers (which end in a host name).
KEY_SUFFIX: Final = "popbox-restore"
# A staged message being written: renamed to its key once whole and fsynced.
PART_SUFFIX: Final = ".part"
# Message files are private to the mail owner (Dovecot, Postfix).
FILE_MODE: Final = 0o600
# popbox's own files in a folder's Maildir, removed with the folder.
_OWN_FILES: Final = (
    INDEX_NAME,
    INDEX_TMP_NAME,
    STATE_NAME,
    STATE_TMP_NAME,
    UIDLS_NAME,
    UIDLS_TMP_NAME,
)


def image_key(uidvalidity: int, message: ImageMessage) -> str:
    """The Maildir key of a restored message: its arrival time first (what recent mode
    and the Trash age read, store.maildir_view), then what makes it the image's."""
    arrived = min(max(int(message.arrived), 0), NO_TIME - 1)
    return f"{arrived}.V{uidvalidity:x}U{message.uid}.{KEY_SUFFIX}"


# -- reading ------------------------------------------------------------------------


class MaildirImageSource:
    """A folder held under its lock while its image is read (store.image.ImageSource)."""

    def __init__(
        self,
        image: FolderImage,
        layout: FolderLayout,
        paths: dict[int, str],
        lock: FileLock,
        cache: IndexCache,
        loaded: LoadedIndex,
    ) -> None:
        self._image = image
        self._layout = layout
        self._paths = paths
        self._lock = lock
        self._cache = cache
        self._loaded: LoadedIndex | None = loaded

    @property
    def image(self) -> FolderImage:
        return self._image

    async def read(self, uid: int) -> AsyncIterator[bytes]:
        path = self._paths.get(uid)
        if path is None:
            raise StoreError(f"folder {self._layout.place.key} has no message {uid}")
        action = f"read message {uid} of {self._layout.place.key}"
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        with os_errors(action):
            fd = await asyncio.to_thread(os.open, self._layout.maildir / path, flags)
        try:
            while True:
                with os_errors(action):
                    chunk = await asyncio.to_thread(os.read, fd, CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    async def close(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            # The index is the file as it is: the next login takes it from the cache.
            self._cache.keep(self._layout.place.key, loaded)
        self._lock.close()


def open_image(mailboxes: Mailboxes, cache: IndexCache, layout: FolderLayout) -> MaildirImageSource:
    """Lock the folder, sync its index and state as a login does, and make its image."""
    place = layout.place
    with os_errors(f"read the image of {place.key}"):
        if not mailboxes.is_known(layout.maildir):
            if place.folder != INBOX and not mailboxes.exists(layout):
                raise NoSuchFolder(f"{place.user} has no folder {place.folder}")
            mailboxes.ensure_maildir(layout.maildir)
        lock = FileLock(layout.lock)  # BlockingIOError: MaildropInUse
        try:
            loaded = mailboxes.sync_index(layout, lock)
            if mailboxes.load_state(layout, loaded):
                assert loaded.state is not None
                write_state(layout.maildir, loaded.state)
            assert loaded.state is not None
            image, paths = _image_of(layout, loaded)
        except BaseException:
            lock.close()
            raise
    return MaildirImageSource(image, layout, paths, lock, cache, loaded)


def _image_of(layout: FolderLayout, loaded: LoadedIndex) -> tuple[FolderImage, dict[int, str]]:
    index = loaded.index
    _, columns = loaded.snapshot()
    overrides = index.uidl_overrides
    messages: list[ImageMessage] = []
    paths: dict[int, str] = {}
    for uid, size, path, arrived in zip(
        columns.uids, columns.sizes, columns.paths, arrivals_of(columns), strict=True
    ):
        when = float(arrived)
        if arrived == NO_TIME:
            # A name without a delivery time (a foreign writer's): its file's time is
            # the best arrival there is, and a store without names needs one.
            when = os.stat(layout.maildir / path).st_mtime
        messages.append(ImageMessage(int(uid), int(size), when, overrides.get(uid)))
        paths[int(uid)] = path
    assert loaded.state is not None
    state = loaded.state.state
    image = FolderImage(
        user=layout.place.user,
        folder=layout.place.folder,
        uidvalidity=index.uidvalidity,
        next_uid=index.next_uid,
        messages=messages,
        state=b"" if state.is_empty() else state.to_bytes(),
    )
    return image, paths


# -- restoring ------------------------------------------------------------------------


async def restore_image(
    mailboxes: Mailboxes,
    cache: IndexCache,
    layout: FolderLayout,
    image: FolderImage,
    read: ReadBody,
) -> RestoreReport:
    """Make the folder at ``layout`` equal to ``image`` (the module's steps)."""
    state = _checked_state(image)
    place = layout.place
    action = f"restore {place.key}"
    lock = await asyncio.to_thread(_lock_for_restore, mailboxes, layout, action)
    try:
        report = RestoreReport()
        keys = {message.uid: image_key(image.uidvalidity, message) for message in image.messages}
        linked, staged = await asyncio.to_thread(_survey, layout, action)
        for message in image.messages:
            key = keys[message.uid]
            if key in linked or key in staged:
                report.skipped += 1
                continue
            await _stage(layout, key, message, read, action)
            report.copied += 1
            report.octets += message.size
        await asyncio.to_thread(_commit, layout, lock, image, state, keys, linked, report, action)
        cache.take(place.key)  # whatever a session of this process left is out of date
        mailboxes.forget(layout.maildir)
        return report
    finally:
        lock.close()


def _checked_state(image: FolderImage) -> FolderState | None:
    """The image's device state, refused if it is not of the image's UIDVALIDITY."""
    if not image.state:
        return None
    state = FolderState.from_bytes(image.state)
    if state.uidvalidity != image.uidvalidity:
        raise PermanentStoreError(
            f"the image of {image.user}/{image.folder} has a device state of another "
            f"UIDVALIDITY ({state.uidvalidity:x}, not {image.uidvalidity:x})"
        )
    if any(message.uid >= image.next_uid for message in image.messages):
        raise PermanentStoreError(f"the image of {image.user}/{image.folder}: a UID past next")
    return state


def _lock_for_restore(mailboxes: Mailboxes, layout: FolderLayout, action: str) -> FileLock:
    with os_errors(action):
        mailboxes.ensure_maildir(layout.maildir)
        return FileLock(layout.lock)  # BlockingIOError: MaildropInUse


def _survey(layout: FolderLayout, action: str) -> tuple[dict[str, str], set[str]]:
    """Messages in cur/ and new/ by key (``DIR/NAME``), and the keys staged in tmp/;
    a ``.part`` left by a killed copy is removed."""
    with os_errors(action):
        linked: dict[str, str] = {}
        for directory in ("new", "cur"):  # cur/ wins a key found in both
            names, _ = scan_messages(layout.maildir / directory)
            linked.update((key, f"{directory}/{name}") for key, name in names.items())
        staged: set[str] = set()
        tmp = layout.maildir / "tmp"
        for name in os.listdir(tmp):
            if not name.endswith(KEY_SUFFIX + PART_SUFFIX):
                if name.endswith(KEY_SUFFIX):
                    staged.add(name)
                continue
            os.unlink(tmp / name)
        return linked, staged


async def _stage(
    layout: FolderLayout, key: str, message: ImageMessage, read: ReadBody, action: str
) -> None:
    """Copy one message to ``tmp/KEY``, whole and durable, or raise."""
    tmp = layout.maildir / "tmp"
    part = tmp / (key + PART_SUFFIX)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    with os_errors(action):
        fd = await asyncio.to_thread(os.open, part, flags, FILE_MODE)
    try:
        counter = WireSizeCounter()
        async for chunk in read(message.uid):
            counter.feed(chunk)
            with os_errors(action):
                await asyncio.to_thread(write_all, fd, chunk)
        with os_errors(action):
            await asyncio.to_thread(os.fsync, fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    os.close(fd)
    if counter.wire != message.size:
        with contextlib.suppress(OSError):
            part.unlink()
        raise PermanentStoreError(
            f"{action}: message {message.uid} is {counter.wire} octets on the wire, "
            f"the image says {message.size}"
        )
    with os_errors(action):
        await asyncio.to_thread(os.rename, part, tmp / key)


def _commit(
    layout: FolderLayout,
    lock: FileLock,
    image: FolderImage,
    state: FolderState | None,
    keys: dict[int, str],
    linked: dict[str, str],
    report: RestoreReport,
    action: str,
) -> None:
    """Steps 2 to 5 of the module's docstring, with every message staged or linked."""
    maildir = layout.maildir
    wanted = set(keys.values())
    with os_errors(action):
        # 2. What the image lacks goes.
        gone = [path for key, path in linked.items() if key not in wanted]
        for path in gone:
            os.unlink(maildir / path)
        if gone:
            fsync_dir(maildir / "cur")
            fsync_dir(maildir / "new")
        report.removed = len(gone)
        # 3. The kept UIDLs: stale lines out, missing lines in.
        kept = {keys[m.uid]: m.kept_uidl for m in image.messages if m.kept_uidl is not None}
        dropped = {key for key in linked if key not in wanted}
        journal = compact(
            maildir, lambda key, uidl: key not in dropped and kept.get(key, uidl) == uidl
        )
        present = journal.uidls if journal is not None else {}
        append_uidls(maildir, [(k, u) for k, u in kept.items() if present.get(k) != u])
        # 4. The index, then the device state.
        paths = {key: linked.get(key) or f"cur/{key}{SEEN_INFO}" for key in keys.values()}
        entries = {
            keys[m.uid]: IndexEntry(m.uid, m.size, paths[keys[m.uid]])
            for m in sorted(image.messages, key=lambda m: m.uid)
        }
        index = MaildirIndex(image.uidvalidity, image.next_uid, 0, entries)
        if recorded_uidvalidity(lock) < image.uidvalidity:
            record_uidvalidity(lock, image.uidvalidity)
        write_index(maildir, index)
        if state is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(maildir / STATE_NAME)
                fsync_dir(maildir)
        else:
            replace_file(maildir, STATE_NAME, STATE_TMP_NAME, (image.state,))
        # 5. The staged messages into cur/, under the names the index gives them.
        tmp = maildir / "tmp"
        moved = [key for key in keys.values() if key not in linked]
        for key in moved:
            with contextlib.suppress(FileExistsError):
                os.link(tmp / key, maildir / paths[key])
        if moved:
            fsync_dir(maildir / "cur")
        for key in moved:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / key)


# -- removing ---------------------------------------------------------------------------


def remove_folder(mailboxes: Mailboxes, cache: IndexCache, layout: FolderLayout) -> None:
    """Remove the folder and everything popbox keeps in it, under its lock; nothing if
    it is not there. INBOX last: with it go the remains of folders a killed removal
    left (a ``.NAME`` directory that still has its ``maildirfolder``), and the user's
    Maildir if nothing foreign is left in it.

    A folder's cur/ goes first (it is no longer listed then) and its marker file last,
    so a removal killed halfway is finished by the next removal of INBOX."""
    place = layout.place
    with os_errors(f"remove {place.key}"):
        try:
            if not stat.S_ISDIR(os.lstat(layout.maildir).st_mode):
                return
        except FileNotFoundError:
            return
        with FileLock(layout.lock):  # BlockingIOError: MaildropInUse
            cache.take(place.key)
            mailboxes.forget(layout.maildir)
            if place.folder == INBOX:
                with os.scandir(layout.maildir) as entries:
                    left = [
                        Path(entry.path)
                        for entry in entries
                        if entry.name.startswith(".")
                        and entry.is_dir(follow_symlinks=False)
                        and os.path.lexists(os.path.join(entry.path, FOLDER_MARKER))
                    ]
                for folder in left:
                    _remove_maildir(folder)
            _remove_maildir(layout.maildir, keep_dir=place.folder == INBOX)
        if place.folder == INBOX:
            with contextlib.suppress(OSError):  # foreign files are kept, and their Maildir
                layout.maildir.rmdir()
                fsync_dir(layout.maildir.parent)


def _remove_maildir(maildir: Path, *, keep_dir: bool = False) -> None:
    """cur/ first, the rest of popbox's and the Maildir's own, the marker file last."""
    for sub in ("cur", "new", "tmp"):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(maildir / sub)
    for name in (*_OWN_FILES, MARK_NAME, LOCK_NAME, FOLDER_MARKER):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(maildir / name)
    fsync_dir(maildir)
    if not keep_dir:
        with contextlib.suppress(OSError):  # foreign files are kept
            maildir.rmdir()
            fsync_dir(maildir.parent)
