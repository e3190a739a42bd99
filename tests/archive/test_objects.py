"""The object files (popbox.archive.objects): whole or absent, streamed back in
bounded chunks, listed and removed by digest."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from popbox.archive.objects import READ_CHUNK, ObjectStore, compress, decompress


def test_an_object_reads_back_in_bounded_chunks(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    data = os.urandom(3 * READ_CHUNK + 17)
    digest = hashlib.sha256(data).hexdigest()
    path = store.write(digest, data)
    store.sync([path])
    assert path == tmp_path / "objects" / digest[:2] / f"{digest}.zst"
    chunks = list(store.read(digest))
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) <= READ_CHUNK
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert list(store.digests()) == [digest]


def test_writing_again_replaces_a_partial_leftover(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    data = b"whole content" * 1000
    digest = hashlib.sha256(data).hexdigest()
    store.path(digest).parent.mkdir(parents=True)
    store.path(digest).write_bytes(b"partial")
    store.write(digest, data)
    assert b"".join(store.read(digest)) == data


def test_remove_and_temporaries(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    digests = []
    for index in range(3):
        data = f"object {index}".encode()
        digests.append(hashlib.sha256(data).hexdigest())
        store.write(digests[-1], data)
    assert store.remove([digests[0], "0" * 64]) == 1
    assert sorted(store.digests()) == sorted(digests[1:])
    fresh = store.path(digests[1]).parent / ".tmp-fresh"
    fresh.write_bytes(b"a writer at work")
    old = store.path(digests[2]).parent / ".tmp-old"
    old.write_bytes(b"left by a crash")
    an_hour_ago = time.time() - 7200
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.remove_temporaries() == 1
    assert fresh.exists()
    assert not old.exists()
    assert store.remove_temporaries(min_age=0) == 1
    assert sorted(store.digests()) == sorted(digests[1:])


def test_small_pieces_compress_and_come_back() -> None:
    data = b"small piece " * 100
    packed = compress(memoryview(data))
    assert len(packed) < len(data)
    assert decompress(packed) == data
