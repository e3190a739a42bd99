"""popbox behind a real HAProxy running the documented config (contrib/haproxy/haproxy.cfg).

Two `popbox serve` nodes share one Maildir data directory (flock keeps a mailbox to
one session at a time across processes), each with PROXY listeners for the balancer
and one plain listener of its own that the start-up check uses. Clients connect to
HAProxy from 127.0.0.2 and 127.0.0.3; HAProxy reaches the nodes from 127.0.0.1, the
only address they trust. What a user would notice: the node's log and its per-IP cap
see the client and not the balancer, POP3S passes through with its certificate intact,
LMTP arrives, and a stopped node is taken out by the health checks while the other
one serves.
"""

from __future__ import annotations

import contextlib
import poplib
import re
import smtplib
import socket
import ssl
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popbox.config import config_from_dict
from popbox.config_scale import TrustedProxies
from support.haproxy import CONTRIB_CONFIG, HAProxy, addresses, render
from support.ports import free_port
from support.serverproc import PASSWORD, ClosingPOP3, ServerProcess

pytestmark = pytest.mark.interop

SCALE_OUT = Path(__file__).resolve().parents[2] / "docs" / "scale-out.md"
BALANCER = "127.0.0.1"  # HAProxy's source address towards the nodes
CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
# Per node: two sessions from one address. The balancer's health checks (POP3 and
# POP3S at once, from 127.0.0.1) fit under it too.
CAP = 2
SERVERS = [
    (backend, node)
    for backend in ("popbox_pop3", "popbox_pop3s", "popbox_lmtp")
    for node in ("node1", "node2")
]


@dataclass
class Node:
    process: ServerProcess
    proxied: int
    tls: int

    def log_text(self) -> str:
        return self.process.log_text()


@dataclass
class Cluster:
    haproxy: HAProxy
    nodes: list[Node]
    pop3: int
    pop3s: int
    lmtp: int

    def logs(self) -> str:
        return "".join(node.log_text() for node in self.nodes)

    def logout_line(self, peer: str) -> str:
        """The one session-end line for ``peer`` (written just after the connection
        ends, so it may come a moment after the client's QUIT)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [line for line in self.logs().splitlines() if f" peer={peer} " in line]
            if lines:
                (line,) = lines
                return line
            time.sleep(0.05)
        raise AssertionError(f"no session of {peer} in the logs:\n{self.logs()}")


def make_node(directory: Path, shared: Path, tls_files: object) -> Node:
    """A node's config: PROXY on the balancer's listeners, a direct one for checks."""
    directory.mkdir(parents=True)
    proxied, direct, tls, lmtp = (free_port() for _ in range(4))
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{shared}"\n'
        f'[tls]\ncert = "{tls_files.cert}"\nkey = "{tls_files.key}"\n'  # type: ignore[attr-defined]
        f'[auth]\npasswd_file = "{shared / "passwd"}"\n'
        "[pop3]\n"
        f'listen = ["{BALANCER}:{proxied}", "{BALANCER}:{direct}"]\n'
        f'tls_listen = ["{BALANCER}:{tls}"]\n'
        'plaintext_auth = "always"\n'
        f'proxy_protocol = ["{BALANCER}:{proxied}", "{BALANCER}:{tls}"]\n'
        f'trusted_proxies = ["{BALANCER}/32"]\n'
        f'[lmtp]\nlisten = ["{BALANCER}:{lmtp}"]\n'
        f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n'
        "[limits]\nauth_failure_delay = 0\nshutdown_grace = 1\n"
        f"max_connections_per_ip = {CAP}\n"
    )
    config.chmod(0o600)
    return Node(ServerProcess(directory, config, direct, lmtp, ("alice",)), proxied, tls)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tls_files: object) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("haproxy")
    shared = root / "data"
    shared.mkdir()
    passwd = shared / "passwd"
    passwd.write_text(f"alice:{{PLAIN}}{PASSWORD}::::::\n")
    passwd.chmod(0o600)
    nodes = [make_node(root / name, shared, tls_files) for name in ("node1", "node2")]
    pop3, pop3s, lmtp = (free_port() for _ in range(3))
    ports = [(node.proxied, node.tls, node.process.lmtp_port) for node in nodes]
    haproxy = HAProxy(root, render(addresses(BALANCER, (pop3, pop3s, lmtp), ports)))
    try:
        for node in nodes:  # one after the other: the first makes the Maildir root
            node.process.start()
        haproxy.start()
        # Every check speaks its protocol after a PROXY v2 LOCAL header: all UP.
        haproxy.wait_for(dict.fromkeys(SERVERS, "UP"))
        yield Cluster(haproxy, nodes, pop3, pop3s, lmtp)
    finally:
        haproxy.stop()
        for node in nodes:
            node.process.stop()


class SourcedPOP3(ClosingPOP3):
    """poplib.POP3 from a chosen local address (poplib has no source_address)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


class SourcedPOP3_SSL(poplib.POP3_SSL):  # poplib spells it so
    def __init__(self, host: str, port: int, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        self.tls_context = context
        super().__init__(host, port, timeout=10, context=context)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, (self.source, 0))
        return self.tls_context.wrap_socket(sock, server_hostname=self.host)


def pop3(cluster: Cluster, source: str = CLIENT) -> poplib.POP3:
    return SourcedPOP3(BALANCER, cluster.pop3, source)


def test_the_documented_config_is_the_tested_one() -> None:
    """docs/scale-out.md shows contrib/haproxy/haproxy.cfg without its comments."""
    match = re.search(r"```haproxy\n(.*?)```", SCALE_OUT.read_text(), re.S)
    assert match is not None, "docs/scale-out.md lost its HAProxy config"
    shown = [line for line in match.group(1).splitlines() if line.strip()]
    tested = [
        line
        for line in CONTRIB_CONFIG.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert shown == tested


def test_the_documented_node_config_is_valid(tmp_path: Path) -> None:
    (block, *_) = re.findall(r"```toml\n(.*?)```", SCALE_OUT.read_text(), re.S)
    config = config_from_dict(tomllib.loads(block), tmp_path)
    assert config.storage.backend == config.auth.backend == "postgresql"
    assert config.pop3.proxied("10.0.0.11:995")
    assert "10.0.0.10" in TrustedProxies(config.lmtp.trusted_proxies)


def test_login_through_haproxy_is_logged_with_the_clients_address(cluster: Cluster) -> None:
    client = pop3(cluster)
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        client.stat()
        local_port = client.sock.getsockname()[1]
    finally:
        client.quit()
    line = cluster.logout_line(f"{CLIENT}:{local_port}")
    assert "user=alice" in line
    assert "reason=quit" in line


def test_per_ip_cap_counts_clients_not_the_balancer(cluster: Cluster) -> None:
    """Every connection reaches the nodes from HAProxy; the cap still sees each client."""
    with contextlib.ExitStack() as stack:
        # Two nodes, CAP sessions each from one client: the next one is refused.
        for _ in range(2 * CAP):
            stack.enter_context(contextlib.closing(pop3(cluster)))
        with pytest.raises(poplib.error_proto, match="too many connections"):
            pop3(cluster).close()
        # Another client is not held to the first one's count.
        other = pop3(cluster, OTHER_CLIENT)
        assert other.getwelcome().startswith(b"+OK")
        other.quit()


def test_implicit_tls_passes_through_haproxy(cluster: Cluster, tls_files: object) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca))  # type: ignore[attr-defined]
    # The node's own certificate (for localhost) reaches the client through HAProxy.
    client = SourcedPOP3_SSL("localhost", cluster.pop3s, CLIENT, context)
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        client.stat()
        local_port = client.sock.getsockname()[1]
    finally:
        client.quit()
    line = cluster.logout_line(f"{CLIENT}:{local_port}")
    assert "tls=yes" in line
    assert "user=alice" in line


def test_lmtp_through_haproxy(cluster: Cluster) -> None:
    with smtplib.LMTP(BALANCER, cluster.lmtp, source_address=(CLIENT, 0), timeout=10) as lmtp:
        assert lmtp.sock is not None
        local_port = lmtp.sock.getsockname()[1]
        lmtp.ehlo("mta.example")
        lmtp.mail("sender@example.net")
        lmtp.rcpt("alice@example.test")
        code, _ = lmtp.data(b"Subject: through the balancer\r\n\r\nhello\r\n")
    assert code == 250
    assert f"connect from {CLIENT}:{local_port} via proxy {BALANCER}:" in cluster.logs()
    client = pop3(cluster)
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        count, _ = client.stat()
        _, lines, _ = client.retr(count)
    finally:
        client.quit()
    assert b"Subject: through the balancer" in lines


def test_a_stopped_node_is_marked_down_and_the_other_serves(cluster: Cluster) -> None:
    """Last in the module: it stops node1 for good."""
    stopped, remaining = cluster.nodes
    stopped.process.stop()
    cluster.haproxy.wait_for(
        {server: "DOWN" if server[1] == "node1" else "UP" for server in SERVERS}
    )
    peers = []
    for _ in range(4):
        client = pop3(cluster)
        client.user("alice")
        client.pass_(PASSWORD)
        peers.append(f"{CLIENT}:{client.sock.getsockname()[1]}")
        client.quit()
    for peer in peers:
        assert cluster.logout_line(peer) in remaining.log_text()
