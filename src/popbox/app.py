"""Assembles popbox's server side from a Config and runs it until SIGTERM or SIGINT.

The embedded default (no config file) keeps everything under ./popbox-data: the
Maildirs, the passwd file and a generated self-signed certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import signal
import ssl

from popbox.config import Config
from popbox.errors import ConfigError

__all__ = ["build_ssl_context", "drop_privileges", "prepare_data_dir", "run_server"]

log = logging.getLogger("popbox")


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
        from popbox.net.tls import ensure_self_signed_cert

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
    from popbox.net.tls import make_server_context

    try:
        return make_server_context(cert, key, config.tls.min_version)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load {cert} / {key}: {exc}") from exc


def drop_privileges(config: Config) -> None:
    """Switch to config.user/config.group after the listeners are bound (as root)."""
    if os.geteuid() != 0 or config.user is None:
        return
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError as exc:
        raise ConfigError(f"user: no such system user {config.user!r}") from exc
    gid = entry.pw_gid
    if config.group is not None:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError as exc:
            raise ConfigError(f"group: no such system group {config.group!r}") from exc
    # Mail and state written from now on belong to the unprivileged user.
    for path in (config.data_dir, config.storage.maildir_root):
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, entry.pw_uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    log.info("dropped privileges to %s (uid %d, gid %d)", config.user, entry.pw_uid, gid)


async def run_server(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run POP3 (and LMTP when enabled) until SIGTERM/SIGINT, then shut down gracefully."""
    from popbox.auth.passwdfile import PasswdFilePassDB
    from popbox.delivery.lmtp import LmtpService
    from popbox.net.service import Pop3Service, bind_addresses
    from popbox.store.maildir import MaildirStore

    ssl_context = build_ssl_context(config)
    # Every listener is bound before privileges are dropped (ports below 1024).
    plain = bind_addresses(config.pop3.listen)
    tls = bind_addresses(config.pop3.tls_listen) if ssl_context is not None else []
    if config.pop3.tls_listen and ssl_context is None:
        log.warning("no TLS certificate: implicit-TLS listeners disabled, STLS not offered")
    lmtp = bind_addresses(config.lmtp.listen) if config.lmtp.enabled else []
    drop_privileges(config)

    store = MaildirStore(config.storage.maildir_root)
    passdb = PasswdFilePassDB(config.auth.passwd_file, default_scheme=config.auth.default_scheme)
    pop3 = Pop3Service(config, store, passdb, ssl_context)
    await pop3.start(sockets=plain, tls_sockets=tls)
    lmtp_service = None
    if config.lmtp.enabled:
        lmtp_service = LmtpService(config, store, passdb)
        await lmtp_service.start(sockets=lmtp)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "popbox serving POP3 on %s, POP3S on %s%s",
        ", ".join(config.pop3.listen) or "-",
        ", ".join(config.pop3.tls_listen) if tls else "-",
        f", LMTP on {', '.join(config.lmtp.listen)}" if lmtp_service else "",
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: no new connections, sessions get %ss to finish",
            config.limits.shutdown_grace,
        )
        if lmtp_service is not None:
            await lmtp_service.stop()
        await pop3.shutdown()
        await store.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
