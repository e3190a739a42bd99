"""Moving a user's mailbox online (popbox.migrate.move) with the server's routing store
(store.routed.MovingStore) in front: what users and the MTA see before, during and
after a move, a move that gives up, and a move killed at every step and run again.

Maildir to Maildir here (two roots), which exercises every step of the order; the
PostgreSQL pairs run the same folder contract in tests/store/test_image_contract.py.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from popbox.errors import MaildropInUse, TemporaryDeliveryError
from popbox.migrate.move import MoveOptions, move_user
from popbox.store.mailbox import INBOX, MailboxView
from popbox.store.maildir import MaildirStore
from popbox.store.moves import MaildirMoveMarks, MoveState
from popbox.store.routed import MovingStore
from support.clock import FakeClock
from support.crash import kill_before_call, run_until_killed
from support.maildrop import read_all

USER = "alice"
FAST = MoveOptions(settle=0, lock_wait=0.5)


def message(n: int) -> bytes:
    return f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()


class Setup:
    def __init__(self, root: Path, clock: FakeClock) -> None:
        self.root = root
        self.source = MaildirStore(root / "old", clock=clock)
        self.target = MaildirStore(root / "new", clock=clock)
        self.marks = MaildirMoveMarks(self.target)
        self.server = MovingStore(self.source, self.target, self.marks)

    async def move(self, options: MoveOptions = FAST, user: str = USER):  # type: ignore[no-untyped-def]
        return await move_user(
            self.source,
            self.target,
            self.marks,
            user,
            source_marks=MaildirMoveMarks(self.source),
            options=options,
        )


@pytest.fixture
def setup(tmp_path: Path, clock: FakeClock) -> Setup:
    return Setup(tmp_path, clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def listing(store: object, user: str = USER, folder: str = INBOX) -> list[tuple]:
    drop = await store.open_maildrop(user, MailboxView(folder))  # type: ignore[attr-defined]
    try:
        return [
            (n + 1, info.uidl, info.size, await read_all(drop, n))
            for n, info in enumerate(drop.messages)
        ]
    finally:
        await drop.release()


async def test_users_are_served_from_the_side_their_move_reached(setup: Setup) -> None:
    for n in range(3):
        await setup.server.deliver(USER, message(n), uidl=f"kept-{n}" if n == 1 else None)
    await setup.server.deliver(USER, message(9), folder="lists")
    before = await listing(setup.server)
    lists = await listing(setup.server, folder="lists")
    assert len(before) == 3
    report = await setup.move()
    assert report.error is None
    assert (report.folders, report.messages, report.copied) == (2, 4, 4)
    assert await setup.marks.state(USER) is MoveState.MOVED
    # The same mailbox through the server, now from the target; the source is gone.
    assert await listing(setup.server) == before
    assert await listing(setup.server, folder="lists") == lists
    assert not setup.source.maildir(USER).exists()
    await setup.server.deliver(USER, message(4))
    assert len(await listing(setup.target)) == 4
    # A second run reports the user and skips it.
    again = await setup.move()
    assert again.already
    assert again.error is None


async def test_while_a_user_moves_logins_get_in_use_and_deliveries_451(setup: Setup) -> None:
    await setup.server.deliver(USER, message(1))
    await setup.marks.set(USER, MoveState.MOVING)
    with pytest.raises(MaildropInUse):
        await setup.server.open_maildrop(USER)
    with pytest.raises(TemporaryDeliveryError):
        await setup.server.deliver(USER, message(2))
    # Other users are served as ever.
    await setup.server.deliver("bob", message(3))
    assert len(await listing(setup.server, "bob")) == 1


async def test_a_move_a_session_blocks_gives_up_and_the_source_serves_again(
    setup: Setup,
) -> None:
    await setup.server.deliver(USER, message(1))
    session = await setup.server.open_maildrop(USER)
    try:
        report = await setup.move(MoveOptions(settle=0, lock_wait=0))
    finally:
        await session.release()
    assert report.error is not None
    assert "locked" in report.error
    assert await setup.marks.state(USER) is MoveState.NONE
    assert len(await listing(setup.server)) == 1
    # Once the session is gone, the move goes through.
    assert (await setup.move()).error is None
    assert len(await listing(setup.server)) == 1


async def test_a_delivery_being_written_is_waited_for(setup: Setup) -> None:
    await setup.server.deliver(USER, message(1))
    tmp = setup.source.maildir(USER) / "tmp" / "1.M1P1.host"
    tmp.write_bytes(b"Subject: half\r\n")  # a delivery on its way into new/

    async def finish() -> None:
        await asyncio.sleep(0.3)
        tmp.rename(setup.source.maildir(USER) / "new" / "1.M1P1.host")

    finishing = asyncio.create_task(finish())
    report = await setup.move(MoveOptions(settle=0, lock_wait=5))
    await finishing
    assert report.error is None
    assert report.messages == 2
    assert len(await listing(setup.server)) == 2


async def test_dry_run_changes_nothing(setup: Setup) -> None:
    await setup.server.deliver(USER, message(1))
    report = await setup.move(MoveOptions(dry_run=True))
    assert (report.folders, report.messages) == (1, 1)
    assert await setup.marks.state(USER) is MoveState.NONE
    assert setup.source.maildir(USER).exists()


async def test_keep_source_leaves_the_old_mailbox(setup: Setup) -> None:
    await setup.server.deliver(USER, message(1))
    report = await setup.move(MoveOptions(settle=0, keep_source=True))
    assert report.error is None
    assert len(await listing(setup.source)) == 1
    assert len(await listing(setup.server)) == 1


_CHILD = """
import asyncio, sys
from pathlib import Path
from popbox.migrate.move import MoveOptions, move_user
from popbox.store.maildir import MaildirStore
from popbox.store.moves import MaildirMoveMarks

async def main():
    root = Path(sys.argv[1])
    source = MaildirStore(root / "old")
    target = MaildirStore(root / "new")
    report = await move_user(
        source, target, MaildirMoveMarks(target), "alice",
        source_marks=MaildirMoveMarks(source), options=MoveOptions(settle=0, lock_wait=0),
    )
    assert report.error is None, report.error

asyncio.run(main())
print(calls)
"""


async def test_a_move_killed_at_any_step_is_served_whole_and_finishes_when_run_again(
    tmp_path: Path, clock: FakeClock
) -> None:
    pristine = tmp_path / "pristine"
    seed = MaildirStore(pristine / "old", clock=clock)
    for n in range(4):
        await seed.deliver(USER, message(n), uidl="kept" if n == 2 else None)
    await seed.deliver(USER, message(7), folder="lists")
    expected = await listing(seed)
    expected_lists = await listing(seed, folder="lists")
    await seed.close()
    code = kill_before_call("link", "rename", "unlink", "fsync", "replace", "write") + _CHILD
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    steps = int(run_until_killed(code, str(work), "-1").strip())
    for kill_at in range(0, steps, max(1, steps // 12)):
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        run_until_killed(code, str(work), str(kill_at))
        setup = Setup(work, clock)
        state = await setup.marks.state(USER)
        if state is MoveState.MOVING:
            with pytest.raises(MaildropInUse):  # never half a mailbox: nobody is served
                await setup.server.open_maildrop(USER)
        else:
            assert await listing(setup.server) == expected, kill_at
        report = await setup.move()
        assert report.error is None, (kill_at, report.error)
        assert await listing(setup.server) == expected, kill_at
        assert await listing(setup.server, folder="lists") == expected_lists, kill_at
        assert not setup.source.maildir(USER).exists(), kill_at


async def test_postgresql_marks_are_durable_and_shared(postgres_dsn: str) -> None:
    from popbox.pgsql import PoolSettings
    from popbox.store.moves import PostgresMoveMarks

    first = PostgresMoveMarks(PoolSettings(postgres_dsn))
    second = PostgresMoveMarks(PoolSettings(postgres_dsn))  # another node
    try:
        assert await first.state(USER) is MoveState.NONE
        await first.set(USER, MoveState.MOVING)
        assert await second.state(USER) is MoveState.MOVING
        await first.set(USER, MoveState.MOVED)
        assert await second.state(USER) is MoveState.MOVED
        await second.set("bob", MoveState.MOVING)
        await second.set("bob", MoveState.NONE)
        assert await first.state("bob") is MoveState.NONE
    finally:
        await first.close()
        await second.close()


def test_moving_from_must_name_the_other_store(tmp_path: Path) -> None:
    from popbox.backends import build_store
    from popbox.config import Config
    from popbox.errors import ConfigError

    with pytest.raises(ValueError, match="moving_from"):
        Config.model_validate({"storage": {"backend": "maildir", "moving_from": "maildir"}})
    with pytest.raises(ValueError, match="postgresql"):
        Config.model_validate({"storage": {"moving_from": "postgresql"}})
    config = Config.model_validate(
        {
            "storage": {"maildir_root": str(tmp_path), "moving_from": "postgresql"},
            "postgresql": {"dsn": "postgresql://nowhere/popbox"},
        }
    )
    try:
        store = build_store(config)
    except ConfigError:
        pytest.skip("no PostgreSQL store in this popbox yet")
    assert isinstance(store, MovingStore)


def test_the_command_names_what_it_needs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from popbox.cli import main

    config = tmp_path / "popbox.toml"
    config.write_text(f'[storage]\nmaildir_root = "{tmp_path}/mail"\n')
    runner = CliRunner()
    usage = runner.invoke(main, ["migrate", "--config", str(config), "maildir-to-postgresql"])
    assert usage.exit_code == 2
    assert "--all" in usage.output
    result = runner.invoke(
        main, ["migrate", "--config", str(config), "maildir-to-postgresql", "alice"]
    )
    assert result.exit_code == 1
    assert "[postgresql]" in result.output
