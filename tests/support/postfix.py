"""A private Postfix instance for end-to-end tests: its own config, queue and log dirs.

The instance listens for SMTP on 127.0.0.1 only, on a free high port, accepts mail for
``example.test`` as a virtual mailbox domain and relays it over LMTP to the popbox
listener under test. It never touches the system Postfix (/etc/postfix/main.cf is not
read; ``postfix -c DIR`` points every program at DIR) and it is stopped, and its
master process killed if need be, when the test ends.

Postfix needs root to start (master(8) drops to mail_owner itself) and the Debian
package (scripts/setup-system.sh installs it); without either the tests skip and say
which is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from support.ports import free_port

POSTFIX: Final = "/usr/sbin/postfix"
# The Debian package's daemon programs; master.cf below names them.
DAEMON_DIRECTORY: Final = Path("/usr/lib/postfix/sbin")
MAIL_OWNER: Final = "postfix"
# Generous: Postfix start-up plus a queue manager scan takes a few seconds at most,
# but a loaded CI machine with 2 cores should not turn into a flaky test.
START_TIMEOUT: Final = 30.0
DOMAIN: Final = "example.test"

# Only the services a relay to LMTP needs, none chrooted (the private queue directory
# has no copy of /etc or the libraries a chroot would need).
MASTER_CF: Final = """\
{smtp_listen} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
local     unix  - n n -    - local
virtual   unix  - n n -    - virtual
lmtp      unix  - - n -    - lmtp
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF: Final = """\
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
daemon_directory = {daemon_directory}
mail_owner = {mail_owner}
maillog_file = {log}
# Postfix refuses log files outside these prefixes (a guard against /etc/passwd).
maillog_file_prefixes = {directory}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.popbox.test
mydomain = popbox.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
relayhost =
virtual_mailbox_domains = {domain}
virtual_transport = {transport}
# The LMTP server is the one who knows the users (550 5.1.1 at RCPT), as with a
# Dovecot LMTP backend; Postfix keeps no list of its own.
smtpd_reject_unlisted_recipient = no
# Loopback only, numeric next hops: no DNS is needed or wanted in a test.
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
# Deliver now and retry soon: a test waits seconds, not Postfix's default minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = yes
"""


@dataclass
class PostfixInstance:
    """A running private Postfix: where it listens and where it keeps things."""

    directory: Path
    smtp_port: int
    lmtp_target: str

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    @property
    def log_file(self) -> Path:
        return self.directory / "maillog"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def diagnose(self) -> str:
        """What ``postfix check`` says. Postfix commands write their fatal errors to
        syslog unless stderr is a terminal, so run it under script(1) for one."""
        command = [POSTFIX, "-c", str(self.config_dir), "check"]
        if shutil.which("script"):
            command = ["script", "-qc", " ".join(command), "/dev/null"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return (result.stdout + result.stderr).strip() or f"exit {result.returncode}"

    def master_pid(self) -> int | None:
        try:
            text = (self.directory / "queue" / "pid" / "master.pid").read_text()
        except FileNotFoundError:
            return None
        return int(text.strip()) if text.strip().isdigit() else None


def postfix_unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if not Path(POSTFIX).exists() or not DAEMON_DIRECTORY.is_dir():
        return "Postfix is not installed (scripts/setup-system.sh installs it)"
    if os.geteuid() != 0:
        return "starting Postfix needs root (its master drops to the postfix user)"
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"the {MAIL_OWNER!r} system user is missing (install the postfix package)"
    return None


def _wait_for_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def running_postfix(
    directory: Path, lmtp_target: str, extra_main_cf: str = ""
) -> Iterator[PostfixInstance]:
    """Configure and start Postfix in ``directory``; stop it (and kill it) on exit.

    ``lmtp_target`` is Postfix's next-hop syntax: ``inet:127.0.0.1:PORT`` or
    ``unix:/path/to/socket``. ``extra_main_cf`` is appended to main.cf (later
    settings win), for the variants docs/delivery.md recommends.
    """
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    instance = PostfixInstance(directory, free_port(), lmtp_target)
    config, queue, data = instance.config_dir, directory / "queue", directory / "data"
    for path in (config, queue, data):
        path.mkdir(parents=True, exist_ok=True)
    # The queue must belong to root and the data directory to mail_owner, as
    # postfix-script check insists; the private tmp_path is root's, mode 0700.
    os.chmod(directory, 0o755)
    owner = pwd.getpwnam(MAIL_OWNER)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    instance.log_file.touch()
    os.chown(instance.log_file, owner.pw_uid, owner.pw_gid)
    (config / "main.cf").write_text(
        MAIN_CF.format(
            config=config,
            queue=queue,
            data=data,
            daemon_directory=DAEMON_DIRECTORY,
            mail_owner=MAIL_OWNER,
            log=instance.log_file,
            directory=directory,
            domain=DOMAIN,
            transport=f"lmtp:{lmtp_target}",
        )
        + extra_main_cf
    )
    (config / "master.cf").write_text(
        MASTER_CF.format(smtp_listen=f"127.0.0.1:{instance.smtp_port}")
    )
    # Debian's dynamic map registry lives beside main.cf; postconf wants it there.
    for name in ("dynamicmaps.cf",):
        source = Path("/etc/postfix") / name
        if source.exists():
            shutil.copy(source, config / name)
    started = instance.postfix("start", check=False)
    try:
        if started.returncode != 0:
            pytest.fail(
                f"postfix start failed ({started.returncode}): {started.stderr}\n"
                f"postfix check: {instance.diagnose()}\nlog:\n{instance.log()}"
            )
        if not _wait_for_port(instance.smtp_port, time.monotonic() + START_TIMEOUT):
            pytest.fail(f"Postfix did not listen on {instance.smtp_port}:\n{instance.log()}")
        yield instance
    finally:
        instance.postfix("stop", check=False)
        pid = instance.master_pid()
        deadline = time.monotonic() + 10
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            if pid is not None:
                # The master we started did not go; kill it by its pid (and only it).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
