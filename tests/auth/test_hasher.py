"""Hasher: password checks on dedicated threads, results handed back in batches."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popbox.auth.hasher import Hasher, default_threads, shared_hasher
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.auth.schemes import hash_password
from support.auth import CHEAP, WritePasswd


@pytest.fixture
def hasher() -> Iterator[Hasher]:
    made = Hasher(2, name="test-hash")
    yield made
    made.close()


async def test_concurrent_calls_each_get_their_own_answer(hasher: Hasher) -> None:
    def slow_square(n: int) -> int:
        time.sleep(0.001 * (n % 3))  # finish out of order
        return n * n

    results = await asyncio.gather(*(hasher.run(slow_square, n) for n in range(200)))
    assert results == [n * n for n in range(200)]


async def test_an_exception_reaches_the_caller_and_the_thread_lives_on() -> None:
    single = Hasher(1)
    try:

        def broken() -> int:
            raise ValueError("malformed hash")

        with pytest.raises(ValueError, match="malformed hash"):
            await single.run(broken)
        # The one thread is still there to take the next job.
        assert await single.run(lambda: 42) == 42
    finally:
        single.close()


async def test_a_cancelled_caller_does_not_disturb_the_others(hasher: Hasher) -> None:
    release = threading.Event()
    blocked = asyncio.ensure_future(hasher.run(release.wait, 5))
    others = [asyncio.ensure_future(hasher.run(lambda n=n: n + 1)) for n in range(10)]
    await asyncio.sleep(0.05)
    blocked.cancel()
    release.set()
    assert await asyncio.gather(*others) == list(range(1, 11))
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert await hasher.run(lambda: "still serving") == "still serving"


@pytest.mark.timeout(30)
async def test_close_finishes_queued_jobs_then_refuses_and_does_not_hang() -> None:
    closing = Hasher(1, name="closing-hash")
    queued = [asyncio.ensure_future(closing.run(time.sleep, 0.01)) for _ in range(5)]
    await asyncio.sleep(0)  # the jobs are on the queue
    await asyncio.to_thread(closing.close)
    await asyncio.gather(*queued)  # every job queued before close() ran
    assert not [t for t in threading.enumerate() if t.name.startswith("closing-hash")]
    with pytest.raises(RuntimeError, match="closed"):
        await closing.run(lambda: None)


@pytest.mark.timeout(30)
async def test_a_hasher_never_used_closes_at_once() -> None:
    # Threads start on first use: a Hasher never used has none to stop or wait for.
    unused = Hasher(4, name="unused-hash")
    assert not [t for t in threading.enumerate() if t.name.startswith("unused-hash")]
    unused.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("unused-hash")]


def test_threads_match_the_default_executor() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == min(32, cores + 4)
    with pytest.raises(ValueError, match="at least one"):
        Hasher(0)


def test_one_shared_hasher_per_process() -> None:
    assert shared_hasher() is shared_hasher()


async def test_passwd_file_logins_through_the_hasher_all_get_the_right_answer(
    write_passwd: WritePasswd, hasher: Hasher
) -> None:
    users = {f"user{n}": f"password-{n}" for n in range(8)}
    path = write_passwd(
        "".join(
            f"{name}:{hash_password(pw, 'SHA512-CRYPT', cost=CHEAP)}\n"
            for name, pw in users.items()
        )
    )
    db = PasswdFilePassDB(Path(path), check_interval=0, hasher=hasher)
    attempts = [(name, pw) for name, pw in users.items()] * 4
    attempts += [(name, pw + "x") for name, pw in users.items()]  # wrong passwords
    attempts += [("nobody", "password-1")]  # unknown user: hashed against the dummy
    records = await asyncio.gather(*(db.verify(name, pw) for name, pw in attempts))
    for (name, pw), record in zip(attempts, records, strict=True):
        if name in users and users[name] == pw:
            assert record is not None
            assert record.name == name
        else:
            assert record is None


def test_hash_threads_setting_is_bounded_and_named_in_errors(tmp_path: Path) -> None:
    from popbox.config import config_from_dict
    from popbox.errors import ConfigError

    assert config_from_dict({}, tmp_path).auth.hash_threads == 0  # the default size
    assert config_from_dict({"auth": {"hash_threads": 2}}, tmp_path).auth.hash_threads == 2
    for bad in (-1, 33):
        with pytest.raises(ConfigError, match="hash_threads"):
            config_from_dict({"auth": {"hash_threads": bad}}, tmp_path)
