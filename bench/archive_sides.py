"""The two sides bench.archive measures: notmuch and popbox's SQLite archive.

Each side indexes the same Maildirs of bench.corpus from nothing (``index``), says how
much disk it uses (``octets``), and answers one query at a time (``query``) with the
time it took in-process, the number of matches and the Message-IDs of the first page,
newest first. Neither side's process start-up is in a query's time: notmuch answers
through a long-lived bench/notmuch_query.py (the notmuch2 bindings, in the system's
python3), popbox in this process through one open ``SqliteArchive``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from bench.corpus import USERS, Corpus

__all__ = ["Answer", "Indexed", "NotmuchSide", "PopboxSide", "octets_on_disk"]

NOTMUCH: Final = "notmuch"
SYSTEM_PYTHON: Final = "/usr/bin/python3"
WORKER: Final = Path(__file__).resolve().parent / "notmuch_query.py"
# Files per add_batch call: an import's transaction, big enough that its fsync is
# paid rarely, small enough to stay well inside memory with multi-MiB messages.
BATCH: Final = 500
# A query that takes longer than this is a hang, not a figure.
QUERY_TIMEOUT: Final = 120.0


@dataclass(frozen=True)
class Indexed:
    """One indexing run over every user's Maildir."""

    seconds: float
    cpu_seconds: float
    messages: int


@dataclass(frozen=True)
class Answer:
    seconds: float
    total: int
    top: list[str]


def octets_on_disk(path: Path) -> int:
    """Allocated size of a file or tree (st_blocks, what ``du`` counts)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def normalise_id(message_id: str) -> str:
    return message_id.strip().strip("<>")


class NotmuchSide:
    """One notmuch database per user, as notmuch is used: each user runs their own."""

    name = "notmuch"

    def __init__(self, work: Path, corpus: Corpus) -> None:
        self.work = work / "notmuch"
        self.corpus = corpus
        self.worker: subprocess.Popen[str] | None = None
        self.messages_seen = 0

    def config(self, user: str) -> Path:
        return self.work / f"{user}.config"

    def database(self, user: str) -> Path:
        return self.work / f"{user}.db"

    def index(self) -> Indexed:
        self.close()
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        for user in USERS:
            self.database(user).mkdir()
            # No new.tags beyond notmuch's defaults, no exclusions, no flag syncing:
            # the plain index, and nothing hidden from a search.
            self.config(user).write_text(
                f"[database]\npath={self.database(user)}\n"
                f"mail_root={self.corpus.maildir(user)}\n"
                "[new]\ntags=inbox;unread\n[search]\nexclude_tags=\n"
                "[maildir]\nsynchronize_flags=false\n")
        cpu, started = _children_cpu(), time.perf_counter()
        for user in USERS:
            env = {**os.environ, "NOTMUCH_CONFIG": str(self.config(user))}
            subprocess.run([NOTMUCH, "new", "--quiet"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        return Indexed(seconds, _children_cpu() - cpu, self.corpus.messages)

    def octets(self) -> int:
        return sum(octets_on_disk(self.database(user)) for user in USERS)

    def open(self, user: str) -> None:
        self.close()
        self.worker = subprocess.Popen(
            [SYSTEM_PYTHON, str(WORKER), str(self.config(user))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self._line())
        self.messages_seen = int(ready["messages"])

    def _line(self) -> str:
        assert self.worker is not None
        assert self.worker.stdout is not None
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"{WORKER.name} ended (exit {self.worker.wait()})")
        return line

    def query(self, text: str, limit: int) -> Answer:
        assert self.worker is not None
        stdin: IO[str] | None = self.worker.stdin
        assert stdin is not None
        stdin.write(json.dumps({"query": text, "limit": limit}) + "\n")
        stdin.flush()
        reply = json.loads(self._line())
        if "error" in reply:
            raise RuntimeError(f"notmuch query {text!r}: {reply['error']}")
        return Answer(reply["seconds"], reply["total"],
                      [normalise_id(mid) for mid in reply["top"]])

    def close(self) -> None:
        if self.worker is not None:
            assert self.worker.stdin is not None
            self.worker.stdin.close()
            self.worker.wait(timeout=30)
            self.worker = None


class PopboxSide:
    """One SqliteArchive for every user, as a popbox site has it."""

    name = "popbox"

    def __init__(self, work: Path, corpus: Corpus) -> None:
        self.path = work / "popbox-archive"
        self.corpus = corpus
        self.runner = asyncio.Runner()
        self.archive: object | None = None
        self.user = ""

    def index(self) -> Indexed:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        cpu, started = _own_cpu(), time.perf_counter()
        added = self.runner.run(self._index())
        seconds = time.perf_counter() - started
        return Indexed(seconds, _own_cpu() - cpu, added)

    async def _index(self) -> int:
        from popbox.archive.base import ArchiveSource
        from popbox.archive.sqlite import SqliteArchive

        archive = SqliteArchive(self.path)
        added = 0
        try:
            for user in USERS:
                files = self.corpus.files(user)
                for start in range(0, len(files), BATCH):
                    done = await archive.add_batch(
                        user, list(files[start:start + BATCH]), source=ArchiveSource.IMPORTED)
                    added += len(done)
        finally:
            await archive.close()
        return added

    def octets(self) -> int:
        return octets_on_disk(self.path)

    def open(self, user: str) -> None:
        from popbox.archive.sqlite import SqliteArchive

        self.close()
        self.archive = SqliteArchive(self.path)
        self.user = user

    def query(self, text: str, limit: int) -> Answer:
        return self.runner.run(asyncio.wait_for(self._query(text, limit), QUERY_TIMEOUT))

    async def _query(self, text: str, limit: int) -> Answer:
        from popbox.archive.query import parse_query
        from popbox.archive.sqlite import SqliteArchive

        archive = self.archive
        assert isinstance(archive, SqliteArchive)
        started = time.perf_counter()
        page = await archive.search(self.user, parse_query(text), limit=limit)
        seconds = time.perf_counter() - started
        return Answer(seconds, page.total,
                      [normalise_id(hit.entry.message_id) for hit in page.hits])

    def close(self) -> None:
        if self.archive is not None:
            from popbox.archive.sqlite import SqliteArchive

            archive = self.archive
            assert isinstance(archive, SqliteArchive)
            self.runner.run(archive.close())
            self.archive = None

    def shutdown(self) -> None:
        self.close()
        self.runner.close()
