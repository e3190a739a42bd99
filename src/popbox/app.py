"""Assembles popbox's server side from a Config and runs it until SIGTERM or SIGINT.

The parts (store, user database, Deliverer) come from popbox.backends, the builders
that ``popbox deliver``, ``popbox user list`` and ``popbox fetch`` use too. One process
of the server also sweeps every mailbox in the background (popbox.mailboxes).

The embedded default (no config file) keeps everything under ./popbox-data: the
Maildirs, the passwd file and a generated self-signed certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import logging
import os
import pwd
import signal
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from popbox.config import Config
from popbox.errors import ConfigError

if TYPE_CHECKING:
    from popbox.archive.base import Archive
    from popbox.auth.base import PassDB
    from popbox.net.sasl import Mechanisms
    from popbox.net.service import Pop3Service
    from popbox.store.base import MailStore

__all__ = [
    "Listeners",
    "WorkerSupervisor",
    "bearer_mechanisms",
    "bind_listeners",
    "build_ssl_context",
    "drop_privileges",
    "prepare_data_dir",
    "run_loop",
    "sasl_mechanisms",
    "scram_mechanisms",
    "serve",
    "serve_listeners",
    "serve_web_alone",
]

log = logging.getLogger("popbox")

# A worker that dies within this many seconds of its start is restarted only after
# the same pause, so a worker that cannot start does not spin the CPU.
WORKER_RESTART_DELAY: Final = 1.0


def prepare_data_dir(config: Config) -> list[str]:
    """Create what the embedded default needs; return lines describing what was made."""
    made: list[str] = []
    for directory in (config.data_dir, config.storage.maildir_root):
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            made.append(f"created {directory}")
    passwd = config.auth.passwd_file
    if not passwd.exists():
        passwd.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        made.append(f"created an empty user database {passwd}")
    if config.tls.cert is None and config.tls.key is None:
        from popbox.net.tls_context import ensure_self_signed_cert

        if ensure_self_signed_cert(config.tls_cert_path(), config.tls_key_path(), config.hostname):
            made.append(f"generated a self-signed certificate {config.tls_cert_path()}")
    return made


def build_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None when no certificate is configured or present."""
    cert, key = config.tls_cert_path(), config.tls_key_path()
    if not cert.exists() or not key.exists():
        if config.tls.cert is not None or config.tls.key is not None:
            raise ConfigError(f"tls.cert/tls.key: {cert} or {key} does not exist")
        return None
    from popbox.net.tls_context import make_server_context

    try:
        return make_server_context(cert, key, config.tls.min_version)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load {cert} / {key}: {exc}") from exc


# Modules loaded lazily on the first login, delivery or hop to a thread. After the
# switch, the interpreter's own files may be unreadable to the server's user (Python
# installed under /root, as pyenv does), so they are imported while still root.
PRELOAD_BEFORE_DROP: Final = (
    "concurrent.futures.thread",
    "email.parser",
    "email.policy",
    "popbox.auth.passwdfile",
    "popbox.backends",
    "popbox.delivery.lmtp",
    "popbox.net.service",
    "popbox.store.maildir",
)
# The same for bearer-token logins: the HTTP client asks the issuer after the switch.
PRELOAD_FOR_OAUTH: Final = (
    "anyio._backends._asyncio",
    "h11",
    "httpx",
    "jwt",
    "popbox.net.bearer",
)


def drop_privileges(config: Config) -> None:
    """Switch to config.user/config.group after the listeners are bound (as root).

    Called before any client byte is read: the listeners are bound but not served yet,
    and the TLS key has been loaded (so it may stay readable by root alone, as with
    Dovecot). What the server must use afterwards is handed over first: see
    ``_hand_over``. Raises ConfigError for an unknown user or group.
    """
    if os.geteuid() != 0:
        return
    if config.user is None:
        log.warning("running as root: set user (and group) in the config to drop privileges")
        return
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError as exc:
        raise ConfigError(f"user: no such system user {config.user!r}") from exc
    if entry.pw_uid == 0:
        raise ConfigError(f"user: {config.user!r} is root; name an unprivileged user")
    gid = entry.pw_gid
    if config.group is not None:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError as exc:
            raise ConfigError(f"group: no such system group {config.group!r}") from exc
    for name in PRELOAD_BEFORE_DROP:
        importlib.import_module(name)
    if config.auth.oauth is not None:
        for name in PRELOAD_FOR_OAUTH:
            importlib.import_module(name)
    _hand_over(config, entry.pw_uid, gid)
    # Supplementary groups first (root's would survive setgid), then gid, then uid:
    # after setuid nothing else can be changed.
    os.setgroups([])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - only a broken kernel or libc gets here
        raise RuntimeError("privileges could be regained after dropping them")
    log.info("dropped privileges to %s (uid %d, gid %d)", config.user, entry.pw_uid, gid)


def _hand_over(config: Config, uid: int, gid: int) -> None:
    """Give the server's user what it needs once it is no longer root.

    Root-owned entries (left by ``popbox serve``'s first run or ``popbox user add`` run
    as root) would be unusable after the switch: data_dir, maildir_root, each user's
    Maildir under it with its cur/new/tmp and index, are handed to uid:gid (Maildirs
    that ``storage.mail_location`` puts elsewhere must belong to that user already,
    as Dovecot requires of them). Message files are
    not walked (there may be millions): deliveries must run as the server's user (see
    docs/security.md). The passwd file stays root's and becomes readable by ``gid``
    (mode 0640), so a compromised server still cannot add users or change passwords.
    """
    def hand(path: str | os.PathLike[str]) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if info.st_uid == 0 and not stat.S_ISLNK(info.st_mode):
            os.chown(path, uid, gid, follow_symlinks=False)

    hand(config.data_dir)
    hand(config.storage.maildir_root)
    with (
        contextlib.suppress(FileNotFoundError, NotADirectoryError),
        os.scandir(config.storage.maildir_root) as users,
    ):
        for user in users:
            hand(user.path)
            if user.is_dir(follow_symlinks=False):
                with os.scandir(user.path) as parts:
                    for part in parts:
                        hand(part.path)
    # The embedded archive: its directory, index (with SQLite's side files) and the
    # directories of its objects; the objects themselves are not walked, as message
    # files are not (imports, like deliveries, run as the server's user).
    archive = config.archive_path()
    hand(archive)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "write.lock"):
        hand(archive / name)
    hand(archive / "objects")
    with (
        contextlib.suppress(FileNotFoundError, NotADirectoryError),
        os.scandir(archive / "objects") as buckets,
    ):
        for bucket in buckets:
            hand(bucket.path)
    # The side file of app passwords and APOP secrets is handed over as the passwd
    # file is: readable by the server, writable by root alone.
    for passwd in (config.auth.passwd_file, config.auth.credentials_path()):
        try:
            info = os.stat(passwd)
        except FileNotFoundError:
            continue
        readable = info.st_gid == gid and info.st_mode & stat.S_IRGRP
        if info.st_uid == 0 and not readable:
            os.chown(passwd, 0, gid)
            os.chmod(passwd, (stat.S_IMODE(info.st_mode) | stat.S_IRGRP) & ~stat.S_IWGRP)


@dataclass
class Listeners:
    """Sockets bound (as root, if need be) before privileges drop and workers fork."""

    ssl_context: ssl.SSLContext | None
    plain: list[socket.socket]
    tls: list[socket.socket]
    lmtp: list[socket.socket]
    web: socket.socket | None = None
    """The web page's socket (``web.enabled``); served by the sweeping process."""


def bind_listeners(config: Config) -> Listeners:
    """Load the certificate and bind every listener (ports below 1024 need root)."""
    from popbox.net.service import bind_addresses

    ssl_context = build_ssl_context(config)
    plain = bind_addresses(config.pop3.listen)
    tls = bind_addresses(config.pop3.tls_listen) if ssl_context is not None else []
    if config.pop3.tls_listen and ssl_context is None:
        log.warning("no TLS certificate: implicit-TLS listeners disabled, STLS not offered")
    lmtp = bind_addresses(config.lmtp.listen) if config.lmtp.enabled else []
    web = None
    if config.web.enabled:
        from popbox.web.app import bind_web

        web = bind_web(config)
    return Listeners(ssl_context, plain, tls, lmtp, web)


def bearer_mechanisms(config: Config) -> Mechanisms:
    """OAUTHBEARER and XOAUTH2 over one token verifier when ``[auth.oauth]`` is set,
    else none. ConfigError if the client secret file cannot be read."""
    if config.auth.oauth is None:
        return {}
    from popbox.auth.bearer import BearerVerifier
    from popbox.net.bearer import bearer_factories

    return bearer_factories(BearerVerifier(config.auth.oauth.bearer_settings()))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop (installed on Linux) or asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def scram_mechanisms(config: Config, passdb: PassDB) -> Mechanisms:
    """The SCRAM mechanisms ``auth.mechanisms`` lists (popbox.net.scram)."""
    from popbox.net.scram import scram_mechanisms as build

    return build(config.auth.mechanisms, passdb)


def sasl_mechanisms(config: Config, passdb: PassDB) -> Mechanisms:
    """Every SASL mechanism the glue runs (net.sasl), by name; the hub offers those
    ``auth.mechanisms`` lists, in its order, beside the core's PLAIN and LOGIN."""
    return {**scram_mechanisms(config, passdb), **bearer_mechanisms(config)}


def serve(config: Config) -> None:
    """Bind, drop privileges, then serve in this process or in ``pop3.workers`` children."""
    # Before the workers fork: the secret behind SCRAM's fake salts is made at import,
    # and every worker must show an unknown name the same salt.
    importlib.import_module("popbox.auth.scram")
    listeners = bind_listeners(config)
    _import_before_drop(config)
    drop_privileges(config)
    log.info(
        "popbox serving POP3 on %s, POP3S on %s, LMTP on %s (%d worker%s)",
        ", ".join(config.pop3.listen) or "-",
        ", ".join(config.pop3.tls_listen) if listeners.tls else "-",
        ", ".join(config.lmtp.listen) if listeners.lmtp else "-",
        config.pop3.workers,
        "" if config.pop3.workers == 1 else "s",
    )
    if config.pop3.workers == 1:
        run_loop(serve_listeners(config, listeners, sweep=True))
    else:
        WorkerSupervisor(config, listeners).run()


async def serve_listeners(config: Config, listeners: Listeners, *, sweep: bool) -> None:
    """Run POP3 (and LMTP) on bound sockets until SIGTERM/SIGINT, then shut down.

    ``sweep``: this process also runs the mailbox sweeper (one process of the server
    does, see ``WorkerSupervisor``).
    """
    from popbox.auth.base import UserDirectory
    from popbox.backends import build_archive, build_hasher, build_passdb, build_store, close_passdb
    from popbox.delivery.deliverer import Deliverer
    from popbox.delivery.lmtp import LmtpService
    from popbox.mailboxes import MailboxSweeper, stop_task
    from popbox.net.service import Pop3Service

    hasher = build_hasher(config)
    passdb = build_passdb(config, hasher=hasher)
    store = build_store(config, passdb)
    archive = build_archive(config)
    pop3 = Pop3Service(
        config, store, passdb, listeners.ssl_context, sasl_mechanisms(config, passdb)
    )
    await pop3.start(sockets=listeners.plain, tls_sockets=listeners.tls)
    lmtp_service = None
    if listeners.lmtp:
        lmtp_service = LmtpService(config, Deliverer(config, store, passdb, archive))
        await lmtp_service.start(sockets=listeners.lmtp)
    users = passdb if isinstance(passdb, UserDirectory) else None
    sweeper = None
    if sweep:
        sweeper = MailboxSweeper(config, store, users=users, archive=archive).start()
    web = None
    if listeners.web is not None:
        if sweep:
            web = _start_web(
                config, listeners.web, pop3, archive=archive, passdb=passdb, store=store
            )
        else:
            listeners.web.close()  # one process serves the page: the sweeping one

    async with _stop_signals() as stop:
        try:
            await stop.wait()
        finally:
            log.info(
                "shutting down: no new connections, sessions get %ss to finish",
                config.limits.shutdown_grace,
            )
            if sweeper is not None:
                await stop_task(sweeper)
            if web is not None:
                await stop_task(web)
            if lmtp_service is not None:
                await lmtp_service.stop()
            await pop3.shutdown()
            await store.close()
            await archive.close()
            await close_passdb(passdb)
            hasher.close()


@contextlib.asynccontextmanager
async def _stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event SIGTERM and SIGINT set, while the block (and its shutdown) runs: a
    second Ctrl-C during a graceful shutdown does not cut it short."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _import_before_drop(config: Config) -> None:
    """Import what the server loads lazily while it can still read everything: after
    dropping to ``user``, a Python installed under root's home cannot be read."""
    modules = ["popbox.archive.postgresql" if config.archive_backend() == "postgresql"
               else "popbox.archive.sqlite"]
    if config.web.enabled:
        modules += ["popbox.web.app", "popbox.web.collector_view", "popbox.cli_support"]
    for module in modules:
        importlib.import_module(module)


def serve_web_alone(config: Config) -> None:
    """``popbox web``: the web page on its own, on ``web.listen``, until SIGTERM or
    SIGINT (bound before privileges drop, like the mail listeners)."""
    from popbox.web.app import bind_web

    sock = bind_web(config)
    _import_before_drop(config)
    drop_privileges(config)
    run_loop(_web_until_stopped(config, sock))


async def _web_until_stopped(config: Config, sock: socket.socket) -> None:
    from popbox.backends import build_archive, build_hasher, build_passdb, build_store, close_passdb
    from popbox.mailboxes import stop_task

    hasher = build_hasher(config)
    passdb = build_passdb(config, hasher=hasher)
    store = build_store(config, passdb)
    archive = build_archive(config)
    web = _start_web(config, sock, None, archive=archive, passdb=passdb, store=store)
    async with _stop_signals() as stop:
        try:
            await stop.wait()
        finally:
            await stop_task(web)
            await store.close()
            await archive.close()
            await close_passdb(passdb)
            hasher.close()


def _start_web(
    config: Config,
    sock: socket.socket,
    pop3: Pop3Service | None,
    *,
    archive: Archive,
    passdb: PassDB,
    store: MailStore,
) -> asyncio.Task[None]:
    """Serve the web page on ``sock`` on these parts; beside POP3 (``pop3``), failed
    logins count in POP3's per-address penalty table (one guesser, one count)."""
    from popbox.cli_support import open_user_admin
    from popbox.web.app import create_app, serve_web
    from popbox.web.collector_view import collector_view

    app = create_app(
        config,
        archive=archive,
        passdb=passdb,
        store=store,
        useradmin=open_user_admin(config),
        collector=collector_view(config.fetch, config.base_dir),
        penalty=pop3.penalty if pop3 is not None else None,
    )
    return asyncio.get_running_loop().create_task(serve_web(config, app, sock=sock), name="web")


class WorkerSupervisor:
    """Forks ``pop3.workers`` processes sharing the listeners and keeps them running.

    The kernel spreads connections over the processes accepting on the same sockets;
    the maildrop lock (flock) already works across processes. Per-IP limits count
    per worker. SIGTERM/SIGINT are passed on and each worker shuts down gracefully.
    Each worker has a slot; the worker in slot 0 (and the one that replaces it) also
    runs the mailbox sweeper, so there is always exactly one.
    """

    def __init__(self, config: Config, listeners: Listeners) -> None:
        self._config = config
        self._listeners = listeners
        self._children: dict[int, tuple[float, int]] = {}
        self._stopping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self._config.pop3.workers):
            self._spawn(slot)
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            child = self._children.pop(pid, None)
            if child is None or self._stopping:
                continue
            started, slot = child
            log.error("worker %d ended unexpectedly (%s); starting another", pid, _describe(status))
            if time.monotonic() - started < WORKER_RESTART_DELAY:
                # A worker that dies at once would otherwise be restarted in a hot loop.
                time.sleep(WORKER_RESTART_DELAY)
            if not self._stopping:
                self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                log.info("worker %d started in slot %d", os.getpid(), slot)
                run_loop(serve_listeners(self._config, self._listeners, sweep=slot == 0))
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self._children[pid] = (time.monotonic(), slot)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
