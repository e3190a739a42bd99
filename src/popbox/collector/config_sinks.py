"""Typed settings of the collector's sinks: one class per ``kind``, joined in ``SinkSettings``.

Each sink's ``label`` (its ``name``, or one derived from where it delivers) keys the
poll engine's record of what that sink already took, so it must stay the same across
runs. ``collector.config`` re-exports every class here.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Final, Literal

from pydantic import Field, field_validator, model_validator

from popbox.collector.config_common import (
    ConfigPath,
    OAuthSettings,
    Port,
    SecretSource,
    SettingsModel,
    at_most_one,
    normalise_fingerprint,
    secret_from,
)

__all__ = [
    "ArchiveSinkSettings",
    "CommandSinkSettings",
    "GmailSinkSettings",
    "ImapSinkSettings",
    "LmtpSinkSettings",
    "MaildirSinkSettings",
    "MboxSinkSettings",
    "PopboxSinkSettings",
    "SinkSettings",
    "SmtpSinkSettings",
    "WebhookSinkSettings",
]

# A sink that has not answered in this time is treated as a temporary failure.
SINK_TIMEOUT: Final = 60.0
# Webhooks: ticket systems cap attachments around 10-25 MB; 10 MiB by default.
WEBHOOK_MAX_ATTACHMENT: Final = 10 * 1024 * 1024
# Webhooks: retries within one delivery attempt for 429/5xx/timeouts.
WEBHOOK_RETRIES: Final = 3
# RFC 8314 section 3.3 / RFC 3501: IMAP over implicit TLS on 993, IMAP (STARTTLS) on 143.
IMAPS_PORT: Final = 993
IMAP_PORT: Final = 143
# Parallel IMAP connections of one sink: APPEND without LITERAL+ costs two round
# trips a message, and Gmail and Microsoft 365 allow a handful of sessions per user
# (Gmail 15, Exchange Online 20); four leave room for the user's own mail programs.
IMAP_CONNECTIONS: Final = 4
# Gmail's users.messages.import: a simple (multipart) upload takes up to 5 MB; bigger
# messages go through the resumable protocol (Gmail's own limit is 35 MB a message).
GMAIL_SIMPLE_UPLOAD_MAX: Final = 5 * 1024 * 1024
# The Gmail API's per-user limit is 15,000 quota units a minute and an import costs
# 25 units: 600 imports a minute, that is 10 a second.
GMAIL_IMPORTS_PER_SECOND: Final = 10.0
# How long to wait for Gmail to accept a message when it keeps answering 429/403
# rateLimitExceeded/5xx, before the poll engine retries it in a later run.
GMAIL_RETRY_FOR: Final = 120.0
# The Gmail sink's per-message timeout: above GMAIL_RETRY_FOR, so the retries end
# (1 s before the timeout at the latest) with their own reason, plus room for a
# resumable upload of a large message.
GMAIL_SINK_TIMEOUT: Final = 180.0
# Labels users.messages.import refuses (DRAFT) or that are Gmail's own (CHAT).
GMAIL_REFUSED_LABELS: Final = frozenset({"DRAFT", "CHAT"})
# RFC 5322 field name: printable ASCII but ":" and space.
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")


class _SinkBase(SettingsModel):
    name: str | None = None
    """A stable label for logs, status and the per-sink delivery record. Changing it
    makes the collector treat the sink as new (it redelivers what it has not recorded)."""
    timeout: float = Field(default=SINK_TIMEOUT, gt=0)
    """Seconds one delivery may take before it counts as a temporary failure."""


class MaildirSinkSettings(_SinkBase):
    kind: Literal["maildir"]
    path: ConfigPath
    """The Maildir (with cur/, new/, tmp/); created when missing."""

    @property
    def label(self) -> str:
        return self.name or f"maildir:{self.path}"


class MboxSinkSettings(_SinkBase):
    kind: Literal["mbox"]
    path: ConfigPath
    """An mboxrd file; appended under an fcntl lock and a ``.lock`` dotlock."""

    @property
    def label(self) -> str:
        return self.name or f"mbox:{self.path}"


class CommandSinkSettings(_SinkBase):
    kind: Literal["command"]
    command: str
    """Split into words like a shell would (no shell runs); the message is on stdin.
    Exit 0 = delivered, 75 (EX_TEMPFAIL) = try later, anything else = quarantine."""
    env: dict[str, str] = {}
    """Extra environment; POPBOX_ACCOUNT, POPBOX_UIDL, POPBOX_SHA256 and
    POPBOX_IDEMPOTENCY_KEY are always set."""

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if not shlex.split(value):
            raise ValueError("must name a program")
        return value

    @property
    def label(self) -> str:
        return self.name or f"command:{shlex.split(self.command)[0]}"


class WebhookSinkSettings(_SinkBase):
    kind: Literal["webhook"]
    url: str
    """http:// or https:// endpoint that receives one JSON document per message."""
    secret_env: str | None = None
    secret_file: ConfigPath | None = None
    secret_command: str | None = None
    """The HMAC-SHA256 key for the signature header (optional)."""
    signature_header: str = "X-Popbox-Signature"
    headers: dict[str, str] = {}
    """Extra request headers (e.g. an API token for the ticket system)."""
    timeout: float = Field(default=30.0, gt=0)
    include_raw: bool = False
    """Also send the whole raw message, base64-encoded."""
    max_attachment_bytes: int = Field(default=WEBHOOK_MAX_ATTACHMENT, ge=0)
    """Attachments larger than this are listed without content."""
    retries: int = Field(default=WEBHOOK_RETRIES, ge=0)
    """Retries with backoff for 429, 5xx and timeouts before a temporary failure."""
    ca_file: ConfigPath | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _check_secret(self) -> WebhookSinkSettings:
        at_most_one("secret", self.secret_env, self.secret_file, self.secret_command)
        return self

    def secret_source(self) -> SecretSource | None:
        return secret_from("secret", self.secret_env, self.secret_file, self.secret_command)

    @property
    def label(self) -> str:
        return self.name or f"webhook:{self.url}"


class _MtaSinkBase(_SinkBase):
    host: str | None = None
    socket: ConfigPath | None = None
    """A unix socket instead of host/port (LMTP to Postfix/Dovecot, typically)."""
    tls: Literal["none", "starttls", "tls"] = "none"
    ca_file: ConfigPath | None = None
    recipients: list[str] = Field(min_length=1)
    sender: str = ""
    """The envelope sender; empty means the null sender ``<>``."""

    @model_validator(mode="after")
    def _check_target(self) -> _MtaSinkBase:
        if (self.host is None) == (self.socket is None):
            raise ValueError("set exactly one of host and socket")
        return self


class LmtpSinkSettings(_MtaSinkBase):
    kind: Literal["lmtp"]
    port: Port = 24

    @property
    def label(self) -> str:
        return self.name or f"lmtp:{self.socket or f'{self.host}:{self.port}'}"


class SmtpSinkSettings(_MtaSinkBase):
    kind: Literal["smtp"]
    port: Port = 25
    username: str | None = None
    password_env: str | None = None
    password_file: ConfigPath | None = None
    password_command: str | None = None

    @model_validator(mode="after")
    def _check_password(self) -> SmtpSinkSettings:
        at_most_one("password", self.password_env, self.password_file, self.password_command)
        return self

    def password_source(self) -> SecretSource | None:
        return secret_from("password", self.password_env, self.password_file, self.password_command)

    @property
    def label(self) -> str:
        return self.name or f"smtp:{self.socket or f'{self.host}:{self.port}'}"


class PopboxSinkSettings(_SinkBase):
    kind: Literal["popbox"]
    config: ConfigPath | None = None
    """The popbox server config whose store receives the message; None = this file."""
    user: str
    """The popbox user whose maildrop receives the message."""

    @property
    def label(self) -> str:
        return self.name or f"popbox:{self.user}"


class ArchiveSinkSettings(_SinkBase):
    kind: Literal["archive"]
    config: ConfigPath | None = None
    """The popbox server config whose archive keeps the message; None = this file."""
    user: str
    """The popbox user whose archive keeps the message (searchable on the web page)."""

    @property
    def label(self) -> str:
        return self.name or f"archive:{self.user}"


class _LoginSinkBase(_SinkBase):
    """A sink that logs in to a remote mail service: with a password or OAuth2."""

    auth: Literal["password", "oauth2"] = "password"
    password_env: str | None = None
    password_file: ConfigPath | None = None
    password_command: str | None = None
    oauth: OAuthSettings | None = None
    """This sink's own OAuth2 login, apart from the account's POP3 one; its refresh
    token is stored in ``STATE_DIR/oauth/ACCOUNT--SINK.json`` unless ``token_store``
    says otherwise. Sign it in with ``popbox oauth login ACCOUNT --sink LABEL``."""
    identify: Literal["header", "message_id"] = "header"
    """How a message is found again after a crash between handing it over and
    recording that: ``header`` adds ``X-Popbox-Id: <account, UIDL and SHA-256 hash>``
    at the top of the message (the only change to its bytes); ``message_id`` leaves
    the message untouched and looks for its Message-ID with the same size. A
    message without a Message-ID cannot be found again that way and may, after such
    a crash, arrive twice."""
    id_header: str = "X-Popbox-Id"

    @field_validator("id_header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("must be a header field name (printable ASCII, no colon)")
        return value

    def _check_login(self, what: str) -> None:
        at_most_one("password", self.password_env, self.password_file, self.password_command)
        if self.auth == "oauth2":
            if self.oauth is None:
                raise ValueError(f"{what}: auth = oauth2 needs an [oauth] table")
        elif self.password_source() is None:
            raise ValueError(f"{what}: set one of password_env, password_file, password_command")

    def password_source(self) -> SecretSource | None:
        return secret_from("password", self.password_env, self.password_file, self.password_command)


class ImapSinkSettings(_LoginSinkBase):
    kind: Literal["imap"]
    host: str
    port: Port | None = None
    """Default 993 for security = "tls", 143 otherwise."""
    security: Literal["tls", "starttls", "none"] = "tls"
    ca_file: ConfigPath | None = None
    tls_fingerprint: str | None = None
    """SHA-256 of the server certificate; when set it must match (self-signed)."""
    tls_server_name: str | None = None
    allow_plaintext_password: bool = False
    """Permit a password or an OAuth2 token over security = "none". Off: such a
    configuration is refused when it is loaded."""
    username: str
    auth_mechanism: Literal["auto", "login", "plain", "xoauth2", "oauthbearer"] = "auto"
    """auto: LOGIN for a password; XOAUTH2 for OAuth2 (Gmail, Microsoft 365 and
    Dovecot all take it), else OAUTHBEARER."""
    folder: str = "INBOX"
    """Where messages go; a Gmail label is a folder here (``[Gmail]/All Mail`` too)."""
    create_folder: bool = True
    """Create ``folder`` when it does not exist. Off: while it is missing, delivery
    fails and the run stops; the messages wait on the POP3 server (none is counted as
    failed or quarantined) until someone creates the folder."""
    flags: list[str] = []
    """IMAP flags set on each appended message, e.g. ``["\\Seen"]``; none = unread."""
    internal_date: Literal["date_header", "now"] = "date_header"
    """INTERNALDATE of appended messages: the message's Date header (what mail
    programs sort by; the time of appending when it has none or it is unreadable)."""
    connections: int = Field(default=IMAP_CONNECTIONS, ge=1, le=16)
    """Parallel APPEND connections of this sink."""

    @field_validator("tls_fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str | None) -> str | None:
        return normalise_fingerprint(value)

    @model_validator(mode="after")
    def _check(self) -> ImapSinkSettings:
        self._check_login("imap sink")
        if self.auth == "oauth2" and self.auth_mechanism in ("login", "plain"):
            raise ValueError("auth = oauth2 needs auth_mechanism xoauth2, oauthbearer or auto")
        if self.auth == "password" and self.auth_mechanism in ("xoauth2", "oauthbearer"):
            raise ValueError(f"auth_mechanism {self.auth_mechanism} needs auth = oauth2")
        if self.security == "none" and not self.allow_plaintext_password:
            secret = "an OAuth2 token" if self.auth == "oauth2" else "a password"
            raise ValueError(
                f'{secret} over security = "none" needs allow_plaintext_password '
                "(anyone on the way could read it and use it)"
            )
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return IMAPS_PORT if self.security == "tls" else IMAP_PORT

    @property
    def label(self) -> str:
        return self.name or f"imap:{self.username}@{self.host}/{self.folder}"


class GmailSinkSettings(_LoginSinkBase):
    """Gmail's ``users.messages.import``: as if the message had arrived by SMTP, but
    without SPF/DMARC checks or forwarding rules in the way."""

    kind: Literal["gmail"]
    auth: Literal["oauth2"] = "oauth2"
    user: str = "me"
    """The Gmail user id; ``me`` is the signed-in user."""
    labels: list[str] = ["INBOX", "UNREAD"]
    """Label names or ids given to each message: system labels (INBOX, UNREAD,
    STARRED, IMPORTANT, ...) or user labels, which are created when missing."""
    never_mark_spam: bool = False
    """Skip Gmail's spam classifier (``neverMarkSpam``)."""
    process_for_calendar: bool = False
    """Let Gmail add invitations to Calendar (``processForCalendar``)."""
    internal_date_source: Literal["dateHeader", "receivedTime"] = "dateHeader"
    """``dateHeader``: sorted by the message's Date, like the original mailbox."""
    api_base: str = "https://gmail.googleapis.com"
    """The Gmail API root; changed only to reach a test or proxy endpoint."""
    ca_file: ConfigPath | None = None
    imports_per_second: float = Field(default=GMAIL_IMPORTS_PER_SECOND, gt=0)
    retry_for: float = Field(default=GMAIL_RETRY_FOR, gt=0)
    """Seconds of 429/rateLimitExceeded/5xx retries before a temporary failure."""
    timeout: float = Field(default=GMAIL_SINK_TIMEOUT, gt=0)
    """Seconds one message may take; must exceed ``retry_for`` (the retries stop 1 s
    before it)."""

    @field_validator("oauth", mode="before")
    @classmethod
    def _default_provider(cls, value: object) -> object:
        # The [oauth] table of a Gmail sink is Google's unless it says otherwise.
        if isinstance(value, dict) and "provider" not in value:
            return {**value, "provider": "google"}
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str]) -> list[str]:
        refused = sorted({label.upper() for label in value} & GMAIL_REFUSED_LABELS)
        if refused:
            raise ValueError(
                f"Gmail cannot import into {', '.join(refused)} (DRAFT is for drafts, "
                "CHAT is Gmail's own)"
            )
        return value

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        if not value.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check(self) -> GmailSinkSettings:
        self._check_login("gmail sink")
        assert self.oauth is not None  # _check_login: auth is always oauth2 here
        if self.oauth.provider == "microsoft":
            raise ValueError('gmail sink: oauth.provider must be "google" (or "generic")')
        if self.timeout <= self.retry_for:
            raise ValueError(
                f"gmail sink: timeout ({self.timeout:g} s) must exceed retry_for "
                f"({self.retry_for:g} s): the sink stops retrying 1 s before the timeout"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or f"gmail:{self.user}"


SinkSettings = Annotated[
    MaildirSinkSettings
    | MboxSinkSettings
    | CommandSinkSettings
    | WebhookSinkSettings
    | LmtpSinkSettings
    | SmtpSinkSettings
    | PopboxSinkSettings
    | ArchiveSinkSettings
    | ImapSinkSettings
    | GmailSinkSettings,
    Field(discriminator="kind"),
]
