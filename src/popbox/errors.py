"""The one exception tree of popbox.

Every error popbox raises on purpose is a ``PopboxError``. Driver errors (OSError,
psycopg, httpx, ...) are translated into one of these at the edge of the backend that
met them, with ``raise ... from exc`` so the cause stays in the log::

    PopboxError
    ├── ConfigError               a setting is missing or wrong; names the key
    ├── ProtocolError             the peer broke the protocol (sans-I/O core)
    │   └── LineTooLong           a line exceeded its limit
    ├── AuthError                 the user database could not be consulted
    │   └── InvalidUsername       a name that can never be a user (path tricks, ...)
    ├── StoreError                the mail store failed                 -> [SYS/TEMP]
    │   ├── MaildropInUse         another session holds the maildrop    -> [IN-USE]
    │   ├── PermanentStoreError   retrying will not help                -> [SYS/PERM]
    │   │   ├── InvalidMailboxName  a folder or device name that cannot be one
    │   │   ├── NoSuchFolder        the login names a folder that does not exist
    │   │   ├── InvalidUidl         a UIDL handed to the store that RFC 1939 does not allow
    │   │   └── TooManyDevices      the folder has as many devices as it may hold
    │   ├── LoginTooSoon          the device logged in less than LOGIN-DELAY ago -> [LOGIN-DELAY]
    │   ├── NoSuchMailbox         the user has no maildrop
    │   └── QuotaExceeded         delivery would pass the user's quota
    ├── DeliveryError             a message could not be delivered
    │   ├── UnknownRecipient      no such user                          -> 550 5.1.1
    │   ├── MessageTooBig         over the size limit                   -> 552 5.3.4
    │   └── TemporaryDeliveryError try again later                      -> 451 4.3.0
    ├── CollectorError            the collector could not finish a step
    │   ├── RemoteServerError     the remote POP3 server said -ERR or misbehaved
    │   ├── OAuthLoginRequired    a stored OAuth2 login stopped working; sign in again
    │   └── SinkError             a sink refused or failed a message
    │       ├── TemporarySinkError   retry later
    │       │   └── SinkUnavailable  the sink takes nothing now: the run stops, no message fails
    │       └── PermanentSinkError   quarantine the message
    └── ArchiveError              the archive failed (its database or its files)
        ├── InvalidQuery          a search the query language cannot read; says where
        ├── NoSuchEntry           no archived message of this user has that id
        └── EntryOnHold           a message under legal hold may not be removed
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "AuthError",
    "CollectorError",
    "ConfigError",
    "DeliveryError",
    "EntryOnHold",
    "InvalidMailboxName",
    "InvalidQuery",
    "InvalidUidl",
    "InvalidUsername",
    "LineTooLong",
    "LoginTooSoon",
    "MaildropInUse",
    "MessageTooBig",
    "NoSuchEntry",
    "NoSuchFolder",
    "NoSuchMailbox",
    "OAuthLoginRequired",
    "PermanentSinkError",
    "PermanentStoreError",
    "PopboxError",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteServerError",
    "SinkError",
    "SinkUnavailable",
    "StoreError",
    "TemporaryDeliveryError",
    "TemporarySinkError",
    "TooManyDevices",
    "UnknownRecipient",
]


class PopboxError(Exception):
    """Base of every error popbox raises on purpose."""


class ConfigError(PopboxError):
    """A setting is missing or invalid; the message names the key and the problem."""


class ProtocolError(PopboxError):
    """The peer sent something the protocol does not allow."""


class LineTooLong(ProtocolError):
    """A line exceeded the configured maximum length."""


class AuthError(PopboxError):
    """The user database could not be consulted (not: a wrong password)."""


class InvalidUsername(AuthError):
    """A username that can never name a user: empty, too long, or a path trick."""


class StoreError(PopboxError):
    """The mail store failed in a way that may pass; clients see [SYS/TEMP]."""


class MaildropInUse(StoreError):
    """Another session holds the maildrop's exclusive lock; clients see [IN-USE]."""


class PermanentStoreError(StoreError):
    """The mail store failed in a way that retrying will not fix; [SYS/PERM]."""


class InvalidMailboxName(PermanentStoreError):
    """A folder or device name that can never name one (path tricks, control characters)."""


class NoSuchFolder(PermanentStoreError):
    """The folder a login names does not exist in the user's mailbox."""


class InvalidUidl(PermanentStoreError):
    """A UIDL handed to the store (an imported one) that is not 1-70 octets of 0x21-0x7E."""


class TooManyDevices(PermanentStoreError):
    """A new device, and the folder already holds as many active devices as it may."""


class LoginTooSoon(StoreError):
    """The device logged in again before its LOGIN-DELAY (RFC 2449) was up."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoSuchMailbox(StoreError):
    """The user has no maildrop in this store."""


class QuotaExceeded(StoreError):
    """Storing the message would exceed the user's quota."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class DeliveryError(PopboxError):
    """A message could not be delivered to a recipient."""


class UnknownRecipient(DeliveryError):
    """The recipient does not map to any user."""


class MessageTooBig(DeliveryError):
    """The message exceeds the configured size limit."""


class TemporaryDeliveryError(DeliveryError):
    """Delivery failed for a reason that may pass; the sender should retry."""


class CollectorError(PopboxError):
    """The collector could not complete a step of a poll."""


class RemoteServerError(CollectorError):
    """The remote POP3 server answered -ERR or broke the protocol."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class OAuthLoginRequired(CollectorError):
    """A stored OAuth2 login no longer works (revoked, expired after 90 days of disuse
    or 7 days in a Google app still in testing): only signing in again helps. The
    message names the command that does it; ``popbox fetch`` exits 3 on it."""


class SinkError(CollectorError):
    """A sink failed to take a message."""


class TemporarySinkError(SinkError):
    """The sink failed for a reason that may pass; the message is retried later."""


class SinkUnavailable(TemporarySinkError):
    """The sink's side refuses every message for now, whichever it is: its login was
    refused, a permission is missing, its server cannot be reached. The account's run
    stops; no message is counted as failed or quarantined for it."""


class PermanentSinkError(SinkError):
    """The sink refused the message for good; it goes to quarantine."""


class ArchiveError(PopboxError):
    """The archive could not do what was asked: its database or its files failed."""


class InvalidQuery(ArchiveError):
    """A search the query language cannot read; the message says what and where."""


class NoSuchEntry(ArchiveError):
    """No archived message of this user has that id (another user's id is not one)."""


class EntryOnHold(ArchiveError):
    """A message under legal hold may not be removed, by retention or by hand."""
