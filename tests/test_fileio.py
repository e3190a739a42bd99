"""The shared file lock: exclusive across opens, released by close, exit or collection."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest

from popbox.fileio import FileLock


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = FileLock(path)
    with pytest.raises(BlockingIOError):
        FileLock(path)  # the same process: flock conflicts between two opens
    first.close()
    first.close()  # twice is fine
    assert not first.held
    with FileLock(path) as second:
        assert second.held
    assert not second.held


def test_waiting_holder_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = FileLock(path)
    taken = threading.Event()

    def wait_for_it() -> None:
        with FileLock(path, wait=True):
            taken.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert not taken.wait(0.2)
    first.close()
    waiter.join(timeout=10)
    assert taken.is_set()


def test_a_dropped_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    FileLock(path)  # never closed, never kept
    gc.collect()
    FileLock(path).close()


def test_the_lock_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    FileLock(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
