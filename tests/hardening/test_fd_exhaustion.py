"""Running out of file descriptors: accept() backs off, the server survives and recovers.

A flood of connections past RLIMIT_NOFILE makes accept() fail with EMFILE. An event
loop that treats that as fatal, or retries it in a hot loop, would crash or spin; the
server must keep its sessions, keep the extra connections waiting in the kernel's
backlog, and serve them once descriptors are free again.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

from support.serverproc import make_server, running

# Low enough that a hundred connections exhaust it, high enough for the server's own
# files (listeners, passwd file, the interpreter's imports).
SERVER_NOFILE = 64
FLOOD = 150


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))


def test_descriptor_exhaustion_makes_accept_back_off_not_crash(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    with running(server, preexec_fn=_limit_descriptors):
        logged_in = server.pop3("alice")  # a session that must survive the flood
        flood: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                flood.append(socket.create_connection(("127.0.0.1", server.pop3_port), 5))
            # Give the server time to hit EMFILE on its accepts.
            time.sleep(1.0)
            assert server.process is not None
            assert server.process.poll() is None, server.log_text()
            # The existing session still works while descriptors are exhausted.
            assert logged_in.stat()[0] == 0
            fds = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
            assert fds <= SERVER_NOFILE
        finally:
            for sock in flood:
                with contextlib.suppress(OSError):
                    sock.close()
        logged_in.quit()
        # Once descriptors are free, new clients are served again (after the back-off).
        deadline = time.monotonic() + 20
        while True:
            try:
                client = server.pop3("bob", timeout=3)
                break
            except (OSError, EOFError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"not served after the flood: {exc}") from exc
                time.sleep(0.2)
        assert client.stat()[0] == 0
        client.quit()
        assert server.process is not None
        assert server.process.poll() is None
        log = server.log_text()
        # The flood really exhausted the descriptors: not every connection became a session.
        assert log.count("user=- ") < FLOOD
        assert "Traceback" not in log
