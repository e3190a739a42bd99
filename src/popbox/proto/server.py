"""The sans-I/O POP3 server connection: bytes in, events out (docs/dev/server-api.md).

``ServerConnection`` answers by itself every command that needs no I/O and hands the
glue an event for everything else (a login to verify, TLS to start, a message to
stream, deletions to commit). It parses lazily: ``next_event`` reads only as far as
the next event, so a pipelining client gets its replies in order.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from typing import Final, Literal

from popbox.proto import replies
from popbox.proto.commands import BadCommand, Command, Verb, parse_command
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
    SaslExchange,
    StartTls,
)
from popbox.proto.lines import LINE_TOO_LONG, LineReader
from popbox.proto.replies import CODE_AUTH, CODE_SYS_TEMP, err, ok
from popbox.proto.sasl import (
    CORE_MECHANISMS,
    PLAINTEXT_MECHANISMS,
    Challenge,
    Credentials,
    Mechanism,
    SaslStep,
    decode_response,
    needs_channel_binding,
    new_mechanism,
)
from popbox.proto.settings import (
    MAX_AUTH_FAILURES,
    MAX_BAD_COMMANDS,
    ServerSettings,
    check_expire,
)
from popbox.proto.snapshot import MessageLike, Snapshot
from popbox.proto.state import SessionState, accepts, next_state

__all__ = [
    "MAX_AUTH_FAILURES",
    "MAX_BAD_COMMANDS",
    "OUTPUT_HIGH_WATER",
    "ServerConnection",
    "ServerSettings",
]

# asyncio's default write-buffer high-water mark: past it the core stops answering
# pipelined commands (event FLUSH) until the glue has written and drained.
OUTPUT_HIGH_WATER: Final = 64 * 1024
# Dovecot's wording, which clients and admins already know.
PLAINTEXT_DISALLOWED: Final = (
    "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
# RFC 6856 section 3: the languages LANG offers, each with its description. Every
# reply popbox writes is English; "i-default" (RFC 2277) and "*" select it too.
LANGUAGES: Final = (("en", "English"),)
_OK_LINE: Final = b"+OK\r\n"


# What the glue owes the core before parsing may go on: "sasl" is a step of a
# mechanism the glue runs, which a challenge or the end of the login answers.
_Awaited = Literal["login", "sasl", "tls", "quit"]

_Handler = Callable[["ServerConnection", Command, SessionState], Event | None]


class ServerConnection:
    """One POP3 session, server side, without I/O."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        tls_active: bool,
        stls_available: bool,
        plaintext_auth_allowed: bool,
    ) -> None:
        self._settings = settings
        self._tls_active = tls_active
        self._stls_available = stls_available
        self._plaintext_allowed = plaintext_auth_allowed or tls_active
        self._lines = LineReader(max(settings.max_command_line, settings.max_sasl_line))
        self._state = SessionState.AUTHORIZATION
        # Replies queued since the last data_to_send(), joined once when taken: a big
        # listing is not copied into a buffer first.
        self._out: list[bytes] = []
        self._out_size = 0
        self._peer_closed = False
        self._awaiting: _Awaited | None = None
        self._close_next: CloseConnection | None = None
        self._login_next = SessionState.TRANSACTION
        self._login_mechanism = ""
        self._username: str | None = None
        self._sasl: Mechanism | None = None
        # The glue's mechanism whose next client response is awaited, if any.
        self._glue_sasl: str | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        # RFC 6856: the client said UTF8 (it accepts UTF-8 in replies and headers).
        self._utf8 = False
        self._snapshot = Snapshot(())
        # The logged-in user's own EXPIRE and LOGIN-DELAY (None: the server's).
        self._expire: str | None = None
        self._login_delay: int | None = None
        self._timestamp = (
            f"<{os.getpid()}.{secrets.token_hex(8)}@{settings.hostname}>"
            if settings.apop_enabled
            else None
        )

    # -- what the glue reads -------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def utf8(self) -> bool:
        """Whether the client enabled UTF-8 mode (RFC 6856 section 2)."""
        return self._utf8

    @property
    def apop_timestamp(self) -> str | None:
        """The ``<pid.nonce@host>`` of the greeting when APOP is enabled."""
        return self._timestamp

    def greeting(self) -> bytes:
        """The first line the server sends (RFC 1939 section 4)."""
        text = f"{self._settings.implementation} ready."
        if self._timestamp is not None:
            text = f"{text} {self._timestamp}"
        return ok(text)

    def data_to_send(self) -> bytes:
        """Queued replies, in order; the queue is emptied."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        self._out = []
        self._out_size = 0
        return data

    # -- bytes in, events out ------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._peer_closed = True
            return
        if self._state is not SessionState.CLOSED:
            self._lines.feed(data)

    def next_event(self) -> Event:
        """Answer what needs no I/O, up to the next event for the glue."""
        if self._close_next is not None:
            closing, self._close_next = self._close_next, None
            self._state = SessionState.CLOSED
            return closing
        if self._state is SessionState.CLOSED:
            return ConnectionClosed()
        if self._awaiting is not None:
            raise RuntimeError(f"next_event() called while waiting for the glue: {self._awaiting}")
        while True:
            if self._out_size >= OUTPUT_HIGH_WATER:
                return FLUSH
            in_sasl = self._sasl is not None or self._glue_sasl is not None
            limit = self._settings.max_sasl_line if in_sasl else self._settings.max_command_line
            line = self._lines.read_line(limit)
            if line is None:
                if self._peer_closed:
                    self._state = SessionState.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            if line is LINE_TOO_LONG:
                event = self._on_too_long()
            elif self._sasl is not None:
                event = self._on_sasl_response(self._sasl, line)
            elif self._glue_sasl is not None:
                event = self._on_glue_sasl_response(self._glue_sasl, line)
            else:
                event = self._on_command(line)
            if event is not None:
                return event

    # -- what the glue reports -----------------------------------------------------

    def login_succeeded(
        self,
        messages: Sequence[MessageLike],
        *,
        expire: str | None = None,
        login_delay: int | None = None,
    ) -> None:
        """The login was verified and the maildrop opened: enter TRANSACTION.

        ``expire`` (days or NEVER) and ``login_delay`` (seconds) are the user's own
        values, which CAPA shows from now on; None keeps the server's.
        """
        if expire is not None:
            check_expire(expire)
        if login_delay is not None and login_delay < 0:
            raise ValueError("login_delay must be 0 or more seconds")
        self._expect_login()
        self._expire = expire
        self._login_delay = login_delay
        self._snapshot = Snapshot(messages)
        self._state = self._login_next
        count, octets = self._snapshot.stat()
        self._queue(ok(f"Logged in, {count} messages ({octets} octets)."))

    def login_failed(self, code: str | None, text: str) -> None:
        """The login failed: ``-ERR [code] text``; bad credentials count as failures."""
        self._expect_login()
        self._queue(err(text, code))
        if code not in _NOT_AUTH_FAILURES:
            self._count_auth_failure()

    def sasl_challenge(self, data: bytes) -> None:
        """Go on with the glue's mechanism: send ``+ base64(data)`` and hand over the
        client's response as the next ``SaslExchange``."""
        self._expect("sasl")
        self._queue(replies.sasl_challenge(data))
        self._glue_sasl = self._login_mechanism  # the client's next line answers it

    def tls_established(self) -> None:
        """The STLS handshake is done: forget all plaintext input and session hints."""
        self._expect("tls")
        # CVE-2011-0411: whatever the client pipelined after STLS came in plaintext and
        # may have been injected by a man in the middle.
        self._lines.clear()
        self._tls_active = True
        self._plaintext_allowed = True
        self._username = None

    def message_start(self, event: Retrieve) -> bytes:
        """The ``+OK`` line before a message's wire bytes."""
        if event.body_lines is None:
            return ok(f"{event.size} octets")
        return ok("Top of message follows.")

    def message_unavailable(self, event: Retrieve) -> bytes:
        """The reply when the glue could not open the message."""
        return err(f"Message {event.number} is unavailable, try again later.", CODE_SYS_TEMP)

    def quit_result(self, succeeded: bool, remaining: int) -> bytes:
        """The reply to QUIT in TRANSACTION once the deletions are committed (or not)."""
        self._expect("quit")
        self._state = SessionState.CLOSED
        if succeeded:
            return ok(f"Logging out, {remaining} messages left.")
        return err("Some deleted messages not removed.", CODE_SYS_TEMP)

    # -- internals -----------------------------------------------------------------

    def _expect(self, awaited: _Awaited) -> None:
        if self._awaiting != awaited:
            raise RuntimeError(f"not waiting for {awaited} (waiting for {self._awaiting})")
        self._awaiting = None

    def _expect_login(self) -> None:
        """A login ends here, whether a login event or a glue-run exchange led to it."""
        if self._awaiting not in ("login", "sasl"):
            raise RuntimeError(f"not waiting for login (waiting for {self._awaiting})")
        self._awaiting = None
        self._glue_sasl = None

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _close(self, reason: str) -> CloseConnection:
        self._state = SessionState.CLOSED
        return CloseConnection(reason)

    def _bad_command(self, reply: bytes) -> Event | None:
        self._bad_commands += 1
        if self._bad_commands >= self._settings.max_bad_commands:
            self._queue(err("Too many bad commands."))
            return self._close("too many bad commands")
        self._queue(reply)
        return None

    def _count_auth_failure(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self._settings.max_auth_failures:
            self._close_next = CloseConnection("too many authentication failures")

    def _auth_failure(self, reply: bytes) -> Event | None:
        self._queue(reply)
        self._count_auth_failure()
        if self._close_next is not None:
            closing, self._close_next = self._close_next, None
            self._state = SessionState.CLOSED
            return closing
        return None

    def _on_too_long(self) -> Event | None:
        if self._sasl is not None or self._glue_sasl is not None:
            self._sasl = self._glue_sasl = None
            return self._auth_failure(err("SASL response too long.", CODE_AUTH))
        return self._bad_command(err("Line too long."))

    def _on_command(self, line: bytes) -> Event | None:
        command = parse_command(line)
        if isinstance(command, BadCommand):
            return self._bad_command(err(command.reason))
        following = next_state(self._state, command.verb)
        if following is None:
            return self._bad_command(err(f"{command.verb.value} is not allowed now."))
        return _HANDLERS[command.verb](self, command, following)

    # -- handlers: the state table has already allowed the command ------------------

    def _capabilities(self) -> list[str]:
        settings = self._settings
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state is SessionState.TRANSACTION:
            # RFC 2449 sections 6.5 and 6.7: after login, this user's values, untagged.
            expire = self._expire if self._expire is not None else settings.expire
            delay = self._login_delay if self._login_delay is not None else settings.login_delay
            if delay > 0:
                capabilities.append(f"LOGIN-DELAY {delay}")
        else:
            # Before it, the bounds over every user; USER says a second CAPA after
            # login tells this user's own.
            expire = settings.expire + (" USER" if settings.expire_per_user else "")
            delay = settings.login_delay
            if delay > 0 or settings.login_delay_per_user:
                tag = " USER" if settings.login_delay_per_user else ""
                capabilities.append(f"LOGIN-DELAY {delay}{tag}")
        capabilities.append(f"EXPIRE {expire}")
        capabilities.append(f"IMPLEMENTATION {settings.implementation}")
        # RFC 6856: announced in both states; USER says UTF-8 user names and
        # passwords are accepted (the parser takes UTF-8 and normalises names).
        capabilities.append("UTF8 USER")
        capabilities.append("LANG")
        if accepts(self._state, Verb.STLS) and self._stls_available and not self._tls_active:
            capabilities.append("STLS")
        if self._plaintext_allowed and accepts(self._state, Verb.USER):
            capabilities.append("USER")
        if accepts(self._state, Verb.AUTH):
            usable = self._usable_mechanisms()
            if usable:
                capabilities.append("SASL " + " ".join(usable))
        return capabilities

    def _usable_mechanisms(self) -> list[str]:
        """The offered mechanisms this connection may use now."""
        return [name for name in self._settings.mechanisms if self._may_use(name)]

    def _may_use(self, name: str) -> bool:
        if name in PLAINTEXT_MECHANISMS and not self._plaintext_allowed:
            return False
        return self._tls_active or not needs_channel_binding(name)

    def _capa(self, command: Command, following: SessionState) -> Event | None:
        self._queue(replies.multiline("Capability list follows", self._capabilities()))
        return None

    def _stls(self, command: Command, following: SessionState) -> Event | None:
        if self._tls_active:
            return self._bad_command(err("TLS is already active."))
        if not self._stls_available:
            return self._bad_command(err("TLS is not available."))
        self._queue(ok("Begin TLS negotiation now."))
        self._awaiting = "tls"
        return StartTls()

    def _user(self, command: Command, following: SessionState) -> Event | None:
        if not self._plaintext_allowed:
            return self._bad_command(err(PLAINTEXT_DISALLOWED, CODE_AUTH))
        assert command.name is not None
        self._username = command.name
        self._queue(ok())
        return None

    def _pass(self, command: Command, following: SessionState) -> Event | None:
        if not self._plaintext_allowed:
            return self._bad_command(err(PLAINTEXT_DISALLOWED, CODE_AUTH))
        if self._username is None:
            return self._bad_command(err("No user name given (send USER first)."))
        assert command.secret is not None
        username, self._username = self._username, None
        return self._login(LoginRequest(username, command.secret, "USER"), following)

    def _apop(self, command: Command, following: SessionState) -> Event | None:
        if self._timestamp is None:
            return self._bad_command(err("APOP is not enabled."))
        assert command.name is not None
        assert command.secret is not None
        return self._login(ApopRequest(command.name, command.secret, self._timestamp), following)

    def _login(self, event: LoginRequest | ApopRequest, following: SessionState) -> Event:
        self._awaiting = "login"
        self._login_next = following
        return event

    def _auth(self, command: Command, following: SessionState) -> Event | None:
        if command.name is None:
            self._queue(replies.multiline("Available mechanisms", self._usable_mechanisms()))
            return None
        name = command.name
        if name not in self._settings.mechanisms:
            return self._bad_command(err("Unsupported authentication mechanism."))
        if name in PLAINTEXT_MECHANISMS and not self._plaintext_allowed:
            return self._bad_command(err(PLAINTEXT_DISALLOWED, CODE_AUTH))
        if not self._may_use(name):
            return self._bad_command(err("Channel binding needs TLS.", CODE_AUTH))
        self._login_next = following
        initial: bytes | None = None
        if command.initial_response is not None:
            # RFC 5034 section 4: "=" is an empty initial response.
            response = command.initial_response
            initial = b"" if response == b"=" else decode_response(response)
            if initial is None:
                return self._auth_failure(err("Invalid base64 data.", CODE_AUTH))
        if name not in CORE_MECHANISMS:
            self._login_mechanism = name
            self._awaiting = "sasl"
            return SaslExchange(name, initial, first=True)
        mechanism = new_mechanism(name)
        assert mechanism is not None  # every core mechanism has one
        return self._sasl_step(mechanism, mechanism.start(initial))

    def _on_glue_sasl_response(self, name: str, line: bytes) -> Event | None:
        self._glue_sasl = None
        if line == b"*":
            return self._bad_command(err("Authentication cancelled."))
        data = decode_response(line)
        if data is None:
            return self._auth_failure(err("Invalid base64 data.", CODE_AUTH))
        self._awaiting = "sasl"
        return SaslExchange(name, data, first=False)

    def _on_sasl_response(self, mechanism: Mechanism, line: bytes) -> Event | None:
        self._sasl = None
        if line == b"*":
            # RFC 5034 section 4: the client cancelled. Not an authentication failure,
            # but a client looping on it should still run out of budget.
            return self._bad_command(err("Authentication cancelled."))
        data = decode_response(line)
        if data is None:
            return self._auth_failure(err("Invalid base64 data.", CODE_AUTH))
        return self._sasl_step(mechanism, mechanism.respond(data))

    def _sasl_step(self, mechanism: Mechanism, step: SaslStep) -> Event | None:
        if isinstance(step, Challenge):
            self._sasl = mechanism
            self._queue(replies.sasl_challenge(step.data))
            return None
        if isinstance(step, Credentials):
            self._awaiting = "login"
            return LoginRequest(step.username, step.password, mechanism.name, step.authzid)
        return self._auth_failure(err(step.reason, CODE_AUTH))

    def _quit(self, command: Command, following: SessionState) -> Event | None:
        if following is SessionState.UPDATE:
            self._state = following
            self._awaiting = "quit"
            return Quit(self._snapshot.deletions())
        self._queue(ok(f"{self._settings.implementation} signing off."))
        return self._close("client quit")

    def _stat(self, command: Command, following: SessionState) -> Event | None:
        self._queue(b"+OK %d %d\r\n" % self._snapshot.stat())
        return None

    def _list(self, command: Command, following: SessionState) -> Event | None:
        snapshot = self._snapshot
        if command.number is None:
            self._queue_listing(snapshot.listing("LIST"))
            return None
        index = snapshot.index_of(command.number)
        if isinstance(index, bytes):
            self._queue(index)
        else:
            self._queue(b"+OK %d %d\r\n" % (command.number, snapshot.size(index)))
        return None

    def _uidl(self, command: Command, following: SessionState) -> Event | None:
        snapshot = self._snapshot
        clean = snapshot.uidls_clean()
        if command.number is None:
            if clean:
                self._queue_listing(snapshot.listing("UIDL"))
            else:
                count, octets = snapshot.stat()
                lines = (f"{number} {snapshot.uidl(index)}" for number, index in snapshot.live())
                self._queue(replies.multiline(f"{count} messages ({octets} octets)", lines))
            return None
        index = snapshot.index_of(command.number)
        if isinstance(index, bytes):
            self._queue(index)
        elif clean:
            uidl = snapshot.uidl(index).encode("ascii")
            self._queue(b"+OK %d %s\r\n" % (command.number, uidl))
        else:
            self._queue(ok(f"{command.number} {snapshot.uidl(index)}"))
        return None

    def _queue_listing(self, block: bytes) -> None:
        count, octets = self._snapshot.stat()
        self._queue(b"+OK %d messages (%d octets)\r\n" % (count, octets))
        self._queue(block)
        self._queue(replies.TERMINATOR)

    def _retrieve(self, command: Command, following: SessionState) -> Event | None:
        assert command.number is not None
        index = self._snapshot.index_of(command.number)
        if isinstance(index, bytes):
            self._queue(index)
            return None
        return Retrieve(index, command.number, self._snapshot.size(index), command.lines)

    def _dele(self, command: Command, following: SessionState) -> Event | None:
        assert command.number is not None
        index = self._snapshot.index_of(command.number)
        if isinstance(index, bytes):
            self._queue(index)
        else:
            self._snapshot.delete(index)
            self._queue(ok(f"Message {command.number} deleted."))
        return None

    def _utf8_mode(self, command: Command, following: SessionState) -> Event | None:
        self._utf8 = True
        self._queue(ok("UTF8 enabled."))
        return None

    def _lang(self, command: Command, following: SessionState) -> Event | None:
        if command.name is None:
            lines = (f"{tag} {description}" for tag, description in LANGUAGES)
            self._queue(replies.multiline("Language listing follows", lines))
            return None
        chosen = _choose_language(command.name)
        if chosen is None:
            self._queue(err("Language not supported."))
        else:
            # RFC 6856 section 3: the reply starts with the tag of the language chosen.
            self._queue(ok(f"{chosen} Language is now {dict(LANGUAGES)[chosen]}."))
        return None

    def _noop(self, command: Command, following: SessionState) -> Event | None:
        self._queue(_OK_LINE)
        return None

    def _rset(self, command: Command, following: SessionState) -> Event | None:
        self._snapshot.undelete_all()
        count, octets = self._snapshot.stat()
        self._queue(ok(f"Maildrop has {count} messages ({octets} octets)."))
        return None


def _choose_language(wanted: str) -> str | None:
    """The language a LANG range selects (RFC 4647 section 3.3.1 basic filtering)."""
    wanted = wanted.lower()
    if wanted in ("*", "i-default"):
        return LANGUAGES[0][0]
    for tag, _ in LANGUAGES:
        if tag == wanted or tag.startswith(wanted + "-") or wanted.startswith(tag + "-"):
            return tag
    return None


# Refusals after a correct password (RFC 2449 section 8.1, RFC 3206): no guess was wrong.
_NOT_AUTH_FAILURES: Final = frozenset(
    {replies.CODE_IN_USE, replies.CODE_LOGIN_DELAY, replies.CODE_SYS_TEMP, replies.CODE_SYS_PERM}
)

_HANDLERS: Final[dict[Verb, _Handler]] = {
    Verb.CAPA: ServerConnection._capa,
    Verb.STLS: ServerConnection._stls,
    Verb.USER: ServerConnection._user,
    Verb.PASS: ServerConnection._pass,
    Verb.APOP: ServerConnection._apop,
    Verb.AUTH: ServerConnection._auth,
    Verb.QUIT: ServerConnection._quit,
    Verb.STAT: ServerConnection._stat,
    Verb.LIST: ServerConnection._list,
    Verb.UIDL: ServerConnection._uidl,
    Verb.RETR: ServerConnection._retrieve,
    Verb.TOP: ServerConnection._retrieve,
    Verb.DELE: ServerConnection._dele,
    Verb.NOOP: ServerConnection._noop,
    Verb.UTF8: ServerConnection._utf8_mode,
    Verb.LANG: ServerConnection._lang,
    Verb.RSET: ServerConnection._rset,
}
