"""Which strings may name a user: one check shared by login, delivery and the stores.

A username ends up in paths (``maildir_root/USER``), in log lines and in the passwd
file, whose fields are ``:``-separated. So a name is a short run of ASCII letters,
digits and ``. _ - @ +`` that cannot be read as a path component, an option, a field
separator or a line break. Usernames are case-sensitive, as in Dovecot's passwd-file
by default: ``Alice`` and ``alice`` are two users. (LMTP lower-cases the local part of
a recipient before it gets here when ``lmtp.lowercase_local_part`` is on.)
"""

from __future__ import annotations

import re
from typing import Final

from popbox.errors import InvalidUsername

__all__ = ["MAX_USERNAME_LENGTH", "is_valid_username", "validate_username"]

# RFC 5321 (4.5.3.1) allows 64 octets of local part and 254 of address, but a name
# also becomes a directory under maildir_root, where stores add suffixes and NAME_MAX
# is 255; 128 holds every real address with room to spare.
MAX_USERNAME_LENGTH: Final = 128

# ASCII only, spelled out: str.isalnum() and \w accept non-ASCII letters and digits
# (Cyrillic a, fullwidth digits) that look like ASCII ones in a log or a listing.
# The first character may not be '.' (hidden files, '.', '..') or '-' (an option to
# whatever tool an operator points at the maildir).
_USERNAME: Final = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")

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
    if len(name) > MAX_USERNAME_LENGTH:
        raise InvalidUsername(
            f"username {_shown(name)} is longer than {MAX_USERNAME_LENGTH} characters"
        )
    # fullmatch, not match with '$': '$' also matches before a trailing newline.
    if _USERNAME.fullmatch(name) is None:
        raise InvalidUsername(
            f"username {_shown(name)} may hold only ASCII letters, digits and . _ - @ + "
            "and may not start with '.' or '-'"
        )
    return name


def is_valid_username(name: str) -> bool:
    """True if validate_username would accept ``name``."""
    try:
        validate_username(name)
    except InvalidUsername:
        return False
    return True
