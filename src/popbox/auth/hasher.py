"""Password checks on dedicated threads, handed back to the event loop in batches.

A login's hash (SHA512-CRYPT at 5,000 rounds: about 1 ms in libxcrypt, outside the
GIL) cannot run on the event loop. ``loop.run_in_executor`` on the default pool moves
it off, but pays per login for a concurrent Future chained to an asyncio Future,
a wake of a pool thread through the executor's queue and idle semaphore, and one wake
of the loop per finished hash.

A ``Hasher`` keeps threads of its own (by default as many as the default executor
would start: the cores plus four, at most 32) waiting on a queue of their own. The
loop hands a job over with one queue put; a thread runs it and appends the outcome
to a list, and only the first outcome of a batch wakes the loop
(``call_soon_threadsafe``), which then settles every finished job in one callback.
Under load, several hashes end per loop turn and share one wake.

A job that raises hands its exception to its caller; the thread lives on. ``close()``
stops the threads after the jobs already queued; a job submitted after it fails with
RuntimeError. Threads start on first use, so a Hasher made before ``fork()`` is usable
in the child as long as it was not used in the parent.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT_EXTRA_THREADS",
    "DEFAULT_THREAD_CEILING",
    "Hasher",
    "default_threads",
    "shared_hasher",
]

T = TypeVar("T")

# ThreadPoolExecutor's default size, min(32, cores + 4), which hashed logins before.
# Fewer threads (one worker's share of the cores) were measured to cost throughput on
# a machine shared with other processes: the kernel shares a core between runnable
# threads, so a worker with one hashing thread got less of the machine for its hashes.
DEFAULT_THREAD_CEILING: Final = 32
DEFAULT_EXTRA_THREADS: Final = 4
# What a thread takes off the queue to stop.
_STOP: Final = object()


def default_threads() -> int:
    """Hashing threads for one process: the cores it may run on plus four, at most 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return min(cores + DEFAULT_EXTRA_THREADS, DEFAULT_THREAD_CEILING)


_shared: tuple[int, Hasher] | None = None
_shared_guard = threading.Lock()


def shared_hasher() -> Hasher:
    """This process's Hasher for whoever was not given one (one per process, as the
    default executor is; a forked child gets its own)."""
    global _shared
    with _shared_guard:
        pid = os.getpid()
        if _shared is None or _shared[0] != pid:
            _shared = (pid, Hasher(default_threads()))
        return _shared[1]


class _Job:
    __slots__ = ("args", "func", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self.loop = loop
        self.future = future
        self.func = func
        self.args = args


class Hasher:
    """Runs blocking calls on ``threads`` dedicated threads; ``await hasher.run(f, *args)``."""

    def __init__(self, threads: int = 1, *, name: str = "popbox-hash") -> None:
        if threads < 1:
            raise ValueError("a Hasher needs at least one thread")
        self._size = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_guard = threading.Lock()
        self._closed = False
        # Finished jobs waiting for the loop, per loop (a test may run several loops).
        self._done_guard = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]]
        self._done = {}

    @property
    def threads(self) -> int:
        return self._size

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` on a hashing thread; its result, or its exception raised here.

        Cancelling the awaiting task does not stop a call already running; its
        outcome is dropped.
        """
        if self._closed:
            raise RuntimeError("Hasher is closed")
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(loop, future, func, args))
        return await future

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the threads once the queued jobs are done; wait up to ``timeout`` each."""
        with self._start_guard:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(timeout)
        # A job that slipped in behind the stops (run() racing close()) is refused,
        # not left waiting for ever.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job):
                self._finished(job, None, RuntimeError("Hasher is closed"))

    def _start(self) -> None:
        with self._start_guard:
            if self._threads or self._closed:
                return
            for number in range(self._size):
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{number}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if not isinstance(job, _Job):
                return
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.func(*job.args)
            except BaseException as exc:  # handed to the caller, not lost
                error = exc
            self._finished(job, result, error)
            del job, result, error  # nothing of a login outlives it on this thread

    def _finished(self, job: _Job, result: Any, error: BaseException | None) -> None:
        loop = job.loop
        with self._done_guard:
            batch = self._done.get(loop)
            first = batch is None
            if batch is None:
                batch = self._done[loop] = []
            batch.append((job, result, error))
        if first:
            # Only the first outcome of a batch wakes the loop; the rest ride along.
            try:
                loop.call_soon_threadsafe(self._settle, loop)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with self._done_guard:
                    self._done.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._done_guard:
            batch = self._done.pop(loop, [])
        for job, result, error in batch:
            future = job.future
            if future.done():  # cancelled while the thread was at it
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
