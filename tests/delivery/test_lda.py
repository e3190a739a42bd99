"""``popbox deliver``'s engine: the exit status an MTA acts on, for each case."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest

from popbox.auth.base import UserRecord
from popbox.config import QuotaSettings
from popbox.delivery.deliverer import Deliverer
from popbox.delivery.lda import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    report_setup_failure,
    run_lda,
)
from popbox.errors import PermanentStoreError, StoreError
from popbox.store.index import size_fields
from popbox.store.memory import MemoryStore
from support.lmtp import make_config, users

MESSAGE = b"From: carol@example.net\nSubject: lda\n\nbody line\n"


def stored(store: MemoryStore, user: str) -> list[bytes]:
    async def read() -> list[bytes]:
        drop = await store.open_maildrop(user)
        try:
            return [
                b"".join([c async for c in drop.read_message(i)])
                for i in range(len(drop.messages))
            ]
        finally:
            await drop.release()

    return asyncio.run(read())


def lda(
    data: bytes | io.RawIOBase,
    recipient: str = "alice",
    sender: str | None = "carol@example.net",
    **kwargs: object,
) -> tuple[int, str, MemoryStore]:
    store = kwargs.pop("store", None) or MemoryStore()
    config = kwargs.pop("config", None) or make_config()
    passdb = kwargs.pop("passdb", None) or users("alice", full=UserRecord("full", quota_messages=1))
    deliverer = Deliverer(config, store, passdb)  # type: ignore[arg-type]
    err = io.StringIO()
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    code = asyncio.run(run_lda(deliverer, recipient, sender, source, stderr=err))  # type: ignore[arg-type]
    return code, err.getvalue(), store  # type: ignore[return-value]


def test_delivered_exits_0_and_adds_trace_headers() -> None:
    code, err, store = lda(MESSAGE)
    assert (code, err) == (EX_OK, "")
    assert stored(store, "alice") == [
        b"Return-Path: <carol@example.net>\nDelivered-To: alice\n" + MESSAGE
    ]


def test_no_such_user_exits_67() -> None:
    code, err, _ = lda(MESSAGE, recipient="nobody")
    assert code == EX_NOUSER
    # One line, starting with the status code Postfix puts into the bounce.
    assert err.startswith("popbox deliver: 5.1.1 ")
    assert err.count("\n") == 1


def test_too_big_exits_65() -> None:
    code, err, store = lda(MESSAGE, config=make_config(max_message_size=10))
    assert code == EX_DATAERR
    assert "5.3.4" in err
    assert stored(store, "alice") == []


class _Unreadable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        raise OSError(5, "Input/output error")


def test_unreadable_input_exits_65() -> None:
    code, err, _ = lda(_Unreadable())
    assert code == EX_DATAERR
    assert "cannot read" in err


@pytest.mark.parametrize(
    ("policy", "expected", "status"),
    [("temporary", EX_TEMPFAIL, "4.2.2"), ("permanent", EX_NOPERM, "5.2.2")],
)
def test_over_quota(policy: str, expected: int, status: str) -> None:
    store = MemoryStore()
    asyncio.run(store.deliver("full", b"x\n"))
    config = make_config(quota=QuotaSettings(over_quota=policy))  # type: ignore[arg-type]
    code, err, _ = lda(MESSAGE, recipient="full", config=config, store=store)
    assert code == expected
    assert status in err


class _Store(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self._error = error

    async def deliver(self, user: str, message: bytes, **options: object) -> str:
        raise self._error


def test_storage_faults() -> None:
    assert lda(MESSAGE, store=_Store(StoreError("busy disk")))[0] == EX_TEMPFAIL
    assert lda(MESSAGE, store=_Store(OSError(28, "No space left")))[0] == EX_TEMPFAIL
    code, err, _ = lda(MESSAGE, store=_Store(PermanentStoreError("read-only")))
    assert code == EX_CANTCREAT
    assert "5.2.0" in err


def test_mbox_postmark_is_dropped_and_gives_the_sender() -> None:
    data = b"From bounce@example.net Thu Nov 26 06:00:00 2026\n" + MESSAGE
    code, _, store = lda(data, sender=None)
    assert code == EX_OK
    assert stored(store, "alice") == [
        b"Return-Path: <bounce@example.net>\nDelivered-To: alice\n" + MESSAGE
    ]


def test_trace_already_written_by_the_mta_is_not_repeated() -> None:
    # What Postfix's local(8) hands a mailbox_command: postmark plus its own trace.
    trace = b"Return-Path: <carol@example.net>\nX-Original-To: alice\nDelivered-To: alice\n"
    data = b"From carol@example.net Thu Nov 26 06:00:00 2026\n" + trace + MESSAGE
    code, _, store = lda(data, sender=None)
    assert code == EX_OK
    assert stored(store, "alice") == [trace + MESSAGE]


def test_maildir_and_passwd_file_in_a_subprocess(tmp_path: Path) -> None:
    pytest.importorskip("popbox.auth.passwdfile")
    (tmp_path / "passwd").write_text(
        "alice:{PLAIN}secret::::::\n"
        "carol:{PLAIN}secret::::::userdb_quota_rule=*:messages=0\n"
    )
    (tmp_path / "passwd").chmod(0o600)
    config = tmp_path / "popbox.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')

    def deliver(recipient: str, *sender: str) -> subprocess.CompletedProcess[bytes]:
        # `popbox deliver` as an MTA runs it: the composition root builds the store,
        # the user database and the Deliverer from the config file.
        command = [sys.executable, "-m", "popbox", "deliver", "--config", str(config)]
        if sender:
            command += ["--from", *sender]
        return subprocess.run(
            [*command, recipient],
            input=MESSAGE,
            capture_output=True,
            timeout=60,
        )

    assert deliver("alice", "carol@example.net").returncode == EX_OK
    assert deliver("Alice+tag@example.test", "").returncode == EX_OK
    missing = deliver("nobody", "carol@example.net")
    assert missing.returncode == EX_NOUSER
    assert missing.stderr.startswith(b"popbox deliver: 5.1.1")
    # The detail is a folder (mailbox.folder_delivery = "create"): Maildir++'s ".tag".
    maildir = tmp_path / "mail" / "alice"
    files = [*(maildir / "new").iterdir(), *(maildir / ".tag" / "new").iterdir()]
    assert len(files) == 2
    contents = [path.read_bytes() for path in files]
    # Stored with CRLF line ends (storage.save_crlf defaults to true), so RETR can
    # send the files as they are.
    assert contents == [
        (b"Return-Path: <carol@example.net>\nDelivered-To: alice\n" + MESSAGE).replace(
            b"\n", b"\r\n"
        ),
        (b"Return-Path: <>\nDelivered-To: Alice+tag@example.test\n" + MESSAGE).replace(
            b"\n", b"\r\n"
        ),
    ]
    # Maildir names carry the sizes, so POP3 LIST never opens the files; stored CRLF,
    # the stored size is the wire size.
    for path in files:
        stored, virtual = size_fields(path.name)
        assert stored == virtual == path.stat().st_size


def test_a_store_that_cannot_be_set_up_makes_the_mta_retry_or_bounce() -> None:
    # Built by the composition root before run_lda; the same exit statuses apply.
    err = io.StringIO()
    assert report_setup_failure(OSError(13, "Permission denied"), stderr=err) == EX_TEMPFAIL
    assert err.getvalue().startswith("popbox deliver: 4.3.0 ")
    assert report_setup_failure(PermanentStoreError("read-only"), stderr=io.StringIO()) == (
        EX_CANTCREAT
    )
