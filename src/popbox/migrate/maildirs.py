"""Reading a source Maildir: its Maildir++ folders and its message files by key.

A Maildir++ folder is a ``.NAME`` directory holding cur/ (Courier invented the
layout; Dovecot, popbox and most others use it). Only names popbox can serve as
folders are imported; the others are reported, never guessed at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from popbox.errors import InvalidMailboxName
from popbox.store.index import message_key
from popbox.store.mailbox import INBOX, check_folder_name

__all__ = ["MaildirFiles", "list_folders", "message_files", "read_header"]

# A header section longer than this is cut when one is read for X-UIDL or an MD5:
# far beyond any real header, and a corrupt file cannot make the import read gigabytes.
MAX_HEADER_BYTES: Final = 1024 * 1024


@dataclass(slots=True)
class MaildirFiles:
    """The messages of one Maildir folder: key -> path, and keys found twice."""

    by_key: dict[str, Path] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)


def message_files(maildir: Path) -> MaildirFiles:
    """Every message file in ``maildir``'s cur/ and new/ (dotfiles and symlinks left out)."""
    files = MaildirFiles()
    for sub in ("cur", "new"):
        directory = maildir / sub
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in sorted(entries, key=lambda item: item.name):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            key = message_key(entry.name)
            if key in files.by_key:
                files.duplicates.append(key)
                continue
            files.by_key[key] = directory / entry.name
    return files


def list_folders(maildir: Path) -> tuple[dict[str, Path], list[str]]:
    """The folders of a Maildir++ tree, INBOX first: name -> directory, and problems."""
    folders: dict[str, Path] = {INBOX: maildir}
    problems: list[str] = []
    try:
        entries = sorted(os.scandir(maildir), key=lambda item: item.name)
    except FileNotFoundError:
        return folders, [f"{maildir} does not exist"]
    for entry in entries:
        if not entry.name.startswith(".") or entry.name in (".", ".."):
            continue
        if not entry.is_dir(follow_symlinks=False) or not (Path(entry.path) / "cur").is_dir():
            continue
        name = entry.name[1:]
        try:
            folders[check_folder_name(name)] = Path(entry.path)
        except InvalidMailboxName as exc:
            problems.append(f"folder {entry.name!r} left out: {exc}")
    return folders, problems


def read_header(path: Path) -> bytes:
    """The header section of a message file (up to the first empty line), bounded."""
    with path.open("rb") as handle:
        data = handle.read(MAX_HEADER_BYTES)
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = data.find(separator)
        if end >= 0:
            return data[: end + len(separator) // 2]
    if data.startswith((b"\r\n", b"\n")):
        return b""
    return data


def header_lines(header: bytes) -> list[tuple[str, str, bool]]:
    """Physical header lines as (name, value, is_continuation); value without the line
    end, with the whitespace after the colon kept (as Dovecot's header parser gives it)."""
    lines: list[tuple[str, str, bool]] = []
    name = ""
    for raw in header.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        text = line.decode("utf-8", "surrogateescape")
        if text[0] in " \t":
            if name:
                lines.append((name, text, True))
            continue
        head, colon, value = text.partition(":")
        if not colon:
            continue
        name = head.rstrip()
        lines.append((name, value, False))
    return lines


def first_header(header: bytes, wanted: str) -> str | None:
    """The first ``wanted`` header's value, unfolded and stripped, or None."""
    value: list[str] | None = None
    for name, text, continuation in header_lines(header):
        if value is not None:
            if continuation and name.lower() == wanted.lower():
                value.append(text.strip())
                continue
            break
        if not continuation and name.lower() == wanted.lower():
            value = [text.strip()]
    return " ".join(part for part in value if part) if value is not None else None
