"""crypt(3) from the system's libxcrypt, called without holding the GIL.

The SHA-crypt and MD5-crypt families are what most passwd files migrated from Dovecot
or /etc/shadow hold (``{SHA512-CRYPT}$6$...``, Dovecot's own default before Argon2).
libpass verifies them in pure Python, holding the GIL for the whole 5,000 rounds (~2 ms
per SHA512-CRYPT login on the development machine, during which no other session of
that worker moves). libxcrypt, the library Dovecot and glibc's own login tools use,
does the same work in C in about half the time; ctypes releases the GIL for the length
of a foreign call, so the verifications of concurrent logins run on every core of a
worker's thread pool while its event loop keeps serving.

``crypt_rn`` is libxcrypt's reentrant form: the caller provides the working memory
(``struct crypt_data``, one buffer per thread here) and gets NULL, not a magic "*0"
string, for a setting it cannot use. Where libcrypt is missing (not a glibc system) or
refuses a hash, :func:`crypt` returns None and the caller uses libpass; both give the
same answers, which tests/auth checks hash by hash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["available", "crypt"]

# sizeof(struct crypt_data) in libxcrypt's <crypt.h> (CRYPT_DATA_INTERNAL_SIZE plus the
# output, setting and input fields): 32768 bytes on every platform it supports.
CRYPT_DATA_SIZE: Final = 32768

# One working buffer per thread: crypt_rn writes its state and its result into it.
_local = threading.local()


def _load() -> Callable[[bytes, bytes, ctypes.Array[ctypes.c_char], int], bytes | None] | None:
    names = ["libcrypt.so.1", ctypes.util.find_library("crypt")]
    for name in names:
        if not name:
            continue
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        function = getattr(library, "crypt_rn", None)
        if function is None:  # not libxcrypt (an old glibc libcrypt): no crypt_rn
            continue
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        function.restype = ctypes.c_char_p  # NULL -> None; otherwise a copy of the hash
        loaded: Callable[[bytes, bytes, ctypes.Array[ctypes.c_char], int], bytes | None]
        loaded = function
        return loaded
    return None


_crypt_rn: Final = _load()


def available() -> bool:
    """True if the system's libxcrypt was found and will be used."""
    return _crypt_rn is not None


def crypt(secret: bytes, setting: str) -> bytes | None:
    """``crypt(3)`` of ``secret`` with ``setting`` (a stored hash works as its own setting).

    Returns the hash as bytes, or None when libcrypt is not there or does not accept
    the setting (malformed, or an algorithm this build lacks): fall back to libpass.
    ``secret`` must not contain NUL (C strings end there); the caller truncates.
    """
    if _crypt_rn is None:
        return None
    try:
        encoded = setting.encode("ascii")
    except UnicodeEncodeError:
        return None
    buffer: ctypes.Array[ctypes.c_char] | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
        _local.buffer = buffer
    result = _crypt_rn(secret, encoded, buffer, CRYPT_DATA_SIZE)
    if not result or result.startswith(b"*"):
        return None
    return result
