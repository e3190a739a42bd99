"""The PostgreSQL mail store's tables, as a versioned ``pgsql.Schema``.

::

    mail_folders     one row per folder of a user: its numbering (uidvalidity,
                     next_uid: store.image), its device state (FolderState.to_bytes,
                     store.devices), the counters quotas read (messages, octets),
                     and ``complete`` (false while a folder image is being restored
                     into it: not served until the restore's last step)
    mail_messages    one row per message: its folder and UID, wire size, arrival
                     time and kept UIDL; ``id`` names its body
    mail_chunks      the body of a message in pieces of CHUNK_SIZE, by ``seq``: read
                     a few at a time, so a 200 MB message never sits in memory
    mail_leases      the maildrop leases (store.postgresql_lease): who holds which
                     folder until when, in the database's clock
    mail_deliveries  deliveries recognised for a while by their delivery id, so an
                     MTA's retry after a lost reply stores nothing twice

A message's UID is given by its folder's ``next_uid`` (only growing) in the
transaction that stores it; a move to Trash or Archive gives it the target's next
UID and keeps its body where it is. The counters change in the same transactions as
the rows they count, so ``usage`` reads a few rows whatever the mailbox holds.
Bodies reference their message with a deferred foreign key: a large body is written
before its message row, so the folder row is locked (for its next UID) only for the
last statements of a delivery, never while the body streams in.
"""

from __future__ import annotations

from typing import Final

from popbox.pgsql import Schema

__all__ = ["CHUNK_SIZE", "SCHEMA"]

# Bodies are stored and read in pieces of this size: a read of a few of them is a
# bounded amount of memory, and each piece stays well under TOAST's 1 GB limit.
CHUNK_SIZE: Final = 256 * 1024

_V1: Final = """
CREATE SEQUENCE mail_uidvalidity;
-- UIDVALIDITYs start at the time the tables were made (as Maildir indexes take theirs)
-- and never repeat, so a folder removed and made again never serves an old UIDL.
SELECT setval('mail_uidvalidity', extract(epoch FROM clock_timestamp())::bigint);

CREATE TABLE mail_folders (
    id bigserial PRIMARY KEY,
    username text NOT NULL,
    name text NOT NULL,
    uidvalidity bigint NOT NULL DEFAULT nextval('mail_uidvalidity'),
    next_uid bigint NOT NULL DEFAULT 1,
    state bytea NOT NULL DEFAULT ''::bytea,
    complete boolean NOT NULL DEFAULT true,
    messages bigint NOT NULL DEFAULT 0,
    octets bigint NOT NULL DEFAULT 0,
    UNIQUE (username, name)
);

CREATE TABLE mail_messages (
    id bigserial PRIMARY KEY,
    folder_id bigint NOT NULL REFERENCES mail_folders (id) ON DELETE CASCADE,
    uid bigint NOT NULL,
    size bigint NOT NULL,
    stored bigint NOT NULL,
    arrived double precision NOT NULL,
    kept_uidl text,
    UNIQUE (folder_id, uid) INCLUDE (size, arrived)
);
CREATE UNIQUE INDEX mail_messages_kept_uidl ON mail_messages (folder_id, kept_uidl)
    WHERE kept_uidl IS NOT NULL;

CREATE TABLE mail_chunks (
    message_id bigint NOT NULL
        REFERENCES mail_messages (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);

CREATE TABLE mail_leases (
    username text NOT NULL,
    folder text NOT NULL,
    node text NOT NULL,
    session text NOT NULL,
    expires timestamptz NOT NULL,
    PRIMARY KEY (username, folder)
);

CREATE TABLE mail_deliveries (
    username text NOT NULL,
    delivery_id text NOT NULL,
    key text NOT NULL,
    delivered double precision NOT NULL,
    PRIMARY KEY (username, delivery_id)
);
"""

SCHEMA: Final = Schema("mail store", (_V1,))
