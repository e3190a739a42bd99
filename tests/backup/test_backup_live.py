"""`popbox backup` of a real `popbox serve` that is delivering and serving meanwhile,
restored onto a fresh data directory and served again: every login sees what it saw.

The original server runs as a subprocess; mail comes in over LMTP, clients are stdlib
poplib over real sockets, devices are ``alice~phone`` and ``alice~laptop`` logins, the
archive is popbox's own (SqliteArchive), kept by the server of every delivery and
written to by a thread during the backup; a collector-like state database beside it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import poplib
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from popbox.store import MaildirStore
from support.serverproc import ServerProcess, deliver_lmtp, running

from .archive_files import ArchiveFiles, Shown
from .live import (
    Seen,
    delete,
    make_config,
    message,
    popbox,
    see,
    see_and_delete_first,
)

T = TypeVar("T")
USERS = ("alice", "bob", "carol", "dave")
# Every login whose view must come back exactly; bob and carol change during the backup.
STILL_LOGINS = (
    "alice",
    "alice~phone",
    "alice~laptop",
    "alice+work",
    "alice+work~phone",
    "alice+Trash",
    "dave",
)
TERMS = ("invoice", "holiday", "report")
# What is searched for in the archive: erin's imports, and what popbox serve kept of
# the deliveries to the others (archive.keep = ["delivered"]).
SEARCHES = (
    *(("erin", term) for term in TERMS),
    ("alice", "alice"),
    ("bob", "bob"),
    ("carol", "carol"),
)
# As Dovecot's default pop3_uidl_format served it.
KEPT_UIDL = "00000001507C6B1A"


class Loop:
    """Runs ``step`` in a thread until stopped; keeps what went wrong for the test."""

    def __init__(self, step: Callable[[int], None]) -> None:
        self._step = step
        self.stop = threading.Event()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        turn = 0
        try:
            while not self.stop.is_set():
                self._step(turn)
                turn += 1
                self.started.set()
        except BaseException as exc:  # re-raised by join, in the test's thread
            self.error = exc
            self.started.set()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error


def deliver(server: ServerProcess, recipient: str, name: str) -> None:
    assert deliver_lmtp(server.lmtp_port, recipient, message(name)) == 250


def archive_of(server: ServerProcess) -> Path:
    return server.directory / "data" / "archive"


def search_all(path: Path) -> dict[tuple[str, str], list[Shown]]:
    """Every search's hits with each hit's octets: what the web page shows."""
    archive = ArchiveFiles(path)
    try:
        return {(user, text): archive.search(user, text) for user, text in SEARCHES}
    finally:
        archive.close()


def archived_ids(path: Path, user: str) -> set[int]:
    archive = ArchiveFiles(path)
    try:
        return set(archive.ids(user))
    finally:
        archive.close()


def populate(server: ServerProcess) -> str:
    """Mail, folders, devices with deletions, an app password, an archive and a
    collector state database; returns dave's app password."""
    for number in range(8):
        deliver(server, "alice", f"alice-{number}")
    for number in range(3):
        deliver(server, "alice+work", f"work-{number}")
    for number in range(24):
        deliver(server, "bob", f"bob-{number}")
    for number in range(4):
        deliver(server, "carol", f"carol-{number}")
    deliver(server, "dave", "dave-0")
    # A UIDL kept from the server popbox replaced, delivered as `popbox import` does.
    store = MaildirStore(server.directory / "data" / "mail", save_crlf=True)
    asyncio.run(store.deliver("dave", message("dave-kept"), uidl=KEPT_UIDL))
    see(server, "alice")
    see(server, "alice~laptop")
    delete(server, "alice~phone", (1, 2))
    delete(server, "alice~laptop", (3,))
    delete(server, "alice~phone", (1,))  # alice-3 for the phone, moved on by then
    delete(server, "alice+work~phone", (1,))
    delete(server, "alice", (8,))  # every device's: it goes to Trash
    see(server, "carol")
    delete(server, "bob", (24,))  # bob's Trash, which the live test watches
    shown = popbox(server.config, "user", "app-password", "add", "dave", "tablet").stdout
    archive = ArchiveFiles(archive_of(server))
    for number in range(30):
        archive.add("erin", f"{TERMS[number % 3]} {number}", f"text {number} {TERMS[number % 3]}")
    # Large enough for an object file of its own (small pieces stay in the index).
    archive.add("erin", "invoice scan", base64.b64encode(os.urandom(200_000)).decode())
    archive.close()
    state = sqlite3.connect(server.directory / "data" / "fetch-state.sqlite")
    state.execute("PRAGMA journal_mode=WAL")
    state.execute("CREATE TABLE seen (account TEXT, uidl TEXT, PRIMARY KEY (account, uidl))")
    with state:
        state.executemany("INSERT INTO seen VALUES ('a', ?)", [(f"u{n}",) for n in range(50)])
    state.close()
    return shown.strip().splitlines()[-1]


def bob_state(server: ServerProcess) -> tuple[Seen, Seen]:
    return see(server, "bob"), see(server, "bob+Trash")


def again_if_in_use(action: Callable[[], T]) -> T:
    """``action`` until no login of it meets [IN-USE] (the backup holds the folder),
    as a mail client tries again later."""
    while True:
        try:
            return action()
        except poplib.error_proto as exc:
            if b"[IN-USE]" not in exc.args[0]:
                raise


def views(server: ServerProcess, app_password: str) -> dict[str, Seen]:
    seen = {login: see(server, login) for login in STILL_LOGINS}
    seen["dave/app"] = see(server, "dave", app_password)
    return seen


@pytest.fixture
def original(tmp_path: Path) -> Iterator[ServerProcess]:
    server = make_config(tmp_path / "original", USERS)
    with running(server):
        yield server


def restore_and_serve(tmp_path: Path, name: str, snapshot: Path) -> ServerProcess:
    server = make_config(tmp_path / name, passwd=False)
    done = popbox(server.config, "restore", str(snapshot))
    assert "restored" in done.stdout
    return server


def test_snapshot_taken_while_serving_restores_what_every_login_saw(
    original: ServerProcess, tmp_path: Path
) -> None:
    app_password = populate(original)
    before = views(original, app_password)
    # Each device sees the mailbox its own way: what it deleted is gone for it only.
    assert before["alice~phone"].subjects == [f"alice-{number}" for number in range(3, 8)]
    assert "alice-2" not in before["alice~laptop"].subjects
    assert before["alice"].subjects == [f"alice-{number}" for number in range(7)]
    assert before["alice+Trash"].subjects == ["work-0"]
    assert before["dave"].uidls[1] == KEPT_UIDL
    bob_seen: list[tuple[Seen, Seen]] = [bob_state(original)]
    carol_before = see(original, "carol")
    assert carol_before.subjects == [f"carol-{number}" for number in range(4)]
    carol_sent: list[str] = []
    archive_added: list[int] = []
    writer: list[ArchiveFiles] = []

    def bob_step(turn: int) -> None:
        # A delivery, then a session that retrieves everything and deletes the first
        # message (to Trash); after each, the state it left: INBOX and Trash, which
        # only this thread changes, so the two logins that look see one state.
        deliver(original, "bob", f"bob-live-{turn}")
        bob_seen.append(again_if_in_use(lambda: bob_state(original)))
        again_if_in_use(lambda: see_and_delete_first(original, "bob"))
        bob_seen.append(again_if_in_use(lambda: bob_state(original)))

    def carol_step(turn: int) -> None:
        deliver(original, "carol", f"carol-live-{turn}")
        carol_sent.append(f"carol-live-{turn}")

    def archive_step(turn: int) -> None:
        if not writer:
            writer.append(ArchiveFiles(archive_of(original)))
        archive_added.append(writer[0].add("erin", f"report live {turn}", f"report {turn}"))

    loops = [Loop(bob_step), Loop(carol_step), Loop(archive_step)]
    for loop in loops:
        assert loop.started.wait(60)
    carol_before_backup = len(carol_sent)
    archive_before_backup = len(archive_added)
    try:
        done = popbox(original.config, "backup", str(tmp_path / "backups"), "--json")
    finally:
        for loop in loops:
            loop.join()
        for archive in writer:
            archive.close()
    outcome = json.loads(done.stdout)
    assert outcome["users"] == 4
    assert outcome["databases"] == 2
    assert not outcome["not_included"]
    snapshot = Path(outcome["snapshot"])
    bob_seen.append(bob_state(original))
    carol_after = see(original, "carol")

    restored = restore_and_serve(tmp_path, "restored", snapshot)
    with running(restored):
        again = views(restored, app_password)
        bob_again = bob_state(restored)
        carol_again = see(restored, "carol")
    assert again == before
    # bob's mailbox as one of the sessions left it, never between two of them (a
    # message in both folders, or in neither, or back with a new UIDL).
    assert len(bob_seen) > 2
    assert bob_again in bob_seen
    # carol: what she had, unchanged, and the deliveries the backup found, each with
    # a UIDL of its own after them.
    assert carol_again.messages[:4] == carol_before.messages
    live = carol_again.subjects[4:]
    assert set(carol_sent[:carol_before_backup]) <= set(live) <= set(carol_sent)
    assert len(set(carol_again.uidls)) == len(carol_again.uidls)
    assert carol_after.messages[:4] == carol_before.messages
    # The archive: the same results for every search, up to what the backup caught.
    restored_hits = search_all(archive_of(restored))
    original_hits = search_all(archive_of(original))
    ids = {user: archived_ids(archive_of(restored), user) for user, _ in SEARCHES}
    assert set(archive_added[:archive_before_backup]) <= ids["erin"]
    assert len(restored_hits[("erin", "report")]) >= 10 + archive_before_backup
    assert len(restored_hits[("alice", "alice")]) == 8  # alice-0 to alice-7
    for (user, text), hits in restored_hits.items():
        assert hits == [hit for hit in original_hits[(user, text)] if hit[0] in ids[user]]
    state = sqlite3.connect(restored.directory / "data" / "fetch-state.sqlite")
    assert state.execute("SELECT count(*) FROM seen").fetchone() == (50,)
    state.close()
    _check_modes(restored.directory / "data")


def _folder(path: str) -> str:
    """The folder of a message's snapshot path (its Maildir), else the path itself."""
    folder, _, sub = path.rpartition("/")[0].rpartition("/")
    return folder if sub in ("cur", "new") else path


def _check_modes(top: Path) -> None:
    for directory, _, files in os.walk(top):
        assert os.stat(directory).st_mode & 0o777 == 0o700, directory
        for name in files:
            assert os.stat(Path(directory) / name).st_mode & 0o777 == 0o600, name


def test_second_backup_links_unchanged_files_and_stands_alone(
    original: ServerProcess, tmp_path: Path
) -> None:
    app_password = populate(original)
    backups = tmp_path / "backups"
    done = json.loads(popbox(original.config, "backup", str(backups), "--json").stdout)
    first = Path(done["snapshot"])
    deliver(original, "alice", "alice-late")
    delete(original, "bob", (1,))
    # What clients see now (every folder has its UIDLs by then: a mailbox nobody has
    # logged in to has none yet, and gets them at its first login wherever it is).
    now = views(original, app_password)
    now["bob"] = see(original, "bob")
    done = json.loads(popbox(original.config, "backup", str(backups), "--json").stdout)
    second = Path(done["snapshot"])
    assert done["previous"] == str(first)
    assert done["copied"] < done["linked"]
    old = json.loads((first / "manifest.json").read_text())
    new = json.loads((second / "manifest.json").read_text())
    new_paths = {entry["path"] for entry in new["files"]}
    # Unchanged messages are found again by folder and content though a first login
    # moved them from new/ to cur/ meanwhile; bob's deleted one went to Trash.
    by_place = {(_folder(e["path"]), e["sha256"]): e["path"] for e in new["files"]}
    immutable = [e for e in old["files"] if e["kind"] in ("message", "object")]
    assert any(entry["kind"] == "object" for entry in immutable)
    assert any(entry["path"] == "archive/index.sqlite" for entry in old["files"])
    kept = [
        (entry["path"], by_place[(_folder(entry["path"]), entry["sha256"])])
        for entry in immutable
        if (_folder(entry["path"]), entry["sha256"]) in by_place
    ]
    assert len(kept) == len(immutable) - 1
    assert done["linked"] == len(kept)
    assert any(old_path != new_path for old_path, new_path in kept)
    for old_path, new_path in kept:
        one = os.stat(first / "files" / old_path)
        two = os.stat(second / "files" / new_path)
        assert one.st_ino == two.st_ino, new_path
        assert two.st_nlink >= 2
    for entry in old["files"]:
        if entry["kind"] in ("maildir-meta", "sqlite") and entry["path"] in new_paths:
            one = os.stat(first / "files" / entry["path"])
            assert one.st_ino != os.stat(second / "files" / entry["path"]).st_ino
    shutil.rmtree(first)
    restored = restore_and_serve(tmp_path, "restored", backups)
    with running(restored):
        again = views(restored, app_password)
        again["bob"] = see(restored, "bob")
    assert again == now
    assert search_all(archive_of(restored)) == search_all(archive_of(original))
