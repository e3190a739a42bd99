"""Loopback ports for servers a test starts as subprocesses (Postfix, Dovecot, `popbox serve`).

A server started in-process binds port 0 and reports what it got; one in another
process must be told a port, so the test asks the kernel for a free one first. The
port is free when this returns, not reserved: a server that fails to bind it in the
meantime fails its test loudly rather than silently talking to someone else.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
