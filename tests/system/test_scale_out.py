"""Two popbox nodes on one PostgreSQL behind a real HAProxy: one mailbox for every client.

What a site with more than one node relies on (docs/scale-out.md): clients through the
load balancer see one consistent mailbox whichever node they reach; a maildrop open on
one node is ``[IN-USE]`` on the other; a node killed with SIGKILL in the middle of a
session or of a delivery loses and duplicates nothing, and its mailboxes are usable
again through HAProxy once its lease expires; a PostgreSQL restart is survived without
restarting a node. Everything is real: `popbox serve` processes, a private PostgreSQL
cluster, HAProxy from Debian with PROXY v2 to the nodes.

Clients that talk to one node directly send their own PROXY header (the nodes trust
loopback, where HAProxy is), naming a documentation address as the client.
"""

from __future__ import annotations

import contextlib
import poplib
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.haproxy import HAProxy, addresses, render
from support.ports import free_port
from support.postgres import PostgresServer, postgres_skip_reason, start_postgres
from support.serverproc import POPBOX, ClosingPOP3, wait_listening

pytestmark = pytest.mark.interop

PASSWORD = "scale-out-secret"
LEASE = 3.0
# How long a test waits for something that takes a lease expiry or a restart.
PATIENCE = 30.0
USERS = ("alice", "bob")


def proxy_line(client: str = "198.51.100.7", port: int = 40000, to: int = 110) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} {to}\r\n".encode()


class DirectPOP3(ClosingPOP3):
    """poplib to one node, announcing itself with a PROXY header as HAProxy would."""

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = super()._create_socket(timeout)
        sock.sendall(proxy_line(to=self.port))
        return sock


class DirectLMTP(smtplib.LMTP):
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(proxy_line(to=port))
        return sock


def logged_in(client: poplib.POP3, user: str) -> poplib.POP3:
    """``client`` after USER/PASS; closed if the login is refused."""
    try:
        client.user(user)
        client.pass_(PASSWORD)
    except BaseException:
        client.close()
        raise
    return client


@dataclass
class Node:
    name: str
    directory: Path
    pop3_port: int
    lmtp_port: int
    tls_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.directory / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [*POPBOX, "serve", "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        wait_listening(self.pop3_port, self.process)
        wait_listening(self.lmtp_port, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pop3(self, user: str) -> poplib.POP3:
        return logged_in(DirectPOP3("127.0.0.1", self.pop3_port, timeout=10), user)


@dataclass
class Farm:
    nodes: list[Node]
    pop3_port: int
    lmtp_port: int
    cluster: PostgresServer
    dsn: str

    def pop3(self, user: str) -> poplib.POP3:
        return logged_in(ClosingPOP3("127.0.0.1", self.pop3_port, timeout=10), user)

    def deliver(self, user: str, message: bytes, *, port: int | None = None) -> int:
        """One LMTP delivery through HAProxy (or to the node at ``port``): the first
        reply that is not a success, else 250. OSError if the connection breaks."""
        lmtp = smtplib.LMTP if port is None else DirectLMTP
        with lmtp("127.0.0.1", port or self.lmtp_port, timeout=10) as client:
            client.ehlo("mta.test")
            client.mail("sender@example.net")
            code, _ = client.rcpt(f"{user}@example.test")
            if code != 250:
                return code
            try:
                code, _ = client.data(message)
            except smtplib.SMTPDataError as refused:
                return refused.smtp_code
            return code

    def listing(self, user: str) -> list[tuple[str, bytes]]:
        """(UIDL, body) of every message, through HAProxy, waiting out a lease."""
        client = self.login_when_free(user)
        try:
            uidls = [line.split()[1].decode() for line in client.uidl()[1]]
            bodies = [b"\r\n".join(client.retr(n + 1)[1]) for n in range(len(uidls))]
            return list(zip(uidls, bodies, strict=True))
        finally:
            client.quit()

    def login_when_free(self, user: str) -> poplib.POP3:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                return self.pop3(user)
            except (poplib.error_proto, OSError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{user} not usable within {PATIENCE}s: {exc}") from exc
                time.sleep(0.3)


def subject(body: bytes) -> bytes:
    """The Subject line of a retrieved message (popbox adds trace headers above it)."""
    return next(line for line in body.split(b"\r\n") if line.startswith(b"Subject:"))


def message(n: int, tag: str = "m") -> bytes:
    return f"Subject: {tag} {n}\r\nMessage-ID: <{tag}{n}@test>\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresServer]:
    reason = postgres_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("haproxy") is None:
        pytest.skip("HAProxy is not installed (apt-get install haproxy)")
    root = Path(tempfile.mkdtemp(prefix="popbox-scale-"))
    root.chmod(0o711)
    server = start_postgres(root / "cluster")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def write_config(node: Node, dsn: str, tls: Any) -> None:
    proxy = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
    node.config.write_text(
        f'data_dir = "{node.directory / node.name}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{node.pop3_port}"]\n'
        f'tls_listen = ["127.0.0.1:{node.tls_port}"]\n'
        f'plaintext_auth = "always"\n{proxy}'
        f'[tls]\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{node.lmtp_port}"]\n{proxy}'
        f'[storage]\nbackend = "postgresql"\n'
        f'[auth]\nbackend = "postgresql"\ndefault_scheme = "SHA256-CRYPT"\n'
        f'[postgresql]\ndsn = "{dsn}"\nlease_seconds = {LEASE}\nnode_id = "{node.name}"\n'
        f"pool_timeout = 3\n"
        f"[limits]\nauth_failure_delay = 0\nshutdown_grace = 1\n"
    )
    node.config.chmod(0o600)


@pytest.fixture
def farm(cluster: PostgresServer, shared_tmp: Path, tls_files: Any) -> Iterator[Farm]:
    dsn = cluster.create_database()
    nodes = [Node(f"node{n}", shared_tmp, free_port(), free_port(), free_port()) for n in (1, 2)]
    for node in nodes:
        write_config(node, dsn, tls_files)
    for user in USERS:
        subprocess.run(
            [*POPBOX, "user", "add", user, "--password-stdin", "--config", str(nodes[0].config)],
            input=f"{PASSWORD}\n".encode(), check=True, capture_output=True,
        )  # fmt: skip
    for node in nodes:
        node.start()
    front = (free_port(), free_port(), free_port())
    ports = [(node.pop3_port, node.tls_port, node.lmtp_port) for node in nodes]
    (shared_tmp / "haproxy").mkdir()
    proxy = HAProxy(shared_tmp / "haproxy", render(addresses("127.0.0.1", front, ports)))
    proxy.start()
    try:
        proxy.wait_for({("popbox_pop3", node.name): "UP" for node in nodes})
        yield Farm(nodes, front[0], front[2], cluster, dsn)
    finally:
        proxy.stop()
        for node in nodes:
            node.kill()


def test_clients_through_haproxy_see_one_mailbox(farm: Farm) -> None:
    for n in range(6):
        assert farm.deliver("alice", message(n)) == 250
    seen = {tuple(farm.listing("alice")) for _ in range(4)}  # sessions spread over nodes
    assert len(seen) == 1
    (listing,) = seen
    assert [subject(body) for _, body in listing] == [
        f"Subject: m {n}".encode() for n in range(6)
    ]
    # Deleted on one node, gone on the other.
    client = farm.nodes[0].pop3("alice")
    client.dele(1)
    client.quit()
    other = farm.nodes[1].pop3("alice")
    assert len(other.uidl()[1]) == 5
    other.quit()


def test_a_maildrop_open_on_one_node_is_in_use_on_the_other(farm: Farm) -> None:
    farm.deliver("alice", message(1))
    holder = farm.nodes[0].pop3("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        farm.nodes[1].pop3("alice")
    holder.quit()
    farm.nodes[1].pop3("alice").quit()  # free again at once after QUIT


def test_a_killed_node_loses_nothing_and_its_lease_expires(farm: Farm) -> None:
    for n in range(3):
        farm.deliver("alice", message(n))
    before = farm.listing("alice")
    client = farm.nodes[0].pop3("alice")
    client.dele(1)
    client.dele(2)
    farm.nodes[0].kill()  # before QUIT: nothing may be deleted
    with contextlib.suppress(OSError):
        client.close()
    started = time.monotonic()
    after = farm.listing("alice")  # through HAProxy: node2 once the lease is gone
    waited = time.monotonic() - started
    assert after == before
    assert waited < PATIENCE
    # The surviving node serves everyone meanwhile.
    assert farm.deliver("bob", message(9)) == 250


def test_a_node_killed_mid_delivery_loses_and_duplicates_nothing(farm: Farm) -> None:
    """Four MTA connections deliver through HAProxy and retry what was not
    acknowledged, as Postfix does; a node dies under them with SIGKILL. Every message
    ends up in the mailbox exactly once: one that was stored but whose 250 was lost
    with the node is recognised when it comes again."""
    queue = list(range(60))
    lock = threading.Lock()
    retried: list[int] = []

    def mta() -> None:
        deadline = time.monotonic() + 2 * PATIENCE
        while time.monotonic() < deadline:
            with lock:
                if not queue:
                    return
                n = queue.pop(0)
            try:
                code = farm.deliver("alice", message(n, "d"))
            except (smtplib.SMTPException, OSError):
                code = 0
            if code != 250:
                with lock:
                    queue.append(n)
                    retried.append(n)
                time.sleep(0.1)

    workers = [threading.Thread(target=mta) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.4)
    farm.nodes[0].kill()
    for worker in workers:
        worker.join()
    assert not queue
    subjects = [subject(body) for _, body in farm.listing("alice")]
    assert sorted(subjects) == sorted(f"Subject: d {n}".encode() for n in range(60))


def test_a_postgresql_restart_is_survived(farm: Farm) -> None:
    farm.deliver("alice", message(1))
    session = farm.nodes[0].pop3("alice")
    farm.cluster.stop("fast")
    try:
        with pytest.raises((poplib.error_proto, OSError)):
            session.retr(1)  # the body is in the database: [SYS/TEMP] or a closed line
        with contextlib.suppress(smtplib.SMTPServerDisconnected, OSError):
            code = farm.deliver("alice", message(2), port=farm.nodes[1].lmtp_port)
            assert 400 <= code < 500  # the MTA keeps it and retries
    finally:
        farm.cluster.start()
    with contextlib.suppress(poplib.error_proto, OSError):
        session.quit()
    session.close()
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            if farm.deliver("alice", message(3)) == 250:
                break
        except (smtplib.SMTPException, OSError):
            pass
        assert time.monotonic() < deadline, "no delivery after the restart"
        time.sleep(0.3)
    subjects = [subject(body) for _, body in farm.listing("alice")]
    assert subjects == [b"Subject: m 1", b"Subject: m 3"]
