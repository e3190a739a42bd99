"""The per-folder state the mailbox rules run on: devices, deletions, retrievals, hidden mail.

One ``FolderState`` per folder, keyed by the store's message ids (integers that only
grow and are never reused: the Maildir index's UIDs). It is pure data and rules, no
I/O: a store loads it under the folder's lock, asks it what a device sees and what
may go, executes the removals its own way, and saves it (``to_bytes``) crash-safely.

Every set of message ids is a ``UidSet``: sorted, disjoint ranges. A device that
deleted 100,000 messages in order costs one range, not 100,000 integers, and ids of
messages that are gone may stay inside a range (they never come back), which keeps
the ranges few. Retrieval times are two parallel arrays. So a folder of 100,000
messages read by 20 devices stays within a few megabytes at worst.

The rules (docs/mailbox-model.md):

* A device sees every message it has not deleted and that is not hidden.
* A device *holds* mail while its last normal-mode login is within ``active_days``.
  A message may go when every holding device has deleted it; with no holding device
  at all nothing goes by this rule (nobody has said anything).
* With a retention (EXPIRE) of N days a message goes N days after its first
  retrieval by any device.
* A hidden message (disposition KEEP) is out of every view and goes at its time.
"""

from __future__ import annotations

import bisect
import itertools
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from popbox.errors import InvalidMailboxName, LoginTooSoon, PermanentStoreError, TooManyDevices
from popbox.store.mailbox import (
    ARCHIVE,
    DAY,
    TRASH,
    Disposition,
    MailboxPolicy,
    check_device_name,
)

__all__ = [
    "LAST_LOGIN_RESOLUTION",
    "MAX_DEVICES",
    "STATE_FORMAT",
    "DeviceRecord",
    "FolderState",
    "RemovalPlan",
    "StateFormatError",
    "UidSet",
    "plan_commit",
    "plan_removal",
]

# The state file's format; a reader refuses a newer one rather than guess.
STATE_FORMAT: Final = 1
# Devices per folder. Dovecot has no such thing; 20 is a big family or a team, and a
# bound keeps a client that invents a device name per login from growing the state.
# When full, the device seen least recently that holds nothing makes room.
MAX_DEVICES: Final = 100
# A login is noted (and the state written) at most this often per device: activity
# is counted in days, and a client that polls every minute must not rewrite the
# state at every login. LOGIN-DELAY, where set, is noted at every login.
LAST_LOGIN_RESOLUTION: Final = 3600
_IDS: Final = "Q"


class StateFormatError(PermanentStoreError):
    """The state cannot be read: damaged, or written by a newer popbox."""


class UidSet:
    """A set of message ids as sorted, disjoint, inclusive ranges ``[lo0, hi0, lo1, ...]``."""

    __slots__ = ("_bounds",)

    def __init__(self, bounds: Iterable[int] = ()) -> None:
        self._bounds = array(_IDS, bounds)
        if len(self._bounds) % 2:
            raise ValueError("a UidSet needs pairs of bounds")

    @classmethod
    def of(cls, ids: Iterable[int]) -> UidSet:
        """The set of ``ids`` (any order, repeats allowed)."""
        bounds: list[int] = []
        for uid in sorted(set(ids)):
            if bounds and bounds[-1] + 1 == uid:
                bounds[-1] = uid
            else:
                bounds += (uid, uid)
        return cls(bounds)

    def ranges(self) -> Iterator[tuple[int, int]]:
        bounds = self._bounds
        return zip(bounds[::2], bounds[1::2], strict=True)

    def bounds(self) -> list[int]:
        return self._bounds.tolist()

    def __bool__(self) -> bool:
        return bool(self._bounds)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UidSet) and self._bounds == other._bounds

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"UidSet({list(self.ranges())})"

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        at = bisect.bisect_right(self._bounds, uid)
        # Odd: inside a range; even: between ranges, or equal to a range's upper
        # bound (bisect_right passed it), which is inside too.
        return at % 2 == 1 or (at > 0 and self._bounds[at - 1] == uid)

    def union(self, other: UidSet) -> UidSet:
        merged: list[int] = []
        for lo, hi in sorted(itertools.chain(self.ranges(), other.ranges())):
            if merged and lo <= merged[-1] + 1:
                merged[-1] = max(merged[-1], hi)
            else:
                merged += (lo, hi)
        return UidSet(merged)

    def intersection(self, other: UidSet) -> UidSet:
        out: list[int] = []
        mine, theirs = list(self.ranges()), list(other.ranges())
        i = j = 0
        while i < len(mine) and j < len(theirs):
            lo = max(mine[i][0], theirs[j][0])
            hi = min(mine[i][1], theirs[j][1])
            if lo <= hi:
                out += (lo, hi)
            if mine[i][1] < theirs[j][1]:
                i += 1
            else:
                j += 1
        return UidSet(out)

    def slices_in(self, ids: Sequence[int]) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` position slices of the sorted ``ids`` that lie in this set."""
        for lo, hi in self.ranges():
            start = bisect.bisect_left(ids, lo)
            stop = bisect.bisect_right(ids, hi, start)
            if start < stop:
                yield start, stop

    def members_in(self, ids: Sequence[int]) -> list[int]:
        """The sorted ``ids`` that lie in this set."""
        return [ids[i] for start, stop in self.slices_in(ids) for i in range(start, stop)]

    def count_in(self, ids: Sequence[int]) -> int:
        return sum(stop - start for start, stop in self.slices_in(ids))

    def compacted(self, ids: Sequence[int]) -> UidSet:
        """The same set as far as the sorted ``ids`` (the messages that exist) can tell,
        in the fewest ranges: ranges that hold no existing id go, and ranges with no
        existing id between them merge. Ids that do not exist never come back, so
        whether a range covers them changes nothing."""
        out: list[int] = []
        last_stop = -1
        for start, stop in self.slices_in(ids):
            lo, hi = ids[start], ids[stop - 1]
            if out and last_stop == start:
                out[-1] = hi  # nothing that exists lies between: one range
            else:
                out += (lo, hi)
            last_stop = stop
        return UidSet(out)


@dataclass(slots=True)
class DeviceRecord:
    """One device of a folder: when it logged in, and what it deleted."""

    last_login: int = 0
    """Its last login in any mode, seconds since the epoch."""
    last_hold: int = 0
    """Its last normal-mode login (0: only ever recent mode): it holds mail while
    this is within the policy's ``active_days``."""
    deleted: UidSet = field(default_factory=UidSet)


class FolderState:
    """Devices, their deletions, first retrievals and hidden messages of one folder.

    ``uidvalidity`` is what the ids belong to (the Maildir index's UIDVALIDITY); a
    store whose ids started over must call ``rebase``. ``revision`` grows with every
    change, so views computed from the state can be cached against it.
    """

    def __init__(self, uidvalidity: int = 0) -> None:
        self.uidvalidity = uidvalidity
        self.devices: dict[str, DeviceRecord] = {}
        self._retrieved_ids = array(_IDS)
        self._retrieved_at = array(_IDS)
        # (remove_at, ids) batches, as the commits and sweeps that hid them made them.
        self._hidden: list[tuple[int, UidSet]] = []
        self.revision = 0

    # -- logins --------------------------------------------------------------------

    def log_in(self, device: str, now: float, *, holds: bool, policy: MailboxPolicy) -> bool:
        """Note a login of ``device``; True if the state changed and must be saved.

        Raises LoginTooSoon inside the device's LOGIN-DELAY and TooManyDevices when a
        new device finds the folder full of devices that still hold mail.
        """
        check_device_name(device)
        stamp = int(now)
        record = self.devices.get(device)
        if record is None:
            self._make_room(stamp, policy)
            record = self.devices[device] = DeviceRecord()
        elif policy.login_delay and 0 <= stamp - record.last_login < policy.login_delay:
            wait = policy.login_delay - (stamp - record.last_login)
            raise LoginTooSoon(
                f"device {device} logged in {stamp - record.last_login} s ago; "
                f"the login delay is {policy.login_delay} s",
                retry_after=wait,
            )
        changed = (
            record.last_login == 0
            or policy.login_delay > 0
            or stamp - record.last_login >= LAST_LOGIN_RESOLUTION
            or (holds and stamp - record.last_hold >= LAST_LOGIN_RESOLUTION)
        )
        if changed:
            record.last_login = max(record.last_login, stamp)
            if holds:
                record.last_hold = max(record.last_hold, stamp)
            self.revision += 1
        return changed

    def _make_room(self, now: int, policy: MailboxPolicy) -> None:
        if len(self.devices) < MAX_DEVICES:
            return
        idle = [name for name in self.devices if not self._holds(name, now, policy)]
        if not idle:
            raise TooManyDevices(f"the folder already has {MAX_DEVICES} active devices")
        oldest = min(idle, key=lambda name: self.devices[name].last_login)
        del self.devices[oldest]

    def forget(self, device: str) -> bool:
        """Drop ``device`` and its hold; False if the folder did not know it."""
        if self.devices.pop(device, None) is None:
            return False
        self.revision += 1
        return True

    def _holds(self, device: str, now: float, policy: MailboxPolicy) -> bool:
        last_hold = self.devices[device].last_hold
        return last_hold > 0 and now - last_hold <= policy.active_days * DAY

    def holding_devices(self, now: float, policy: MailboxPolicy) -> list[str]:
        return [name for name in self.devices if self._holds(name, now, policy)]

    # -- views -----------------------------------------------------------------------

    def hidden(self) -> UidSet:
        """Every hidden message's id."""
        out = UidSet()
        for _, ids in self._hidden:
            out = out.union(ids)
        return out

    def excluded_for(self, device: str) -> UidSet:
        """The ids ``device`` does not see: its own deletions and the hidden messages."""
        record = self.devices.get(device)
        own = record.deleted if record is not None else UidSet()
        return own.union(self.hidden()) if self._hidden else own

    def visible_positions(self, ids: Sequence[int], device: str) -> list[int] | None:
        """Positions in the sorted ``ids`` that ``device`` sees; None when it sees all."""
        excluded = list(self.excluded_for(device).slices_in(ids))
        if not excluded:
            return None
        positions: list[int] = []
        at = 0
        for start, stop in excluded:
            positions.extend(range(at, start))
            at = stop
        positions.extend(range(at, len(ids)))
        return positions

    def pending_and_deleted(self, ids: Sequence[int], device: str) -> tuple[int, int]:
        """How many of ``ids`` the device would see, and how many it has deleted."""
        record = self.devices.get(device)
        deleted = record.deleted.count_in(ids) if record is not None else 0
        return len(ids) - self.excluded_for(device).count_in(ids), deleted

    # -- what sessions did -----------------------------------------------------------

    def record_deletions(self, device: str, ids: Iterable[int]) -> None:
        """``device`` deleted these messages (its QUIT committed them)."""
        added = UidSet.of(ids)
        if not added:
            return
        record = self.devices.setdefault(device, DeviceRecord())
        record.deleted = record.deleted.union(added)
        self.revision += 1

    def record_retrievals(self, ids: Iterable[int], now: float) -> None:
        """Note ``now`` as the first retrieval of those of ``ids`` that have none yet."""
        new = sorted({uid for uid in ids if not self._was_retrieved(uid)})
        if not new:
            return
        stamp = int(now)
        pairs = sorted(
            itertools.chain(
                zip(self._retrieved_ids, self._retrieved_at, strict=True),
                ((uid, stamp) for uid in new),
            )
        )
        self._retrieved_ids = array(_IDS, (uid for uid, _ in pairs))
        self._retrieved_at = array(_IDS, (at for _, at in pairs))
        self.revision += 1

    def _was_retrieved(self, uid: int) -> bool:
        at = bisect.bisect_left(self._retrieved_ids, uid)
        return at < len(self._retrieved_ids) and self._retrieved_ids[at] == uid

    def first_retrieval(self, uid: int) -> int | None:
        at = bisect.bisect_left(self._retrieved_ids, uid)
        if at < len(self._retrieved_ids) and self._retrieved_ids[at] == uid:
            return self._retrieved_at[at]
        return None

    # -- what may go -----------------------------------------------------------------

    def deleted_by_all(self, ids: Sequence[int], now: float, policy: MailboxPolicy) -> list[int]:
        """The sorted ``ids`` every holding device has deleted (none if no device holds),
        hidden ones left out (they already wait for their time)."""
        holders = self.holding_devices(now, policy)
        if not holders:
            return []
        common = self.devices[holders[0]].deleted
        for name in holders[1:]:
            common = common.intersection(self.devices[name].deleted)
            if not common:
                return []
        hidden = self.hidden()
        return [uid for uid in common.members_in(ids) if uid not in hidden]

    def expired(self, ids: Sequence[int], now: float, policy: MailboxPolicy) -> list[int]:
        """The sorted ``ids`` whose retention (counted from first retrieval) is up."""
        if policy.retention_days is None:
            return []
        cutoff = now - policy.retention_days * DAY
        existing = set(ids)
        hidden = self.hidden()
        return sorted(
            uid
            for uid, at in zip(self._retrieved_ids, self._retrieved_at, strict=True)
            if at <= cutoff and uid in existing and uid not in hidden
        )

    def hide(self, ids: Iterable[int], remove_at: float) -> None:
        """Hide these messages from every device until ``remove_at`` (disposition KEEP)."""
        batch = UidSet.of(ids)
        if batch:
            self._hidden.append((int(remove_at), batch))
            self.revision += 1

    def hidden_due(self, ids: Sequence[int], now: float) -> list[int]:
        """The sorted ``ids`` that are hidden and whose time has come."""
        due = UidSet()
        for remove_at, batch in self._hidden:
            if remove_at <= now:
                due = due.union(batch)
        return due.members_in(ids)

    # -- upkeep ----------------------------------------------------------------------

    def prune(self, ids: Sequence[int]) -> None:
        """Forget what concerns messages no longer among the sorted ``ids``."""
        for record in self.devices.values():
            record.deleted = record.deleted.compacted(ids)
        existing = set(ids)
        keep = [
            (uid, at)
            for uid, at in zip(self._retrieved_ids, self._retrieved_at, strict=True)
            if uid in existing
        ]
        if len(keep) != len(self._retrieved_ids):
            self._retrieved_ids = array(_IDS, (uid for uid, _ in keep))
            self._retrieved_at = array(_IDS, (at for _, at in keep))
        batches = [(at, batch.compacted(ids)) for at, batch in self._hidden]
        self._hidden = [(at, batch) for at, batch in batches if batch]
        self.revision += 1

    def rebase(self, uidvalidity: int) -> None:
        """The store's ids started over (a rebuilt index): every per-message fact is
        void. The devices stay known (they keep holding), their deletions do not."""
        self.uidvalidity = uidvalidity
        for record in self.devices.values():
            record.deleted = UidSet()
        self._retrieved_ids = array(_IDS)
        self._retrieved_at = array(_IDS)
        self._hidden = []
        self.revision += 1

    # -- the stored form -------------------------------------------------------------

    def is_empty(self) -> bool:
        return not (self.devices or self._retrieved_ids or self._hidden)

    def to_bytes(self) -> bytes:
        """The state as one versioned JSON document (stable: equal states, equal bytes)."""
        document = {
            "format": STATE_FORMAT,
            "uidvalidity": self.uidvalidity,
            "devices": {
                name: {
                    "last_login": record.last_login,
                    "last_hold": record.last_hold,
                    "deleted": record.deleted.bounds(),
                }
                for name, record in sorted(self.devices.items())
            },
            "retrieved": [self._retrieved_ids.tolist(), self._retrieved_at.tolist()],
            "hidden": [[at, batch.bounds()] for at, batch in self._hidden],
        }
        return json.dumps(document, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> FolderState:
        """Read ``to_bytes``'s form; StateFormatError if damaged or newer."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise TypeError("not an object")
            version = document["format"]
            if not isinstance(version, int) or version > STATE_FORMAT:
                raise StateFormatError(
                    f"device state format {version!r} is newer than this popbox's "
                    f"({STATE_FORMAT}); upgrade popbox"
                )
            return cls._from_document(document)
        except StateFormatError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, InvalidMailboxName) as exc:
            raise StateFormatError(f"device state is damaged: {exc}") from exc

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> FolderState:
        state = cls(int(document["uidvalidity"]))
        for name, item in document["devices"].items():
            state.devices[check_device_name(str(name))] = DeviceRecord(
                last_login=int(item["last_login"]),
                last_hold=int(item["last_hold"]),
                deleted=_checked_set(item["deleted"]),
            )
        ids, times = document["retrieved"]
        state._retrieved_ids = array(_IDS, (int(uid) for uid in ids))
        state._retrieved_at = array(_IDS, (int(at) for at in times))
        if len(state._retrieved_ids) != len(state._retrieved_at) or list(
            state._retrieved_ids
        ) != sorted(set(state._retrieved_ids)):
            raise ValueError("retrieval times out of order")
        state._hidden = [(int(at), _checked_set(bounds)) for at, bounds in document["hidden"]]
        return state


def _checked_set(bounds: list[Any]) -> UidSet:
    values = [int(value) for value in bounds]
    if len(values) % 2 or any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError("id ranges out of order")
    if any(values[i + 1] <= values[i] for i in range(1, len(values) - 1, 2)):
        raise ValueError("id ranges overlap")
    return UidSet(values)


@dataclass(frozen=True, slots=True)
class RemovalPlan:
    """What a commit or a sweep removes from one folder, by message id (sorted)."""

    delete: list[int] = field(default_factory=list)
    """Ids to delete for good."""
    move: list[int] = field(default_factory=list)
    """Ids to move to ``target``."""
    target: str | None = None
    hidden: int = 0
    """How many messages were newly hidden (recorded in the state, nothing to do)."""

    def __bool__(self) -> bool:
        return bool(self.delete or self.move)


def plan_commit(
    state: FolderState,
    ids: Sequence[int],
    *,
    device: str,
    deleted: Iterable[int],
    retrieved: Iterable[int],
    now: float,
    folder: str,
    policy: MailboxPolicy,
) -> RemovalPlan:
    """Record a QUIT of ``device`` (its deletions, its retrievals) and plan what goes.

    ``ids`` are the folder's existing message ids, sorted. With a retention of 0 days
    (EXPIRE 0) a retrieved message counts as deleted (RFC 2449 section 6.7).
    """
    deleted_ids = set(deleted)
    if policy.retention_days is not None:
        retrieved_ids = list(retrieved)
        state.record_retrievals(retrieved_ids, now)
        if policy.retention_days == 0:
            deleted_ids.update(retrieved_ids)
    state.record_deletions(device, deleted_ids)
    return plan_removal(state, ids, now=now, folder=folder, policy=policy)


def plan_removal(
    state: FolderState,
    ids: Sequence[int],
    *,
    now: float,
    folder: str,
    policy: MailboxPolicy,
    also: Iterable[int] = (),
) -> RemovalPlan:
    """Plan what goes from the folder now: what every holding device deleted, what
    expired, ``also`` (a sweep's Trash past its days), and hidden messages whose time
    is up. KEEP hides the first kinds (in ``state``) instead of removing them."""
    gone = set(state.deleted_by_all(ids, now, policy))
    gone.update(state.expired(ids, now, policy))
    gone.update(also)
    due = state.hidden_due(ids, now)
    disposition = policy.disposition_in(folder)
    if disposition is Disposition.KEEP:
        fresh = sorted(gone.difference(due))
        state.hide(fresh, now + policy.keep_days * DAY)
        return RemovalPlan(delete=due, hidden=len(fresh))
    if disposition is Disposition.DELETE:
        return RemovalPlan(delete=sorted(gone.union(due)))
    target = TRASH if disposition is Disposition.TRASH else ARCHIVE
    return RemovalPlan(delete=due, move=sorted(gone.difference(due)), target=target)
