"""Delivery into folders: ``alice+invoices@`` and ``popbox deliver -m``, with INBOX for
anything doubtful (never a bounce), and the attacks a sender could try through a
detail. Against MemoryStore, the reference of the folder-aware store contract."""

from __future__ import annotations

import asyncio
import io
import smtplib
from typing import Any

import pytest

from popbox.config import Config, LmtpSettings, MailboxSettings
from popbox.delivery.deliverer import Deliverer
from popbox.delivery.folders import MAX_DELIVERY_FOLDERS
from popbox.delivery.lda import EX_OK, run_lda
from popbox.errors import StoreError, TemporaryDeliveryError
from popbox.store.memory import MemoryStore
from support.lmtp import StartLmtp, users
from support.maildrop import stored_messages

MESSAGE = b"Subject: filed\r\n\r\nbody\r\n"


def config(**mailbox: Any) -> Config:
    lmtp = LmtpSettings(listen=["127.0.0.1:0"], domains=["example.test"])
    return Config(lmtp=lmtp, mailbox=MailboxSettings(**mailbox))


async def deliver(
    address: str, store: MemoryStore | None = None, *, folder: str | None = None, **mailbox: Any
) -> tuple[str, MemoryStore]:
    """Deliver MESSAGE to ``address``; the folder it landed in, and the store."""
    store = store or MemoryStore()
    deliverer = Deliverer(config(**mailbox), store, users("alice"))
    delivered = await deliverer.deliver(address, "s@example.net", MESSAGE, folder=folder)
    assert (await stored_messages(store, "alice", delivered.folder))[-1].endswith(MESSAGE)
    return delivered.folder, store


async def test_a_detail_is_a_folder_made_on_first_delivery() -> None:
    folder, store = await deliver("alice+invoices@example.test")
    assert folder == "invoices"
    assert await store.folders("alice") == ["INBOX", "invoices"]
    assert (await deliver("alice+invoices@example.test", store))[0] == "invoices"
    assert len(await stored_messages(store, "alice", "invoices")) == 2


async def test_existing_mode_files_only_into_folders_the_user_has() -> None:
    assert (await deliver("alice+invoices@example.test", folder_delivery="existing"))[0] == "INBOX"
    store = MemoryStore()
    await store.deliver("alice", b"x\r\n", folder="invoices")
    folder, _ = await deliver("alice+invoices@example.test", store, folder_delivery="existing")
    assert folder == "invoices"


async def test_inbox_mode_ignores_the_detail() -> None:
    store = MemoryStore()
    await store.deliver("alice", b"x\r\n", folder="invoices")
    folder, _ = await deliver("alice+invoices@example.test", store, folder_delivery="inbox")
    assert folder == "INBOX"


async def test_a_detail_that_differs_only_in_case_finds_the_existing_folder() -> None:
    # LMTP lowercases the local part: "alice+Invoices@" arrives as "alice+invoices".
    store = MemoryStore()
    await store.deliver("alice", b"x\r\n", folder="Invoices")
    assert (await deliver("alice+Invoices@example.test", store))[0] == "Invoices"
    assert await store.folders("alice") == ["INBOX", "Invoices"]


@pytest.mark.parametrize(
    "address",
    [
        pytest.param('"alice+../../etc"@example.test', id="path-traversal-in-detail"),
        pytest.param('"alice+a/b"@example.test', id="slash-in-detail"),
        pytest.param("alice+.hidden@example.test", id="hidden-folder"),
        pytest.param("alice+a..b@example.test", id="empty-hierarchy-level"),
        pytest.param('"alice+new\\ folder"@example.test', id="space-in-detail"),
        pytest.param("alice+" + "x" * 101 + "@example.test", id="overlong-folder"),
        pytest.param("alice+@example.test", id="empty-detail"),
        pytest.param("alice+inbox@example.test", id="inbox-in-any-case"),
        pytest.param("alice+Trash@example.test", id="trash-deletes-mail"),
        pytest.param("alice+trash@example.test", id="trash-in-lower-case"),
        pytest.param("alice+ARCHIVE@example.test", id="archive-is-not-for-new-mail"),
    ],
)
async def test_a_detail_that_may_not_be_a_folder_goes_to_inbox_never_bounces(
    address: str,
) -> None:
    folder, store = await deliver(address)
    assert folder == "INBOX"
    assert await store.folders("alice") == ["INBOX"]


async def test_a_sender_cannot_make_more_than_so_many_folders() -> None:
    store = MemoryStore()
    for number in range(MAX_DELIVERY_FOLDERS - 1):
        await store.deliver("alice", b"x\r\n", folder=f"f{number}")
    assert len(await store.folders("alice")) == MAX_DELIVERY_FOLDERS
    assert (await deliver("alice+one-more@example.test", store))[0] == "INBOX"
    # A folder the user has still gets its mail.
    assert (await deliver("alice+f7@example.test", store))[0] == "f7"
    assert len(await store.folders("alice")) == MAX_DELIVERY_FOLDERS


async def test_the_folder_option_wins_over_the_detail_under_the_same_rules() -> None:
    assert (await deliver("alice+invoices@example.test", folder="lists"))[0] == "lists"
    assert (await deliver("alice@example.test", folder="tRaSh"))[0] == "INBOX"
    assert (await deliver("alice@example.test", folder="../x"))[0] == "INBOX"
    assert (await deliver("alice@example.test", folder="lists", folder_delivery="inbox"))[
        0
    ] == "INBOX"


async def test_a_store_that_cannot_list_folders_makes_the_mta_retry() -> None:
    class NoFolders(MemoryStore):
        async def folders(self, user: str) -> list[str]:
            raise StoreError("index unreadable")

    deliverer = Deliverer(config(), NoFolders(), users("alice"))
    with pytest.raises(TemporaryDeliveryError):
        await deliverer.deliver("alice+invoices@example.test", "s", MESSAGE)
    # Mail that asks for no folder needs no listing.
    assert (await deliverer.deliver("alice@example.test", "s", MESSAGE)).folder == "INBOX"


def test_popbox_deliver_folder_option() -> None:
    store = MemoryStore()
    deliverer = Deliverer(config(), store, users("alice"))
    err = io.StringIO()
    source = io.BytesIO(MESSAGE)
    code = asyncio.run(run_lda(deliverer, "alice", "s", source, folder="lists", stderr=err))
    assert (code, err.getvalue()) == (EX_OK, "")
    code = asyncio.run(
        run_lda(deliverer, "alice+work", None, io.BytesIO(MESSAGE), stderr=err)
    )
    assert code == EX_OK
    assert asyncio.run(store.folders("alice")) == ["INBOX", "lists", "work"]


def test_lmtp_to_a_detail_lands_in_that_folder(start_lmtp: StartLmtp) -> None:
    server = start_lmtp(config=config())
    for address in ("alice+invoices@example.test", "alice+Trash@example.test"):
        with smtplib.LMTP(server.host, server.port, timeout=10) as client:
            client.ehlo("mta.example.net")
            assert client.sendmail("s@example.net", [address], MESSAGE) == {}
    assert server.run(server.store.folders("alice")) == ["INBOX", "invoices"]
    (filed,) = server.messages("alice", "invoices")
    assert filed.startswith(b"Return-Path: <s@example.net>\r\nDelivered-To: alice+invoices@")
    (kept,) = server.messages("alice")
    assert b"Delivered-To: alice+Trash@example.test\r\n" in kept
