"""Which strings may name a user: one check shared by login, delivery and the stores.

A username ends up in paths (``maildir_root/USER``), in log lines and in the passwd
file, whose fields are ``:``-separated. So a name is a short run of letters, digits
and ``. _ - @ +`` that cannot be read as a path component, an option, a field
separator or a line break. Usernames are case-sensitive, as in Dovecot's passwd-file
by default: ``Alice`` and ``alice`` are two users. (LMTP lower-cases the local part of
a recipient before it gets here when ``lmtp.lowercase_local_part`` is on.)

Names in other scripts (``josé``, ``δοκιμή``, ``山田``) are users too, as RFC 6856
wants for POP3's UTF8 USER: in Unicode NFC (the form the protocol core normalises
logins to), with letters of one script only (in each side of an ``@``), so that a
Cyrillic a (U+0430) slipped into ``alice`` makes no second "alice"; no
compatibility forms (fullwidth letters,
ligatures), no invisible or direction-changing characters, and ASCII digits only.
The length bound counts octets, as the file system does.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from popbox.errors import InvalidUsername

__all__ = ["MAX_USERNAME_LENGTH", "is_valid_username", "validate_username"]

# RFC 5321 (4.5.3.1) allows 64 octets of local part and 254 of address, but a name
# also becomes a directory under maildir_root, where stores add suffixes and NAME_MAX
# is 255 octets; 128 octets of UTF-8 hold every real address with room to spare.
MAX_USERNAME_LENGTH: Final = 128

# ASCII only, spelled out: str.isalnum() and \w accept non-ASCII letters and digits
# (Cyrillic a, fullwidth digits) that look like ASCII ones in a log or a listing.
# The first character may not be '.' (hidden files, '.', '..') or '-' (an option to
# whatever tool an operator points at the maildir).
_USERNAME: Final = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")
# The same shape for names with letters beyond ASCII: any character may be one of
# those, and the rest are checked one by one (_is_letter_of_one_script).
_PUNCTUATION: Final = frozenset("._@+-")
# Scripts that are written together: Japanese mixes kana and kanji in one name.
_SCRIPT_GROUPS: Final = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "CJK": "CJK"}

# How much of a rejected name goes into the error message: enough to recognise it,
# never a megabyte of attacker input in a log line.
_SHOWN_PREFIX: Final = 40


def _shown(name: str) -> str:
    if len(name) <= _SHOWN_PREFIX:
        return repr(name)
    return repr(name[:_SHOWN_PREFIX]) + f"... ({len(name)} characters)"


def validate_username(name: str) -> str:
    """Return ``name`` unchanged if it can name a user; raise InvalidUsername if not.

    No normalisation happens here (no case folding, no trimming): a name that needs
    changing to be valid is not one.
    """
    if not name:
        raise InvalidUsername("username is empty")
    if len(name) > MAX_USERNAME_LENGTH or len(name.encode("utf-8", "replace")) > (
        MAX_USERNAME_LENGTH
    ):
        raise InvalidUsername(
            f"username {_shown(name)} is longer than {MAX_USERNAME_LENGTH} octets"
        )
    # fullmatch, not match with '$': '$' also matches before a trailing newline.
    if _USERNAME.fullmatch(name) is None and not _is_international(name):
        raise InvalidUsername(
            f"username {_shown(name)} may hold only letters of one script, ASCII digits "
            "and . _ - @ + (in Unicode NFC) and may not start with '.' or '-'"
        )
    return name


def _is_international(name: str) -> bool:
    """A name with letters beyond ASCII that is as safe as an ASCII one (module doc)."""
    if name.isascii() or name[0] in ".-":
        return False
    if unicodedata.normalize("NFKC", name) != name:  # NFKC-stable is NFC-stable too
        return False
    # An address's local part and domain each have their own script (δοκιμή@example.gr).
    return all(_is_one_script(part) for part in name.split("@"))


def _is_one_script(part: str) -> bool:
    scripts: set[str] = set()
    for char in part:
        if char in _PUNCTUATION or "0" <= char <= "9":
            continue
        category = unicodedata.category(char)
        if category[0] == "M" and scripts:
            continue  # a combining mark belongs to the letter before it
        if category[0] != "L":
            return False  # spaces, symbols, format and control characters, other digits
        script = unicodedata.name(char, "?").split(" ", 1)[0]
        scripts.add(_SCRIPT_GROUPS.get(script, script))
    return len(scripts) <= 1


def is_valid_username(name: str) -> bool:
    """True if validate_username would accept ``name``."""
    try:
        validate_username(name)
    except InvalidUsername:
        return False
    return True
