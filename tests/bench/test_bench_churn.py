"""The churn benchmark's mail path: what goes into each server's own LMTP comes out of
its POP3 side, once, for popbox and both of Dovecot's shapes (bench/servers.py).

A bench that delivered into a place the POP3 side does not read, or counted a
delivery twice, would report a figure for work that was never done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psutil", reason="bench extra not installed (pip install -e '.[bench]')")

from bench import dataset as ds
from bench import loadgen, mailgen, servers

pytestmark = pytest.mark.interop

LMTP_EXECUTABLE = Path("/usr/lib/dovecot/lmtp")
SIZES = ds.Sizes(login_users=1, login_messages=1, retr_users=1, retr_messages=1,
                 churn_users=2, churn_messages=2, idle_users=1, bigbox_messages=2,
                 collector_messages=1)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the bench's Dovecot must start as root (it switches users)"
    if not Path(servers.DOVECOT).exists() or not LMTP_EXECUTABLE.exists():
        return "dovecot-core, dovecot-pop3d and dovecot-lmtpd are not installed"
    return None


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="popbox-bench-test-"))
    root.chmod(0o711)  # Dovecot's login and auth processes pass through it
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["popbox", *servers.DOVECOT_MODES])
def server(request: pytest.FixtureRequest, work: Path) -> Iterator[servers.Server]:
    dataset = ds.build(work, SIZES, log=False)
    name: str = request.param
    if name == "popbox":
        ds.install(dataset, work / name, owner=None)
        started = servers.start_popbox(work / name, dataset.cert, dataset.key, workers=2)
    else:
        ds.install(dataset, work / name, owner=servers.mail_ids())
        started = servers.start_dovecot(work / name, name, dataset.cert, dataset.key,
                                        sessions=10)
    try:
        yield started
    finally:
        started.stop()


async def test_lmtp_delivery_is_retrieved_over_pop3(server: servers.Server) -> None:
    user = "churn00"
    [before] = (await loadgen.mailbox_counts(server, [user], ds.PASSWORD)).values()
    deliverer = loadgen.Deliverer(server)
    sent = [
        f"Subject: lmtp {n}\nMessage-ID: <lmtp{n}@bench.example>\n\nbody {n}\n"
        ".a line that starts with a dot\n".encode()
        for n in range(3)
    ]
    try:
        for data in sent:
            await deliverer.deliver(user, data)
    finally:
        await deliverer.close()

    client = await loadgen.Pop3Client.connect(server, "plain", None)
    try:
        await client.login(user, ds.PASSWORD)
        count = int((await client.command("STAT")).split()[1])
        assert count == before + 3
        bodies = [await client.multi(f"RETR {n}") for n in range(1, count + 1)]
    finally:
        await client.quit()
    new = [body for body in bodies if b"Message-ID: <lmtp" in body]
    assert len(new) == 3
    for n, body in enumerate(sorted(new, key=lambda b: b[b.index(b"<lmtp"):])):
        # Each server adds its own trace headers; the message itself arrives whole,
        # with the dot line unstuffed again.
        assert body.endswith(sent[n].replace(b"\n", b"\r\n"))


async def test_churn_accounts_for_every_delivery(server: servers.Server) -> None:
    result = await loadgen.churn(
        server, ["churn00", "churn01"], ds.PASSWORD, duration=1.5, deliveries_per_second=20,
        message_source=lambda n: mailgen.message(ds.SEED, "churn-test", n, mailgen.SMALL),
    )
    # churn() itself raises if a delivered message was lost or seen twice.
    assert result.extra["delivered"] >= 20
    assert result.extra["sessions"] > 0
    assert result.extra["failed"] == 0


def test_churn_accounting_refuses_a_lost_or_duplicated_message() -> None:
    before, delivered = Counter(a=2), Counter(a=3)
    loadgen.check_churn_accounting(before, delivered, Counter(a=4), Counter(a=1), failed=0)
    with pytest.raises(loadgen.Pop3Error, match="retrieved 3"):
        loadgen.check_churn_accounting(before, delivered, Counter(a=3), Counter(a=1), failed=0)
    with pytest.raises(loadgen.Pop3Error, match="retrieved 5"):
        loadgen.check_churn_accounting(before, delivered, Counter(a=5), Counter(a=1), failed=0)
    # A failed poll may have deleted uncounted messages: short is allowed, over is not.
    loadgen.check_churn_accounting(before, delivered, Counter(a=3), Counter(a=1), failed=1)
    with pytest.raises(loadgen.Pop3Error):
        loadgen.check_churn_accounting(before, delivered, Counter(a=5), Counter(a=1), failed=1)
