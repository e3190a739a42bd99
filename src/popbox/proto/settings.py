"""What one POP3 server offers, the same for every connection: ``ServerSettings``,
validated once (the protocol core, popbox.proto.server, reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from popbox.proto.lines import MAX_COMMAND_LINE, MAX_SASL_LINE
from popbox.proto.sasl import MECHANISMS, is_mechanism_name

__all__ = ["MAX_AUTH_FAILURES", "MAX_BAD_COMMANDS", "ServerSettings", "check_expire"]

# Dovecot's CLIENT_MAX_BAD_COMMANDS: a client that keeps sending garbage is cut off.
MAX_BAD_COMMANDS: Final = 20
# Dovecot disconnects after 3 failed authentications on one connection.
MAX_AUTH_FAILURES: Final = 3
# RFC 2449 section 4 is the floor for a command line; less breaks real clients.
_MIN_LINE: Final = 255


@dataclass(frozen=True)
class ServerSettings:
    """What one server offers; the same for every connection.

    ``expire`` and ``login_delay`` are what CAPA announces before login (RFC 2449
    sections 6.5 and 6.7): where users have values of their own, the smallest
    retention and the largest delay that any user has, with ``*_per_user`` set so
    that CAPA adds the USER tag; ``login_succeeded`` then gives the user's own.
    """

    implementation: str = "popbox"
    expire: str = "NEVER"
    """EXPIRE: days or NEVER."""
    expire_per_user: bool = False
    login_delay: int = 0
    """LOGIN-DELAY in seconds; 0 (and not per user) leaves the capability out."""
    login_delay_per_user: bool = False
    apop_enabled: bool = False
    mechanisms: tuple[str, ...] = MECHANISMS
    """The SASL mechanisms offered, in the order CAPA lists them. PLAIN and LOGIN the
    core runs itself; any other is the glue's (events.SaslExchange). Password and
    token mechanisms are listed only where plaintext logins are allowed, ``-PLUS``
    ones only inside TLS."""
    hostname: str = "localhost"
    max_command_line: int = MAX_COMMAND_LINE
    max_sasl_line: int = MAX_SASL_LINE
    max_bad_commands: int = MAX_BAD_COMMANDS
    max_auth_failures: int = MAX_AUTH_FAILURES

    def __post_init__(self) -> None:
        check_expire(self.expire)
        if self.login_delay < 0:
            raise ValueError("login_delay must be 0 or more seconds")
        for name in ("implementation", "hostname"):
            value: str = getattr(self, name)
            if not value or not value.isascii() or not value.isprintable() or " " in value:
                raise ValueError(f"{name} must be printable ASCII without spaces")
        if min(self.max_command_line, self.max_sasl_line) < _MIN_LINE:
            raise ValueError(f"line limits must be at least {_MIN_LINE} octets")
        if min(self.max_bad_commands, self.max_auth_failures) < 1:
            raise ValueError("max_bad_commands and max_auth_failures must be at least 1")
        for name in self.mechanisms:
            if not is_mechanism_name(name):
                raise ValueError(f"{name!r} is not a SASL mechanism name (RFC 4422)")
        if len(set(self.mechanisms)) != len(self.mechanisms):
            raise ValueError("a SASL mechanism is listed twice")


def check_expire(expire: str) -> None:
    """ValueError unless ``expire`` is a number of days or NEVER (RFC 2449 section 6.7)."""
    if expire != "NEVER" and not (expire.isascii() and expire.isdigit()):
        raise ValueError("expire must be a number of days or NEVER")
