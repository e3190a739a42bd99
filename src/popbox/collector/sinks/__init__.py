"""Sinks: where fetched messages go. ``build_sink`` turns settings into a Sink.

Each sink module exposes ``create_sink(settings, context) -> Sink`` for its own
settings class from ``popbox.collector.config``; the modules are imported only when an
account uses them, so httpx, aiosmtplib and the popbox store load on demand.

Rules every sink follows (see ``popbox.collector.base.Sink``):

- ``sink.name`` is ``settings.label``: the poll engine keys its per-sink record of
  delivered messages by it, so it must stay the same across runs;
- ``deliver`` returns only when the message is durable on the sink's side, and raises
  TemporarySinkError (retry later) or PermanentSinkError (quarantine) otherwise;
- a sink that can detect a repeated ``idempotency_key`` (a crash after it wrote but
  before the collector recorded it) skips the duplicate; the others pass the key on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from popbox.collector.auth import build_sink_token_provider
from popbox.collector.base import LocalDeliveryFactory, LocalDeliveryHandle, Sink
from popbox.collector.config import AccountSettings, FetchSettings, SinkSettings
from popbox.collector.tokens import TokenProvider
from popbox.errors import ConfigError

__all__ = ["SinkContext", "build_sink"]

# kind -> module under popbox.collector.sinks; LMTP and SMTP share one module.
_MODULES: dict[str, str] = {
    "maildir": "maildir",
    "mbox": "mbox",
    "command": "command",
    "webhook": "webhook",
    "lmtp": "smtp",
    "smtp": "smtp",
    "popbox": "popbox_store",
    "archive": "archive",
    "imap": "imap",
    "gmail": "gmail",
}


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink may know besides its own settings.

    ``local_delivery`` is how a popbox sink reaches local maildrops; the composition
    root (``popbox fetch``) provides it, and without it there is no popbox sink.
    """

    account: AccountSettings
    settings: FetchSettings
    local_delivery: LocalDeliveryFactory | None = None

    def local_delivery_for(self, label: str, config: Path | None) -> LocalDeliveryHandle:
        """The Deliverer of the popbox server whose config file a popbox or archive
        sink names; ConfigError when it names none, or when no composition root
        handed a way in (only `popbox fetch` may open a popbox store)."""
        if config is None:
            raise ConfigError(f"sink {label}: set `config` to the popbox server config file")
        if self.local_delivery is None:
            raise ConfigError(
                f"sink {label} needs `popbox fetch` "
                "(it goes through the popbox server's rules)"
            )
        return self.local_delivery(config)

    def token_provider(self, sink: SinkSettings) -> TokenProvider:
        """Access tokens for ``sink``'s own OAuth2 login (its ``[oauth]`` table), kept
        apart from the account's POP3 login; raises ConfigError without one."""
        return build_sink_token_provider(self.account, self.settings, sink)

    @property
    def state_dir(self) -> Path:
        """A directory the sink may keep small files in (created by the collector)."""
        return self.settings.state_dir


def build_sink(settings: SinkSettings, context: SinkContext) -> Sink:
    """Create the sink described by ``settings`` for one account."""
    module = importlib.import_module(f"popbox.collector.sinks.{_MODULES[settings.kind]}")
    sink: Sink = module.create_sink(settings, context)
    return sink
