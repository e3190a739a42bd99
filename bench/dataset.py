"""The benchmark's users, Maildirs, passwd file and certificate, built once and copied.

``build`` writes the seed data under ``WORK/data`` (reused by later runs with the same
parameters, since writing 200,000 files takes a minute); ``install`` copies it for one
server (``cp -a``: each server gets its own files and so its own index) and, for
Dovecot, hands the copy to the mail user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from bench import mailgen
from bench.mailgen import MailboxManifest

__all__ = ["PASSWORD", "Dataset", "Sizes", "build", "install"]

SEED: Final = 20240601
# One password for every user: what is measured is the server, not a hash per user.
PASSWORD: Final = "bench-password-1"
# Dovecot's and glibc's default SHA512-CRYPT rounds: popbox's own default (100,000)
# would make the login figures a measure of the hash for both servers alike.
HASH_ROUNDS: Final = 5000


@dataclass(frozen=True)
class Sizes:
    """How much of everything; --quick shrinks it."""

    login_users: int = 20
    login_messages: int = 10
    retr_users: int = 8
    retr_messages: int = 200
    churn_users: int = 20
    churn_messages: int = 5
    idle_users: int = 2000
    bigbox_messages: int = 100_000
    collector_messages: int = 5000


@dataclass
class Dataset:
    root: Path
    sizes: Sizes
    scheme: str

    @property
    def mail(self) -> Path:
        return self.root / "mail"

    @property
    def collector_mail(self) -> Path:
        return self.root / "collector-mail"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "tls" / "key.pem"

    def manifest(self, user: str) -> MailboxManifest:
        return MailboxManifest.load(self.root / "manifests" / f"{user}.json")

    def retr_manifest(self, user: str) -> MailboxManifest:
        """The manifest with ``stuffed_bodies`` filled in, for the RETR scenario."""
        manifest = self.manifest(user)
        # The generated Maildir is never touched by the servers (each has its own copy).
        files = sorted((self.mail / user).glob("*/*"))
        manifest.stuffed_bodies = [mailgen.stuffed_wire(path.read_bytes()) for path in files]
        if len(manifest.stuffed_bodies) != len(manifest.hashes):
            raise RuntimeError(f"{user}: {len(files)} stored messages, manifest says "
                               f"{len(manifest.hashes)}; rebuild the data (delete --work)")
        return manifest

    def login_users(self) -> list[str]:
        return [f"login{n:02d}" for n in range(self.sizes.login_users)]

    def retr_users(self) -> list[str]:
        return [f"retr{n}" for n in range(self.sizes.retr_users)]

    def churn_users(self) -> list[str]:
        return [f"churn{n:02d}" for n in range(self.sizes.churn_users)]

    def idle_users(self) -> list[str]:
        return [f"idle{n:05d}" for n in range(self.sizes.idle_users)]

    bigbox_users: tuple[str, str] = ("bigsized", "bigplain")
    collector_user: str = "collect"


def _hash(scheme: str) -> str:
    from popbox.auth.schemes import DEFAULT_COST, HashCost, hash_password

    cost = HashCost(
        argon2_time_cost=DEFAULT_COST.argon2_time_cost,
        argon2_memory_kib=DEFAULT_COST.argon2_memory_kib,
        sha_crypt_rounds=HASH_ROUNDS,
    )
    return hash_password(PASSWORD, scheme, cost=cost)


def build(work: Path, sizes: Sizes, scheme: str = "SHA512-CRYPT", log: bool = True) -> Dataset:
    """Build (or reuse) the seed data for ``sizes`` under ``work/data``."""
    root = work / "data"
    stamp = {"seed": SEED, "sizes": asdict(sizes), "scheme": scheme, "format": 4}
    stamp_file = root / "stamp.json"
    dataset = Dataset(root, sizes, scheme)
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return dataset
    if root.exists():
        shutil.rmtree(root)
    (root / "manifests").mkdir(parents=True)
    (root / "tls").mkdir()
    from popbox.net.tls_context import ensure_self_signed_cert

    ensure_self_signed_cert(dataset.cert, dataset.key, "localhost")
    # The key must be readable by Dovecot's config reader and popbox alike (both root).
    plan: list[tuple[str, int, mailgen.Profile, bool, Path]] = []
    plan += [(u, sizes.login_messages, mailgen.SMALL, True, dataset.mail)
             for u in dataset.login_users()]
    # The RETR mailboxes are stored as popbox's delivery stores mail (CRLF, S= == W=);
    # Dovecot gets the same files. The rest keeps LF, as other MTAs write it.
    crlf_users = set(dataset.retr_users())
    plan += [(u, sizes.retr_messages, mailgen.REALISTIC, True, dataset.mail)
             for u in dataset.retr_users()]
    plan += [(u, sizes.churn_messages, mailgen.SMALL, True, dataset.mail)
             for u in dataset.churn_users()]
    plan += [(u, 0, mailgen.SMALL, True, dataset.mail) for u in dataset.idle_users()]
    sized, plain = dataset.bigbox_users
    plan.append((sized, sizes.bigbox_messages, mailgen.SMALL, True, dataset.mail))
    plan.append((plain, sizes.bigbox_messages, mailgen.SMALL, False, dataset.mail))
    plan.append((dataset.collector_user, sizes.collector_messages, mailgen.NO_ATTACHMENTS, True,
                 dataset.collector_mail))
    for user, count, profile, with_sizes, base in plan:
        if log and count >= 1000:
            print(f"  generating {count} messages for {user}", flush=True)
        manifest = mailgen.write_maildir(
            base / user, SEED, user, count, profile=profile, with_sizes=with_sizes,
            crlf=user in crlf_users,
        )
        manifest.save(root / "manifests" / f"{user}.json")
    stored = _hash(scheme)
    users = [user for user, *_ in plan]
    dataset.passwd.write_text("".join(f"{user}:{stored}::::::\n" for user in users))
    stamp_file.write_text(json.dumps(stamp))
    return dataset


def install(dataset: Dataset, target: Path, *, owner: tuple[int, int] | None,
            collector: bool = False) -> None:
    """Copy the seed mail and passwd to ``target`` (mail/, passwd) for one server."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(dataset.mail), str(target / "mail")], check=True)
    if collector:
        for entry in dataset.collector_mail.iterdir():
            subprocess.run(["cp", "-a", str(entry), str(target / "mail" / entry.name)],
                           check=True)
    shutil.copy(dataset.passwd, target / "passwd")
    if owner is not None:
        uid, gid = owner
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(target / "mail")], check=True)
        # Dovecot's auth process (user dovecot) reads the passwd file.
        os.chmod(target / "passwd", 0o644)
    else:
        os.chmod(target / "passwd", 0o600)
