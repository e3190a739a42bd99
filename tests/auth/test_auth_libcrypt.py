"""The C crypt(3) path (libxcrypt through ctypes) against libpass, hash by hash."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

from popbox.auth import libcrypt
from popbox.auth.schemes import verify_password

needs_libcrypt = pytest.mark.skipif(not libcrypt.available(), reason="no libxcrypt here")

# Cheap settings keep the property test fast; the algorithms are the same at any cost.
HANDLERS = [
    sha512_crypt.using(rounds=1000),
    sha256_crypt.using(rounds=1000),
    md5_crypt,
    des_crypt,
]

passwords = st.binary(min_size=0, max_size=300).filter(lambda b: b"\0" not in b)


@needs_libcrypt
@settings(max_examples=40, deadline=None)
@given(password=passwords, which=st.integers(min_value=0, max_value=len(HANDLERS) - 1))
def test_libcrypt_agrees_with_libpass(password: bytes, which: int) -> None:
    handler = HANDLERS[which]
    stored = handler.hash(password)
    assert libcrypt.crypt(password, stored) == stored.encode("ascii")
    other = b"x" + password  # in front: DES-crypt reads only the first 8 bytes
    assert libcrypt.crypt(other, stored) != stored.encode("ascii")


@needs_libcrypt
@pytest.mark.parametrize(
    "setting",
    ["", "$6$rounds=abc$salt$hash", "$9$unknown", "\u00e9t\u00e9", "*0", "!locked"],
)
def test_settings_libcrypt_refuses_fall_back(setting: str) -> None:
    # None means "ask libpass": a malformed hash is then reported by libpass as before.
    assert libcrypt.crypt(b"pw", setting) is None


@needs_libcrypt
def test_known_vector() -> None:
    # The SHA512-CRYPT example of the reference specification (Drepper, "Unix crypt
    # using SHA-256 and SHA-512"), test vector 1.
    stored = (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
    )
    assert libcrypt.crypt(b"Hello world!", stored) == stored.encode("ascii")
    assert verify_password("Hello world!", stored)
    assert verify_password("Hello world!", "{SHA512-CRYPT}" + stored)
    assert not verify_password("Hello world?", stored)


@needs_libcrypt
def test_the_gil_is_released_while_hashing() -> None:
    # While one thread verifies a costly hash in C, another thread keeps running
    # Python: with the GIL held it would make no progress until the hash returned.
    stored = sha512_crypt.using(rounds=2_000_000).hash("pw")
    ticks = 0
    done = threading.Event()

    def hash_it() -> None:
        try:
            assert libcrypt.crypt(b"pw", stored) == stored.encode("ascii")
        finally:
            done.set()

    worker = threading.Thread(target=hash_it)
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    worker.join()
    # 2,000,000 rounds are a long C call; the other thread looped all the while.
    assert ticks > 1000
