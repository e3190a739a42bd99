"""How fast the Maildir store opens a big maildrop, and what usage() costs at delivery.

Builds a maildrop of N messages (default 100,000) twice, once with ``,S=,W=`` size
fields in the names (as popbox and Dovecot write them) and once without (Postfix,
getmail), then times MaildirStore.open_maildrop:

- cold: no index yet, so the store scans, sizes every message (from W= or by reading
  it once), moves new/ to cur/ and writes the index (page cache dropped if allowed);
- warm, fresh store: the index file exists and a new MaildirStore (what a newly
  started worker process has) parses it; once after cur/ changed behind its back
  (so cur/ is rescanned), then unchanged;
- warm, same worker: the store has the parsed index cached from the last session,
  which ended with release() or with QUIT (commit_deletions) without deletions;

and usage() (the quota check LMTP runs per recipient) on each. A small-maildrop
section times what a POP3 poll costs the store: open, then QUIT without and with one
deletion (the login scenario of bench.run). A last section compares streaming a
large body with reads on the event loop against reads in a worker thread. Prints a
Markdown report; results are reports, not tests.

    .venv/bin/python bench/maildir_index.py [--messages 100000] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from popbox.store import MaildirStore
from popbox.store.index_file import INDEX_NAME
from popbox.wireform import wire_size

# Repetitions per warm figure; the median hides the noise of a shared machine.
REPEATS: Final = 5
# Large enough that per-chunk overhead dominates nothing but the read path itself.
BIG_MESSAGE: Final = 200 * 1024 * 1024
READ_CHUNK: Final = 64 * 1024


def body(n: int, rng: random.Random) -> bytes:
    """A small, deterministic message with bare-LF line ends (0.3-3 KB)."""
    lines = [
        f"From: sender{n % 97}@example.org".encode(),
        f"Subject: message {n}".encode(),
        f"Message-ID: <{n}@bench.example>".encode(),
        b"",
    ]
    lines += [b"x" * rng.randrange(20, 76) for _ in range(rng.randrange(4, 40))]
    return b"\n".join(lines) + b"\n"


def build(maildir: Path, count: int, with_sizes: bool) -> None:
    """Drop ``count`` messages into new/ as an MTA would (no popbox involved)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(1939)
    base = 1_700_000_000
    for n in range(count):
        data = body(n, rng)
        name = f"{base + n // 10}.M{n % 10:06d}P4242Q{n}.bench"
        if with_sizes:
            name += f",S={len(data)},W={wire_size(data)}"
        fd = os.open(maildir / "new" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def open_once(store: MaildirStore, user: str) -> int:
    maildrop = await store.open_maildrop(user)
    count = len(maildrop.messages)
    await maildrop.release()
    return count


async def open_quit(store: MaildirStore, user: str, delete: int = 0) -> int:
    """A POP3 session's store work: open, QUIT deleting the first ``delete`` messages."""
    maildrop = await store.open_maildrop(user)
    count = len(maildrop.messages)
    await maildrop.commit_deletions(range(min(delete, count)))
    return count


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file data (root only); False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def figure(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    if len(ms) == 1:
        return f"{ms[0]:.0f} ms"
    return f"{statistics.median(ms):.0f} ms (min {min(ms):.0f}, max {max(ms):.0f})"


async def bench_maildrop(root: Path, user: str, count: int, with_sizes: bool) -> list[str]:
    maildir = root / user
    start = time.perf_counter()
    build(maildir, count, with_sizes)
    built = time.perf_counter() - start
    store = MaildirStore(root)
    rows = [f"build {count} files: {built:.1f} s (not popbox)"]
    rows.append(f"usage(), no index yet: {figure([await timed(lambda: store.usage(user))])}")
    cache_dropped = drop_page_cache()
    cold = await timed(lambda: open_once(store, user))
    label = "page cache dropped" if cache_dropped else "page cache warm"
    rows.append(f"open_maildrop cold (no index, {label}): {figure([cold])}")
    index_size = (maildir / INDEX_NAME).stat().st_size
    rows.append(f"index file: {index_size / 1024 / 1024:.1f} MiB")
    os.utime(maildir / "cur")  # as if a MUA had just renamed something
    rescan = await timed(lambda: open_once(MaildirStore(root), user))
    rows.append(f"open_maildrop warm, fresh store, cur/ changed (rescan): {figure([rescan])}")
    fresh = [await timed(lambda: open_once(MaildirStore(root), user)) for _ in range(REPEATS)]
    rows.append(f"open_maildrop warm, fresh store: {figure(fresh)}")
    if drop_page_cache():
        cold_cache = await timed(lambda: open_once(MaildirStore(root), user))
        rows.append(f"open_maildrop warm, fresh store, page cache dropped: {figure([cold_cache])}")
    await open_once(store, user)
    cached = [await timed(lambda: open_once(store, user)) for _ in range(REPEATS)]
    rows.append(f"open_maildrop warm, same worker (index cached): {figure(cached)}")
    quits = [await timed(lambda: open_quit(store, user)) for _ in range(REPEATS)]
    rows.append(f"open + QUIT without DELE, same worker: {figure(quits)}")
    usage = [await timed(lambda: store.usage(user)) for _ in range(REPEATS)]
    rows.append(f"usage(), index current: {figure(usage)}")
    await store.deliver(user, b"Subject: one more\n\nhi\n")
    usage = [await timed(lambda: store.usage(user)) for _ in range(REPEATS)]
    rows.append(f"usage(), one new delivery in new/: {figure(usage)}")
    os.utime(maildir / "cur")  # cur/ changed behind the index's back: count it all
    usage = [await timed(lambda: store.usage(user)) for _ in range(REPEATS)]
    rows.append(f"usage(), cur/ changed (full count, cached index): {figure(usage)}")
    usage = [await timed(lambda: MaildirStore(root).usage(user)) for _ in range(REPEATS)]
    rows.append(f"usage(), cur/ changed (full count, fresh store): {figure(usage)}")
    deliveries = [await timed(lambda: store.deliver(user, b"x\n" * 500)) for _ in range(20)]
    rows.append(f"deliver() 1 KB, fsync'd: {figure(deliveries)}")
    return rows


async def bench_polls(root: Path) -> list[str]:
    """What one POP3 poll of a 10-message maildrop costs the store (login scenario)."""
    store = MaildirStore(root)
    for n in range(10):
        await store.deliver("poller", f"Subject: {n}\n\nbody\n".encode())
    await open_quit(store, "poller")
    rows = []
    for label, delete in (("QUIT without DELE", 0), ("QUIT after DELE 1 (+1 delivery)", 1)):
        samples = []
        for _ in range(200):
            start = time.perf_counter()
            await open_quit(store, "poller", delete)
            samples.append(time.perf_counter() - start)
            if delete:
                await store.deliver("poller", b"Subject: again\n\nbody\n")
        per_second = len(samples) / sum(samples)
        rows.append(f"open + {label}: {figure(samples)}, {per_second:.0f}/s in sequence")
    return rows


async def bench_read(root: Path) -> list[str]:
    """Stream a big body: reads on the loop (what the store does) vs in a thread."""
    store = MaildirStore(root)
    path = root / "big.eml"
    with path.open("wb") as handle:
        line = b"y" * 77 + b"\n"
        block = line * (1024 * 1024 // len(line))
        for _ in range(BIG_MESSAGE // len(block)):
            handle.write(block)
    with path.open("rb") as source:
        await store.deliver_file("reader", source)
    path.unlink()
    maildrop = await store.open_maildrop("reader")

    async def inline() -> None:
        async for _ in maildrop.read_message(0):
            pass

    async def threaded() -> None:
        (name,) = os.listdir(root / "reader" / "cur")
        with open(root / "reader" / "cur" / name, "rb", buffering=0) as handle:
            while await asyncio.to_thread(handle.read, READ_CHUNK):
                pass

    rows = []
    for label, reader in (("on the event loop", inline), ("in a worker thread", threaded)):
        samples = [await timed(reader) for _ in range(3)]
        best = min(samples)
        rows.append(
            f"read {BIG_MESSAGE >> 20} MiB {label}: {figure(samples)}"
            f" = {BIG_MESSAGE / best / 1e6:.0f} MB/s best"
        )
    await maildrop.release()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the maildrops")
    parser.add_argument("--skip-read", action="store_true", help="skip the 200 MiB read test")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="popbox-bench-", dir=args.dir))
    try:
        print(f"# Maildir index benchmark: {args.messages} messages\n")
        print(f"Root {root}, CPU count {os.cpu_count()}, {time.strftime('%Y-%m-%d %H:%M')}\n")
        for with_sizes in (True, False):
            user = "sized" if with_sizes else "unsized"
            title = "with ,S=/,W= in names" if with_sizes else "without size fields"
            print(f"## {title}\n")
            for row in await bench_maildrop(root, user, args.messages, with_sizes):
                print(f"- {row}")
            print()
        print("## polls of a small maildrop\n")
        for row in await bench_polls(root):
            print(f"- {row}")
        print()
        if not args.skip_read:
            print("## streaming one large message\n")
            for row in await bench_read(root):
                print(f"- {row}")
    finally:
        if args.keep:
            print(f"\n(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
