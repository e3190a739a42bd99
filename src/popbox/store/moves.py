"""Which users were moved into a store: the durable per-user mark ``popbox migrate`` sets
in the target of a move, and that store.routed reads to serve each user from one side.

A user has no mark (not moved: the store the move comes from serves them), "moving"
(a move runs or was killed: the source is still complete and authoritative, but
nobody is served until the move resumes or gives up) or "moved" (the target holds the
whole mailbox and serves it; the source may be gone). Only "moving" -> "moved" and
"moving" -> none (a move that gave up) happen; "moved" is final.

The Maildir side keeps the mark in a small file in the user's Maildir
(``popbox.moved``, replaced whole and durably); the PostgreSQL side in a table of its
own, ``popbox_moves``, with its own versioned schema ("moves"), so the mail store's
tables are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from popbox.errors import StoreError
from popbox.fileio import fsync_dir, replace_file
from popbox.store.maildir_errors import os_errors

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from popbox.pgsql import PoolSettings
    from popbox.store.maildir import MaildirStore

__all__ = [
    "MARK_NAME",
    "MOVES_SCHEMA",
    "MaildirMoveMarks",
    "MoveMarks",
    "MoveState",
    "PostgresMoveMarks",
]

# The mark's file in a user's Maildir (INBOX), beside popbox's index.
MARK_NAME: Final = "popbox.moved"
# Written beside it and renamed over it, so a crash leaves the old mark or the new.
MARK_TMP_NAME: Final = "popbox.moved.tmp"


class MoveState(enum.Enum):
    """Where a user's move into this store stands."""

    NONE = "none"
    MOVING = "moving"
    MOVED = "moved"


class MoveMarks(Protocol):
    """The marks of one store (the target of a move)."""

    async def state(self, user: str) -> MoveState: ...

    async def set(self, user: str, state: MoveState) -> None:
        """Record ``state`` durably (NONE: remove the mark)."""
        ...

    async def close(self) -> None: ...


class MaildirMoveMarks:
    """Marks kept as ``popbox.moved`` in each user's Maildir."""

    def __init__(self, store: MaildirStore) -> None:
        self._store = store

    def _path(self, user: str) -> Path:
        return self._store.maildir(user) / MARK_NAME

    async def state(self, user: str) -> MoveState:
        path = self._path(user)
        with os_errors(f"read the move mark of {user}"):
            try:
                text = path.read_text("ascii").strip()
            except FileNotFoundError:
                return MoveState.NONE
        try:
            return MoveState(text)
        except ValueError:
            # Half a mark cannot be: it is replaced whole. Anything else is not ours
            # to guess at; serving nobody is the safe reading.
            return MoveState.MOVING

    async def set(self, user: str, state: MoveState) -> None:
        path = self._path(user)
        with os_errors(f"mark {user} {state.value}"):
            if state is MoveState.NONE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    fsync_dir(path.parent)
                return
            self._store.mailboxes.ensure_maildir(path.parent)
            replace_file(path.parent, MARK_NAME, MARK_TMP_NAME, (f"{state.value}\n".encode(),))

    async def close(self) -> None:
        pass


# The table of marks; a user's row goes with the move that gave up.
MOVES_SCHEMA_STEPS: Final = (
    """
    CREATE TABLE popbox_moves (
        username text PRIMARY KEY,
        state text NOT NULL CHECK (state IN ('moving', 'moved')),
        changed timestamptz NOT NULL DEFAULT now()
    )
    """,
)


# The schema's name in popbox_schema (pgsql.ensure_schema).
MOVES_SCHEMA: Final = "moves"


class PostgresMoveMarks:
    """Marks kept in the ``popbox_moves`` table of the database ``settings`` names.

    The pool and the table are made at first use, so a store is built without
    waiting for the database (as the other PostgreSQL backends are, popbox.pgsql).
    """

    def __init__(self, settings: PoolSettings) -> None:
        self._settings = settings
        self._pool: AsyncConnectionPool | None = None
        self._opening = asyncio.Lock()

    async def _ready(self) -> AsyncConnectionPool:
        from popbox.pgsql import Schema, ensure_schema, open_pool

        async with self._opening:
            if self._pool is None:
                pool = await open_pool(self._settings, name="popbox-moves")
                try:
                    schema = Schema(MOVES_SCHEMA, MOVES_SCHEMA_STEPS)
                    await ensure_schema(pool, schema, error=StoreError)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool

    async def state(self, user: str) -> MoveState:
        from popbox.pgsql import transaction

        pool = await self._ready()
        async with transaction(pool, StoreError, f"read the move mark of {user}") as conn:
            cursor = await conn.execute(
                "SELECT state FROM popbox_moves WHERE username = %s", (user,)
            )
            row = await cursor.fetchone()
        return MoveState.NONE if row is None else MoveState(row[0])

    async def set(self, user: str, state: MoveState) -> None:
        from popbox.pgsql import transaction

        pool = await self._ready()
        async with transaction(pool, StoreError, f"mark {user} {state.value}") as conn:
            if state is MoveState.NONE:
                await conn.execute("DELETE FROM popbox_moves WHERE username = %s", (user,))
                return
            await conn.execute(
                "INSERT INTO popbox_moves (username, state) VALUES (%s, %s) "
                "ON CONFLICT (username) DO UPDATE SET state = EXCLUDED.state, changed = now()",
                (user, state.value),
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
