"""Deterministic mail for the benchmarks: messages, Maildirs and their expected wire hashes.

Every message is a pure function of (seed, mailbox, number), so two runs on two machines
build the same bytes. The mix is what a small office's POP3 box holds: mostly 2-50 KB
text/plain or multipart/alternative HTML, a few with 1-5 MB base64 attachments, 8-bit
UTF-8 bodies, and lines that start with '.' (so dot-stuffing is exercised). Messages are
stored as an MTA stores them in a Maildir: LF line ends, no CR anywhere, final LF; or,
with ``crlf``, as popbox's delivery and Dovecot's ``mail_save_crlf`` store them: CRLF.

A manifest per mailbox records the SHA-256 of each message's *wire form* (CRLF line
ends, before dot-stuffing: what a client has after undoing the stuffing), which is what
the load generator compares. Files are written directly (no fsync): this is test data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Final

__all__ = [
    "MailboxManifest",
    "Profile",
    "message",
    "wire_form",
    "wire_sha256",
    "write_maildir",
]

# A fixed start time keeps file names (and so arrival order) identical across runs.
EPOCH: Final = 1_700_000_000
# Words with 8-bit UTF-8 and a few that make lines start with '.' once wrapped.
_WORD_TEXT: Final = (
    "the of and to in is that for it as with was on be at by this had not are but from "
    "or have an they which one you were her all she there would their we him been has "
    "when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our "
    "Grüße naïve café façade Übermaß élève smørrebrød 東京 привет Καλημέρα "
    "invoice meeting report quarterly budget attached please regards thanks"
)
_WORDS: Final = tuple(_WORD_TEXT.split())


def _corpus(seed: int) -> bytes:
    """About 256 KiB of wrapped text lines to slice bodies from (fast, deterministic)."""
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < 256 * 1024:
        roll = rng.random()
        if roll < 0.03:
            # Lines a naive server would take for the terminator or mis-stuff.
            line = rng.choice([".", "..", ".hidden line", "... and so on", ". "])
        elif roll < 0.08:
            line = ""
        else:
            line = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 14)))
        lines.append(line)
        size += len(line.encode()) + 1
    return ("\n".join(lines) + "\n").encode("utf-8")


_CORPUS_CACHE: dict[int, bytes] = {}


def _text(rng: random.Random, corpus_seed: int, size: int) -> bytes:
    """``size`` bytes (rounded to whole lines) of corpus text starting at a random line."""
    corpus = _CORPUS_CACHE.get(corpus_seed)
    if corpus is None:
        corpus = _CORPUS_CACHE[corpus_seed] = _corpus(corpus_seed)
    parts: list[bytes] = []
    need = size
    while need > 0:
        start = corpus.find(b"\n", rng.randrange(len(corpus) - 1)) + 1
        piece = corpus[start : start + need]
        cut = piece.rfind(b"\n") + 1
        piece = piece[:cut] if cut else piece + b"\n"
        if not piece:
            piece = b"\n"
        parts.append(piece)
        need -= len(piece)
    return b"".join(parts)


@dataclass(frozen=True)
class Profile:
    """A size mix: probabilities of an HTML message and of a big attachment."""

    name: str
    text_min: int = 2 * 1024
    text_max: int = 50 * 1024
    html_share: float = 0.3
    # Every Nth message carries a 1-5 MB attachment (0: none). Fixed positions rather
    # than chance, so every mailbox of a scenario has the same mix and the clients of
    # a multi-client figure do comparable work.
    attachment_every: int = 50
    attachment_min: int = 1024 * 1024
    attachment_max: int = 5 * 1024 * 1024


REALISTIC: Final = Profile("realistic")
# The 100,000-message maildrop measures indexing, not bytes: small messages keep it at
# a few hundred MB per copy (four copies are written) instead of several GB.
SMALL: Final = Profile("small", text_min=1024, text_max=4 * 1024, html_share=0.0,
                       attachment_every=0)
# The collector's mailbox: the realistic mix without multi-megabyte attachments, so
# fetchmail's one-fork-per-message MDA and the 20 ms runs stay within minutes.
NO_ATTACHMENTS: Final = Profile("no-attachments", attachment_every=0)


def message(seed: int, mailbox: str, number: int, profile: Profile = REALISTIC) -> bytes:
    """The stored form (LF line ends) of message ``number`` of ``mailbox``."""
    rng = random.Random(f"{seed}:{mailbox}:{number}")
    sender = f"sender{rng.randrange(1000)}@example.org"
    date_offset = number * 37
    headers = [
        f"Return-Path: <{sender}>",
        f"From: Sender {rng.randrange(1000)} <{sender}>",
        f"To: {mailbox}@example.net",
        f"Subject: bench {mailbox} #{number} {rng.choice(_WORDS)}",
        f"Date: {formatdate(EPOCH + date_offset, usegmt=True)}",
        f"Message-ID: <{seed}.{mailbox}.{number}@bench.example>",
        "MIME-Version: 1.0",
    ]
    size = rng.randrange(profile.text_min, profile.text_max)
    body = _text(rng, seed, size)
    roll = rng.random()
    every = profile.attachment_every
    if every and number % every == every // 2:
        boundary = f"=_bench_{number}"
        blob = rng.randbytes(rng.randrange(profile.attachment_min, profile.attachment_max))
        encoded = base64.encodebytes(blob)  # 76-column lines, LF-terminated
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        parts = (
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\n"
        ).encode() + body + (
            f"--{boundary}\nContent-Type: application/octet-stream\n"
            f'Content-Disposition: attachment; filename="file{number}.bin"\n'
            "Content-Transfer-Encoding: base64\n\n"
        ).encode() + encoded + f"--{boundary}--\n".encode()
        payload = parts
    elif roll < profile.html_share:
        boundary = f"=_alt_{number}"
        headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        html = b"<html><body>\n" + body.replace(b"\n\n", b"\n<p>\n") + b"</body></html>\n"
        payload = (
            f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\n"
        ).encode() + body[: len(body) // 2] + b"\n" + (
            f"--{boundary}\nContent-Type: text/html; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\n"
        ).encode() + html + f"--{boundary}--\n".encode()
    else:
        headers.append("Content-Type: text/plain; charset=utf-8")
        headers.append("Content-Transfer-Encoding: 8bit")
        payload = body
    return "\n".join(headers).encode() + b"\n\n" + payload


def wire_form(stored: bytes) -> bytes:
    """What RETR carries before dot-stuffing: CRLF line ends (our messages end in one).

    Generated messages have LF only; stored ones may already be CRLF (``crlf``).
    """
    if b"\r" in stored:
        stored = stored.replace(b"\r\n", b"\n")
    return stored.replace(b"\n", b"\r\n")


def wire_sha256(stored: bytes) -> str:
    return hashlib.sha256(wire_form(stored)).hexdigest()


def stuffed_wire(stored: bytes) -> bytes:
    """The body as RETR sends it, dot-stuffed, before the terminator."""
    wire = wire_form(stored).replace(b"\r\n.", b"\r\n..")
    return b"." + wire if wire.startswith(b".") else wire


def stuffed_sha256(stored: bytes) -> str:
    """SHA-256 of ``stuffed_wire``: what a download must match, in a manifest's size."""
    return hashlib.sha256(stuffed_wire(stored)).hexdigest()


@dataclass
class MailboxManifest:
    """What a full download of a mailbox must produce: a multiset of wire hashes."""

    mailbox: str
    hashes: list[str]
    wire_octets: int
    # Filled in by the dataset from the stored files (not saved): see stuffed_wire.
    # The load generator compares what it receives with these bytes (memcmp speed).
    stuffed_bodies: list[bytes] = field(default_factory=list)

    def save(self, path: Path) -> None:
        saved = {k: v for k, v in self.__dict__.items() if k != "stuffed_bodies"}
        path.write_text(json.dumps(saved))

    @classmethod
    def load(cls, path: Path) -> MailboxManifest:
        return cls(**json.loads(path.read_text()))


def write_maildir(
    maildir: Path,
    seed: int,
    mailbox: str,
    count: int,
    *,
    profile: Profile = REALISTIC,
    with_sizes: bool = True,
    crlf: bool = False,
    uid: int = -1,
    gid: int = -1,
) -> MailboxManifest:
    """Write ``count`` messages into ``maildir/new`` as an MTA would; return the manifest.

    ``,S=`` is the stored size and ``,W=`` the wire size (Dovecot's virtual size), the
    fields both servers use to skip opening files. ``crlf`` stores every message with
    CRLF line ends, as popbox's delivery does (``storage.save_crlf``) and Dovecot's
    with ``mail_save_crlf``: then S= equals W=.
    """
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    new = maildir / "new"
    hashes: list[str] = []
    octets = 0
    for number in range(count):
        data = message(seed, mailbox, number, profile)
        wire = wire_form(data)
        if crlf:
            data = wire
        hashes.append(hashlib.sha256(wire).hexdigest())
        octets += len(wire)
        base = f"{EPOCH + number}.M{number}P4242Q{number}.bench"
        name = f"{base},S={len(data)},W={len(wire)}" if with_sizes else base
        fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    manifest = MailboxManifest(mailbox, hashes, octets)
    if uid >= 0:
        chown_tree(maildir, uid, gid)
    return manifest


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give a Maildir to the mail user (Dovecot refuses to deliver as root)."""
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
