"""The composition root's builders: the store, the user database and the Deliverer for
a Config, and the collector's way into local maildrops. Only popbox.cli and popbox.app
import this module.

Every import of a backend happens inside the builder that needs it: ``popbox deliver``
runs once per message under an MTA, and ``popbox user list`` needs only the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popbox.auth.base import PassDB
    from popbox.auth.hasher import Hasher
    from popbox.collector.base import LocalDeliveryHandle
    from popbox.config import Config
    from popbox.delivery.deliverer import Deliverer
    from popbox.store.base import MailStore

__all__ = [
    "DeliveryBackend",
    "build_hasher",
    "build_passdb",
    "build_store",
    "open_delivery",
    "open_local_delivery",
]


def build_store(config: Config) -> MailStore:
    """The mail store ``config`` names (``[storage]``)."""
    from popbox.store.maildir import MaildirStore

    return MaildirStore(config.storage.maildir_root, save_crlf=config.storage.save_crlf)


def build_hasher(config: Config) -> Hasher:
    """The threads the server checks passwords on (``auth.hash_threads``)."""
    from popbox.auth.hasher import Hasher, default_threads

    return Hasher(config.auth.hash_threads or default_threads())


def build_passdb(config: Config, *, hasher: Hasher | None = None) -> PassDB:
    """The user database ``config`` names (``[auth]``).

    ``hasher``: where password checks run (the server passes its own); delivery only
    looks users up and leaves it out.
    """
    from popbox.auth.passwdfile import PasswdFilePassDB

    return PasswdFilePassDB(
        config.auth.passwd_file, default_scheme=config.auth.default_scheme, hasher=hasher
    )


@dataclass(frozen=True, slots=True)
class DeliveryBackend:
    """A Deliverer and the store and user database it was built on, closed together."""

    deliverer: Deliverer
    store: MailStore
    passdb: PassDB

    async def close(self) -> None:
        await self.store.close()


def open_delivery(config: Config) -> DeliveryBackend:
    """A Deliverer on the configured store and user database (``popbox deliver``, the
    collector's popbox sink); close it when done."""
    from popbox.delivery.deliverer import Deliverer

    store = build_store(config)
    passdb = build_passdb(config)
    return DeliveryBackend(Deliverer(config, store, passdb), store, passdb)


def open_local_delivery(config_path: Path) -> LocalDeliveryHandle:
    """The collector's popbox sink's way in: the Deliverer of the popbox server whose
    config file the sink names (``popbox fetch`` hands this to the collector)."""
    from popbox.collector.base import LocalDeliveryHandle
    from popbox.config import load_config

    backend = open_delivery(load_config(config_path))
    return LocalDeliveryHandle(backend.deliverer, backend.close)
