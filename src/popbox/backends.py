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

from popbox.errors import ConfigError

if TYPE_CHECKING:
    from popbox.archive.base import Archive
    from popbox.auth.base import PassDB
    from popbox.auth.hasher import Hasher
    from popbox.collector.base import LocalDeliveryHandle
    from popbox.config import Config
    from popbox.delivery.deliverer import Deliverer
    from popbox.pgsql import PoolSettings
    from popbox.store.base import MailStore
    from popbox.store.location import MailLocation
    from popbox.store.maildir import MaildirStore
    from popbox.store.moves import MoveMarks
    from popbox.store.postgresql import PostgresStore

__all__ = [
    "DeliveryBackend",
    "build_hasher",
    "build_location",
    "build_maildir_store",
    "build_move_marks",
    "build_passdb",
    "build_postgresql_store",
    "build_store",
    "close_passdb",
    "open_delivery",
    "open_local_delivery",
    "pool_settings",
]


def build_store(config: Config, passdb: PassDB | None = None) -> MailStore:
    """The mail store ``config`` names (``[storage]``), finding each user's Maildir
    where ``storage.mail_location`` and the user database's home and ``mail`` fields
    say (``passdb``: the one the caller uses; else one is built to read them).

    With ``storage.moving_from``, a store.routed.MovingStore over both stores: users
    are served from the one their move (``popbox migrate``) has reached."""
    store = _build_backend(config, config.storage.backend, passdb)
    if not config.storage.moving_from:
        return store
    from popbox.store.routed import MovingStore

    source = _build_backend(config, config.storage.moving_from, passdb)
    marks = build_move_marks(config, config.storage.backend, store)
    return MovingStore(source, store, marks)


def _build_backend(config: Config, backend: str, passdb: PassDB | None) -> MailStore:
    if backend == "postgresql":
        return build_postgresql_store(config)
    return build_maildir_store(config, passdb)


def build_maildir_store(config: Config, passdb: PassDB | None = None) -> MaildirStore:
    """The Maildir store of ``[storage]``, whatever ``storage.backend`` says."""
    from popbox.store.maildir import MaildirStore

    return MaildirStore(
        config.storage.maildir_root,
        save_crlf=config.storage.save_crlf,
        location=build_location(config, passdb if passdb is not None else build_passdb(config)),
    )


def build_postgresql_store(config: Config) -> PostgresStore:
    """The PostgreSQL store of ``[postgresql]``, whatever ``storage.backend`` says (it
    connects on first use)."""
    from popbox.store.postgresql import PostgresStore, PostgresStoreSettings

    settings = config.postgresql
    if settings is None:
        raise ConfigError("the PostgreSQL store needs a [postgresql] table")
    return PostgresStore(
        PostgresStoreSettings(
            pool_settings(config, "store"),
            settings.node(),
            lease_seconds=settings.lease_seconds,
            duplicate_window=settings.duplicate_window,
        )
    )


def build_move_marks(config: Config, backend: str, store: MailStore) -> MoveMarks:
    """The marks of moves into ``backend`` (store.moves): a file in each user's Maildir,
    or a table beside the PostgreSQL store's (``store`` is the Maildir store then)."""
    from popbox.store.maildir import MaildirStore
    from popbox.store.moves import MaildirMoveMarks, PostgresMoveMarks

    if backend == "postgresql":
        return PostgresMoveMarks(pool_settings(config, "moves"))
    assert isinstance(store, MaildirStore)
    return MaildirMoveMarks(store)


def pool_settings(config: Config, role: str) -> PoolSettings:
    """The pool of one backend (``role``: store, users, moves) from ``[postgresql]``;
    ConfigError without one. Each backend keeps its own pool, named in
    pg_stat_activity by its role and this node."""
    from popbox.pgsql import PoolSettings

    settings = config.postgresql
    if settings is None:
        raise ConfigError(f"the PostgreSQL {role} need a [postgresql] table")
    return PoolSettings(
        dsn=settings.dsn,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        timeout=settings.pool_timeout,
        connect_timeout=settings.connect_timeout,
        application_name=f"popbox {role} {settings.node()}",
    )


def build_location(config: Config, passdb: PassDB) -> MailLocation:
    """Where each user's Maildir is: their ``mail`` field, else ``storage.mail_location``,
    else ``maildir_root/USER``. The fields are read from the user database's memory
    (auth.base.CachedUsers): a login or delivery has just looked the user up."""
    from popbox.auth.base import CachedUsers
    from popbox.auth.passwdfile import mail_fields
    from popbox.store.location import UnderRoot, UserHome, UserLocations

    template = config.storage.location_template()
    if not isinstance(passdb, CachedUsers):
        if template is None:
            return UnderRoot(config.storage.maildir_root)
        return UserLocations(lambda user: None, default=template, root=config.storage.maildir_root)
    cached = passdb

    def homes(user: str) -> UserHome | None:
        record = cached.cached_record(user)
        if record is None:
            return None
        home, mail = mail_fields(record)
        return UserHome(home, mail)

    return UserLocations(homes, default=template, root=config.storage.maildir_root)


def build_hasher(config: Config) -> Hasher:
    """The threads the server checks passwords on (``auth.hash_threads``)."""
    from popbox.auth.hasher import Hasher, default_threads

    return Hasher(config.auth.hash_threads or default_threads())


def build_passdb(config: Config, *, hasher: Hasher | None = None) -> PassDB:
    """The user database ``config`` names (``[auth]``).

    ``hasher``: where password checks run (the server passes its own); delivery only
    looks users up and leaves it out. The PostgreSQL one opens its pool on first use
    and has a ``close()``.
    """
    if config.auth.backend == "postgresql":
        from popbox.auth.postgresql import PostgresPassDB

        return PostgresPassDB(
            pool_settings(config, "users"), default_scheme=config.auth.default_scheme, hasher=hasher
        )
    from popbox.auth.passwdfile import PasswdFilePassDB

    return PasswdFilePassDB(
        config.auth.passwd_file,
        default_scheme=config.auth.default_scheme,
        hasher=hasher,
        credentials=config.auth.credentials_path(),
    )


def build_archive(config: Config) -> Archive:
    """The archive ``config`` names (``[archive]``): SQLite files under
    ``archive.path``, or tables in the ``[postgresql]`` database. Either opens on
    first use, so building one costs nothing until a message is kept or searched."""
    if config.archive_backend() == "postgresql":
        from popbox.archive.postgresql import PostgresArchive

        return PostgresArchive(pool_settings(config, "archive"))
    from popbox.archive.sqlite import SqliteArchive

    return SqliteArchive(config.archive_path())


@dataclass(frozen=True, slots=True)
class DeliveryBackend:
    """A Deliverer and the store, user database and archive it was built on, closed
    together."""

    deliverer: Deliverer
    store: MailStore
    passdb: PassDB
    archive: Archive

    async def close(self) -> None:
        await self.store.close()
        await self.archive.close()
        await close_passdb(self.passdb)


async def close_passdb(passdb: PassDB) -> None:
    """Close a user database that holds connections (auth.base.ClosingPassDB)."""
    from popbox.auth.base import ClosingPassDB

    if isinstance(passdb, ClosingPassDB):
        await passdb.close()


def open_delivery(config: Config) -> DeliveryBackend:
    """A Deliverer on the configured store and user database (``popbox deliver``, the
    collector's popbox sink); close it when done."""
    from popbox.delivery.deliverer import Deliverer

    passdb = build_passdb(config)
    store = build_store(config, passdb)
    archive = build_archive(config)
    return DeliveryBackend(Deliverer(config, store, passdb, archive), store, passdb, archive)


def open_local_delivery(config_path: Path) -> LocalDeliveryHandle:
    """The collector's popbox sink's way in: the Deliverer of the popbox server whose
    config file the sink names (``popbox fetch`` hands this to the collector)."""
    from popbox.collector.base import LocalDeliveryHandle
    from popbox.config import load_config

    backend = open_delivery(load_config(config_path))
    return LocalDeliveryHandle(backend.deliverer, backend.close)
