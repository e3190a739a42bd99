"""Memory exhaustion by hostile clients, measured on a real `popbox serve` process.

The attacks: an endless command line, an endless SASL response, and thousands of
pipelined RETRs from a client that never reads. The server's resident memory must not
follow what the client sends or asks for; it is read from /proc/PID/status.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from support.serverproc import PASSWORD, ServerProcess, deliver_lmtp, make_server, running

# What a client sends or asks for is 64 MiB or more in each test; growth by a quarter of
# that would mean the server is buffering it.
SENT = 64 * 1024 * 1024
ALLOWED_GROWTH_KIB = 16 * 1024


def _client(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.pop3_port), 10)
    sock.settimeout(10)
    assert sock.recv(1024).startswith(b"+OK")
    return sock


def _send_endless_line(sock: socket.socket, size: int) -> None:
    chunk = b"A" * (1024 * 1024)
    for _ in range(size // len(chunk)):
        sock.sendall(chunk)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        piece = sock.recv(1)
        if not piece:
            break
        data += piece
    return data


def test_endless_command_line_is_not_buffered(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    with running(server):
        baseline = server.rss_kib()
        sock = _client(server)
        _send_endless_line(sock, SENT)
        sock.sendall(b"\r\nCAPA\r\n")
        assert _read_line(sock).startswith(b"-ERR")
        # The session survives the refusal and goes on reading commands.
        assert _read_line(sock).startswith(b"+OK")
        assert server.rss_kib() - baseline < ALLOWED_GROWTH_KIB
        sock.close()


def test_endless_sasl_response_is_not_buffered(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    with running(server):
        baseline = server.rss_kib()
        sock = _client(server)
        sock.sendall(b"AUTH PLAIN\r\n")
        assert _read_line(sock).startswith(b"+ ")
        _send_endless_line(sock, SENT)
        sock.sendall(b"\r\n")
        assert _read_line(sock).startswith(b"-ERR")
        assert server.rss_kib() - baseline < ALLOWED_GROWTH_KIB
        sock.close()


def test_pipelined_retrs_never_read_keep_server_memory_bounded(tmp_path: Path) -> None:
    """5,000 RETRs of a 1 MiB message ask for 5 GiB; the server must hold back."""
    server = make_server(tmp_path)
    message = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 1024
    with running(server):
        assert deliver_lmtp(server.lmtp_port, "alice", message) == 250
        sock = _client(server)
        # Small receive buffer: the kernel holds little on our side either.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
        assert _read_line(sock).startswith(b"+OK")
        assert _read_line(sock).startswith(b"+OK")
        baseline = server.rss_kib()
        sock.setblocking(False)
        request = b"RETR 1\r\n" * 5000
        sent = 0
        deadline = time.monotonic() + 5
        # Send what the kernel takes; the server stops reading once its output is full.
        while sent < len(request) and time.monotonic() < deadline:
            try:
                sent += sock.send(request[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        peak = 0
        for _ in range(20):  # a second of the server trying to answer
            peak = max(peak, server.rss_kib())
            time.sleep(0.05)
        assert peak - baseline < ALLOWED_GROWTH_KIB, (peak, baseline)
        assert server.process is not None
        assert server.process.poll() is None
        sock.close()
