"""Stateful fuzzing of the sans-I/O server against a model of RFC 1939.

Hypothesis drives one ServerConnection through any sequence of logins, listings,
retrievals, deletions, RSETs, junk and QUIT, fed in arbitrary chunk sizes, and checks
every reply against the model: message numbers never change within a session, sizes
are the octets RETR sends, deleted messages are refused and skipped, RSET restores
them, and QUIT commits exactly the set deleted (in TRANSACTION) or nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    ApopRequest,
    CloseConnection,
    ConnectionClosed,
    Event,
    LoginRequest,
    Quit,
    Retrieve,
    StartTls,
)
from popbox.proto.server import ServerConnection, ServerSettings
from popbox.proto.state import SessionState
from popbox.proto.wire import WireEncoder
from popbox.store.base import MessageInfo
from popbox.wireform import wire_size
from support.wire import unstuff, wire

USER, PASSWORD = "mrose", "tanstaaf"


@dataclass
class Stub:
    """The glue of docs/dev/server-api.md, synchronous, with a fixed maildrop."""

    conn: ServerConnection
    messages: list[bytes]
    chunk: int
    committed: frozenset[int] | None = None
    closed: bool = False
    events: list[Event] = field(default_factory=list)

    def send(self, data: bytes) -> bytes:
        out = bytearray()
        for start in range(0, max(len(data), 1), self.chunk):
            if self.closed:
                break
            self.conn.receive_data(data[start : start + self.chunk])
            out += self._run()
        return bytes(out)

    def _run(self) -> bytes:
        out = bytearray()
        while not self.closed:
            event = self.conn.next_event()
            out += self.conn.data_to_send()
            if event is NEED_DATA:
                break
            if event is FLUSH:
                continue
            out += self._act(event)
        return bytes(out)

    def _act(self, event: Event) -> bytes:
        conn = self.conn
        if isinstance(event, LoginRequest):
            if (event.username, event.password) == (USER, PASSWORD):
                infos = [
                    MessageInfo(f"u{i}", wire_size(m)) for i, m in enumerate(self.messages)
                ]
                conn.login_succeeded(infos)
            else:
                conn.login_failed("AUTH", "Authentication failed.")
            return b""
        if isinstance(event, ApopRequest):
            conn.login_failed("AUTH", "Authentication failed.")
            return b""
        if isinstance(event, StartTls):
            conn.tls_established()
            return b""
        if isinstance(event, Retrieve):
            encoder = WireEncoder(event.body_lines)
            data = self.messages[event.index]
            body = encoder.encode(data) if data else b""
            return conn.message_start(event) + body + encoder.finish()
        if isinstance(event, Quit):
            self.closed = True
            self.committed = event.deletions
            return conn.quit_result(True, len(self.messages) - len(event.deletions))
        assert isinstance(event, CloseConnection | ConnectionClosed), event
        self.closed = True
        return b""


def read_multiline(reply: bytes) -> tuple[bytes, bytes]:
    """Split ``+OK ...\\r\\n<body>.\\r\\n`` into status line and un-stuffed body."""
    status, _, rest = reply.partition(b"\r\n")
    assert rest.endswith(b".\r\n"), reply[-50:]
    return status, unstuff(rest[:-3])


class Rfc1939Session(RuleBasedStateMachine):
    """One session; the model is ``messages`` plus the set of deleted numbers."""

    @initialize(
        messages=st.lists(
            st.binary(max_size=300)
            | st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"x" * 40]))
            .map(b"".join),
            max_size=6,
        ),
        chunk=st.integers(min_value=1, max_value=64),
    )
    def start(self, messages: list[bytes], chunk: int) -> None:
        self.connect(messages, chunk)

    def connect(self, messages: list[bytes], chunk: int) -> None:
        conn = ServerConnection(
            ServerSettings(max_bad_commands=10_000, max_auth_failures=10_000),
            tls_active=False,
            stls_available=True,
            plaintext_auth_allowed=True,
        )
        self.stub = Stub(conn, messages, chunk)
        self.messages = messages
        self.deleted: set[int] = set()
        assert conn.greeting().startswith(b"+OK")

    # -- helpers ------------------------------------------------------------------

    def cmd(self, line: bytes) -> bytes:
        return self.stub.send(line + b"\r\n")

    @property
    def in_transaction(self) -> bool:
        return self.stub.conn.state is SessionState.TRANSACTION

    @property
    def open(self) -> bool:
        return not self.stub.closed

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def expect_number_error(self, number: int, reply: bytes) -> bool:
        """True (and checked) when ``number`` must be refused."""
        if not 1 <= number <= len(self.messages):
            assert reply.startswith(b"-ERR"), reply
            return True
        if number in self.deleted:
            assert reply.startswith(b"-ERR"), reply
            return True
        return False

    # -- AUTHORIZATION ---------------------------------------------------------------

    @precondition(lambda self: self.open and not self.in_transaction)
    @rule(good=st.booleans(), sasl=st.booleans())
    def login(self, good: bool, sasl: bool) -> None:
        password = PASSWORD if good else "wrong"
        if sasl:
            import base64

            token = base64.b64encode(f"\0{USER}\0{password}".encode())
            reply = self.cmd(b"AUTH PLAIN " + token)
        else:
            reply = self.cmd(f"USER {USER}".encode()) + self.cmd(f"PASS {password}".encode())
        if good:
            assert reply.endswith(b"+OK Logged in.\r\n") or b"+OK" in reply.splitlines()[-1]
            assert self.in_transaction
        else:
            assert b"-ERR [AUTH]" in reply
            assert not self.in_transaction

    @precondition(lambda self: self.open and not self.in_transaction)
    @rule(verb=st.sampled_from([b"STAT", b"LIST", b"UIDL 1", b"RETR 1", b"DELE 1", b"RSET"]))
    def transaction_command_before_login_is_refused(self, verb: bytes) -> None:
        assert self.cmd(verb).startswith(b"-ERR")

    # -- TRANSACTION ------------------------------------------------------------------

    @precondition(lambda self: self.open and self.in_transaction)
    @rule()
    def stat(self) -> None:
        live = self.live()
        octets = sum(wire_size(self.messages[n - 1]) for n in live)
        assert self.cmd(b"STAT") == b"+OK %d %d\r\n" % (len(live), octets)

    @precondition(lambda self: self.open and self.in_transaction)
    @rule()
    def list_all(self) -> None:
        status, body = read_multiline(self.cmd(b"LIST"))
        assert status.startswith(b"+OK")
        expected = b"".join(
            b"%d %d\r\n" % (n, wire_size(self.messages[n - 1])) for n in self.live()
        )
        assert body == expected

    @precondition(lambda self: self.open and self.in_transaction)
    @rule()
    def uidl_all(self) -> None:
        status, body = read_multiline(self.cmd(b"UIDL"))
        assert status.startswith(b"+OK")
        assert body == b"".join(b"%d u%d\r\n" % (n, n - 1) for n in self.live())

    @precondition(lambda self: self.open and self.in_transaction)
    @rule(number=st.integers(min_value=-2, max_value=8))
    def list_one(self, number: int) -> None:
        reply = self.cmd(b"LIST %d" % number)
        if number < 1 or not self.expect_number_error(number, reply):
            if number >= 1:
                size = wire_size(self.messages[number - 1])
                assert reply == b"+OK %d %d\r\n" % (number, size)
            else:
                assert reply.startswith(b"-ERR")

    @precondition(lambda self: self.open and self.in_transaction)
    @rule(number=st.integers(min_value=0, max_value=8))
    def uidl_one(self, number: int) -> None:
        reply = self.cmd(b"UIDL %d" % number)
        if not self.expect_number_error(number, reply):
            assert reply == b"+OK %d u%d\r\n" % (number, number - 1)

    @precondition(lambda self: self.open and self.in_transaction)
    @rule(number=st.integers(min_value=0, max_value=8))
    def retr(self, number: int) -> None:
        reply = self.cmd(b"RETR %d" % number)
        if self.expect_number_error(number, reply):
            return
        status, body = read_multiline(reply)
        data = self.messages[number - 1]
        # Sizes are wire sizes: exactly the octets RETR sends, un-stuffed.
        assert status == b"+OK %d octets" % wire_size(data)
        assert body == wire(data)
        assert len(body) == wire_size(data)

    @precondition(lambda self: self.open and self.in_transaction)
    @rule(number=st.integers(min_value=0, max_value=8), lines=st.integers(0, 3))
    def top(self, number: int, lines: int) -> None:
        reply = self.cmd(b"TOP %d %d" % (number, lines))
        if self.expect_number_error(number, reply):
            return
        status, body = read_multiline(reply)
        assert status.startswith(b"+OK")
        # TOP sends a prefix of what RETR sends.
        assert wire(self.messages[number - 1]).startswith(body)

    @precondition(lambda self: self.open and self.in_transaction)
    @rule(number=st.integers(min_value=0, max_value=8))
    def dele(self, number: int) -> None:
        reply = self.cmd(b"DELE %d" % number)
        if self.expect_number_error(number, reply):
            return
        assert reply.startswith(b"+OK")
        self.deleted.add(number)

    @precondition(lambda self: self.open and self.in_transaction)
    @rule()
    def rset(self) -> None:
        assert self.cmd(b"RSET").startswith(b"+OK")
        self.deleted.clear()

    @precondition(lambda self: self.open and self.in_transaction)
    @rule()
    def noop(self) -> None:
        assert self.cmd(b"NOOP") == b"+OK\r\n"

    @precondition(lambda self: self.open)
    @rule(line=st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b))
    def junk(self, line: bytes) -> None:
        """Anything else changes nothing the model tracks (unless it is a command the
        model also knows: those are left to their own rules)."""
        verb = line.split(b" ", 1)[0].upper()
        if verb in {b"DELE", b"RSET", b"QUIT", b"USER", b"PASS", b"AUTH", b"APOP", b"STLS", b"*"}:
            return
        if self.in_transaction and verb in {b"RETR", b"TOP", b"LIST", b"UIDL", b"STAT", b"NOOP"}:
            return
        reply = self.cmd(line)
        assert reply.startswith((b"+OK", b"-ERR")) or not line.strip(), reply

    @precondition(lambda self: self.open)
    @rule()
    def quit(self) -> None:
        in_transaction = self.in_transaction
        reply = self.cmd(b"QUIT")
        assert reply.startswith(b"+OK")
        assert self.stub.closed
        if in_transaction:
            # QUIT commits exactly what is marked deleted: snapshot indexes.
            assert self.stub.committed == frozenset(n - 1 for n in self.deleted)
        else:
            assert self.stub.committed is None  # nothing to commit before login

    @precondition(lambda self: not self.open)
    @rule(chunk=st.integers(min_value=1, max_value=64))
    def reconnect(self, chunk: int) -> None:
        """A new session sees the maildrop the last QUIT committed, renumbered."""
        committed = self.stub.committed or frozenset()
        kept = [m for i, m in enumerate(self.messages) if i not in committed]
        self.connect(kept, chunk)

    @invariant()
    def nothing_committed_before_quit(self) -> None:
        if hasattr(self, "stub") and not self.stub.closed:
            assert self.stub.committed is None


Rfc1939Session.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_rfc1939_session_model = Rfc1939Session.TestCase
