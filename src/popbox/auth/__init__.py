"""Who may log in: the PassDB contract, the passwd-file database and password schemes.

``PassDB`` and ``UserRecord`` are the contract the network and delivery code use;
``PasswdFilePassDB`` reads a Dovecot-format passwd file; ``validate_username`` is the
one definition of a valid username; the functions from ``popbox.auth.admin`` edit the
passwd file for ``popbox user``.
"""

from __future__ import annotations

from popbox.auth.admin import (
    NoSuchUser,
    UserExists,
    add_user,
    delete_user,
    list_users,
    set_password,
    set_quota,
)
from popbox.auth.base import PassDB, UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.auth.names import MAX_USERNAME_LENGTH, is_valid_username, validate_username
from popbox.auth.passwdfile import PasswdFilePassDB, parse_size
from popbox.auth.schemes import (
    DEFAULT_SCHEME,
    HashCost,
    hash_password,
    is_plaintext,
    plaintext_of,
    verify_password,
)

__all__ = [
    "DEFAULT_SCHEME",
    "MAX_USERNAME_LENGTH",
    "HashCost",
    "MemoryPassDB",
    "NoSuchUser",
    "PassDB",
    "PasswdFilePassDB",
    "UserExists",
    "UserRecord",
    "add_user",
    "delete_user",
    "hash_password",
    "is_plaintext",
    "is_valid_username",
    "list_users",
    "parse_size",
    "plaintext_of",
    "set_password",
    "set_quota",
    "validate_username",
    "verify_password",
]
