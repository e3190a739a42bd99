"""The session's parts alone, without sockets: flow control (pause, resume, drain), the
watchdog (progress, waiting on us, release of its session), the outlet's writes, and
the replies the session writes itself.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from popbox.net import session
from popbox.net.flow import WRITE_HIGH_WATER, WRITE_LOW_WATER, FlowControl
from popbox.net.outlet import TransportOutlet
from popbox.net.watchdog import Watchdog

# What a hung wait is given before the test fails: only a bound, never a figure.
SETTLE = 5.0


class FakeTransport(asyncio.Transport):
    """Records what flow control and the outlet ask of a transport."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.limits: tuple[int | None, int | None] | None = None
        self.written: list[bytes] = []
        self.closing = False

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.written.append(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def attached() -> tuple[FlowControl, FakeTransport]:
    flow = FlowControl(asyncio.get_running_loop())
    transport = FakeTransport()
    flow.attach(transport)
    return flow, transport


# -- flow control ------------------------------------------------------------------


async def test_attach_sets_our_write_buffer_limits_and_nothing_paused() -> None:
    flow, transport = attached()
    assert transport.limits == (WRITE_HIGH_WATER, WRITE_LOW_WATER)
    flow.pause_reading()
    flow.pause_writing()
    tls_layer = FakeTransport()
    flow.attach(tls_layer)  # as after STLS: the new transport is neither paused
    assert flow.transport is tls_layer
    assert not flow.read_paused
    assert not flow.write_paused
    assert tls_layer.limits == (WRITE_HIGH_WATER, WRITE_LOW_WATER)


async def test_reading_is_paused_and_resumed_once_each() -> None:
    flow, transport = attached()
    flow.resume_reading()  # not paused: nothing to do
    flow.pause_reading()
    flow.pause_reading()
    flow.resume_reading()
    flow.resume_reading()
    assert transport.calls == ["pause_reading", "resume_reading"]


async def test_a_lost_connection_is_not_paused_or_resumed_any_more() -> None:
    flow, transport = attached()
    flow.pause_reading()
    flow.connection_lost()
    flow.resume_reading()
    flow.pause_reading()
    assert transport.calls == ["pause_reading"]


async def test_drain_returns_at_once_while_writing_is_not_paused() -> None:
    flow, _ = attached()
    await asyncio.wait_for(flow.drain(), SETTLE)
    assert not flow.waiting_on_client


async def test_drain_waits_for_resume_writing_and_says_it_woke_a_writer() -> None:
    flow, _ = attached()
    flow.pause_writing()
    drain = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    assert not drain.done()
    assert flow.waiting_on_client  # the watchdog counts this as the client's time
    assert flow.resume_writing() is True
    await asyncio.wait_for(drain, SETTLE)
    assert not flow.waiting_on_client
    # Nobody waits now: the protocol is told to go on with what it held back itself.
    assert flow.resume_writing() is False


async def test_a_lost_connection_wakes_the_drain_with_connection_reset() -> None:
    flow, _ = attached()
    flow.pause_writing()
    drain = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    flow.connection_lost()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(drain, SETTLE)
    with pytest.raises(ConnectionResetError):
        await flow.drain()  # and any later one, paused or not


async def test_a_wait_around_the_transport_counts_as_paused_writing() -> None:
    flow, _ = attached()
    writable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    wait = asyncio.ensure_future(flow.wait_writable(writable))
    await asyncio.sleep(0)
    assert flow.write_paused
    assert flow.waiting_on_client
    writable.set_result(None)
    await asyncio.wait_for(wait, SETTLE)
    assert not flow.write_paused
    assert not flow.waiting_on_client


# -- the watchdog ------------------------------------------------------------------


class FakeSession:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.gone = False
        self.waiting_on_us = False
        self.expired = asyncio.Event()

    def watch_timeout(self) -> float:
        return self.timeout

    def timed_out(self) -> None:
        self.expired.set()


async def test_watchdog_cuts_a_session_without_progress() -> None:
    watched = FakeSession(0.05)
    Watchdog(asyncio.get_running_loop()).arm(watched)
    await asyncio.wait_for(watched.expired.wait(), SETTLE)


async def test_progress_postpones_the_cut() -> None:
    watched = FakeSession(1.0)
    watchdog = Watchdog(asyncio.get_running_loop())
    watchdog.arm(watched)
    for _ in range(30):
        await asyncio.sleep(0.05)
        watchdog.progress()
    assert not watched.expired.is_set()
    await asyncio.wait_for(watched.expired.wait(), SETTLE)


async def test_time_spent_waiting_on_our_backends_is_not_idleness() -> None:
    watched = FakeSession(0.02)
    watched.waiting_on_us = True  # a slow hash or store: not the client's fault
    Watchdog(asyncio.get_running_loop()).arm(watched)
    await asyncio.sleep(0.2)
    assert not watched.expired.is_set()
    watched.waiting_on_us = False
    await asyncio.wait_for(watched.expired.wait(), SETTLE)


async def test_a_lost_session_is_not_cut_again() -> None:
    watched = FakeSession(0.02)
    Watchdog(asyncio.get_running_loop()).arm(watched)
    watched.gone = True
    await asyncio.sleep(0.2)
    assert not watched.expired.is_set()


async def test_a_cancelled_watchdog_lets_its_session_go_without_the_cycle_collector() -> None:
    watched = FakeSession(60)
    watchdog = Watchdog(asyncio.get_running_loop())
    watchdog.arm(watched)
    watchdog.rearm(watched)
    watchdog.cancel()
    freed = weakref.ref(watched)
    gc.disable()
    try:
        del watched
        assert freed() is None
    finally:
        gc.enable()


# -- the outlet --------------------------------------------------------------------


async def test_outlet_writes_count_as_progress_and_skip_a_closing_transport() -> None:
    flow, transport = attached()
    loop = asyncio.get_running_loop()
    watched = FakeSession(1.0)
    watchdog = Watchdog(loop)
    watchdog.arm(watched)
    outlet = TransportOutlet(flow, watchdog, loop, tls=False)
    for _ in range(30):
        await asyncio.sleep(0.05)
        outlet.writelines([b"+OK ", b"body\r\n"])
    assert not watched.expired.is_set()
    outlet.write(b"")  # nothing to write is no write
    assert transport.written == [b"+OK body\r\n"] * 30
    transport.closing = True
    outlet.write(b"late")
    outlet.writelines([b"late"])
    assert transport.written == [b"+OK body\r\n"] * 30
    watchdog.cancel()


async def test_outlet_sends_files_only_on_a_plain_socket() -> None:
    flow, _ = attached()
    loop = asyncio.get_running_loop()
    tls = TransportOutlet(flow, Watchdog(loop), loop, tls=True)
    assert not tls.can_send_files
    # The fake transport has no socket either: streaming is the way then.
    plain = TransportOutlet(flow, Watchdog(loop), loop, tls=False)
    assert not plain.can_send_files
    plain.close()
    plain.close()  # closing twice is harmless


# -- the session's own replies -----------------------------------------------------


def test_the_replies_the_session_writes_itself_are_unchanged() -> None:
    assert session.IDLE_REPLY == b"-ERR Disconnected for inactivity.\r\n"
    assert session.TOO_MANY_CONNECTIONS_REPLY == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert session.SHUTDOWN_REPLY == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
