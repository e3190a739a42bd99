"""The PostgreSQL archive's tables, as a versioned ``pgsql.Schema``.

::

    archive_objects   one row per distinct piece of content (a piece of a message's
                      segment, popbox.archive.segments, at most PIECE_SIZE octets):
                      its SHA-256, its size, a zstd frame of it, and ``refs``, how
                      many stored messages use it
    archive_messages  one row per distinct message: its SHA-256, size, the digests
                      of its pieces in order (32 octets each, concatenated), and
                      ``refs``, how many entries keep it
    archive_entries   one row per message a user keeps: the headers search results
                      show, the source, folder and legal hold, a bounded copy of its
                      text (snippets) and two tsvectors (search)
    archive_origins   where a user's messages were taken from (``known_origins``)

Content is stored once across users and counted, not searched for: ``refs`` change
under the row's lock in the transaction that adds or removes what uses it, so two
nodes that add, or add and delete, the same content at once serialise on that row
(see popbox.archive.postgresql_content).

Why two tsvectors. Field terms must hit only their field, and a tsquery can restrict
a word to weights (``'word':A``) that one GIN index still serves; but there are four
weights and five fields. ``words`` holds everything a plain term searches, weighted
subject A, sender and recipients B, text C, attachment names D, so ``subject:``,
``body:`` and ``filename:`` are weight-restricted searches of it; ``people`` holds
the sender (A) and the recipients (B) apart, for ``from:`` and ``to:``. Both use the
``simple`` configuration: mail is multilingual, and stemming in one language would
surprise readers of the others (popbox.archive.postgresql_query folds the text).

A date-sorted listing of everything reads ``archive_entries_listing``; a search
finds its matches through the GIN indexes first (postgresql_query explains).
"""

from __future__ import annotations

from typing import Final

from popbox.pgsql import Schema

__all__ = ["DIGEST_SIZE", "PIECE_SIZE", "SCHEMA"]

# A piece is stored, and read back, whole: a read holds one piece (and its compressed
# frame) at a time, so a 50 MB attachment is 200 rows, never 50 MB in memory.
PIECE_SIZE: Final = 256 * 1024
# SHA-256, the digest of messages and of pieces.
DIGEST_SIZE: Final = 32

_V1: Final = """
CREATE TABLE archive_objects (
    digest bytea PRIMARY KEY,
    size integer NOT NULL,
    refs integer NOT NULL CHECK (refs >= 0),
    data bytea NOT NULL
);
-- The frames are compressed already: TOAST should store them out of line as they are.
ALTER TABLE archive_objects ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE archive_messages (
    digest bytea PRIMARY KEY,
    size bigint NOT NULL,
    pieces bytea NOT NULL,
    refs integer NOT NULL CHECK (refs >= 0)
);

CREATE TABLE archive_entries (
    id bigserial PRIMARY KEY,
    username text NOT NULL,
    digest bytea NOT NULL
        REFERENCES archive_messages (digest) DEFERRABLE INITIALLY DEFERRED,
    size bigint NOT NULL,
    received double precision NOT NULL,
    date double precision,
    sort_time double precision GENERATED ALWAYS AS (coalesce(date, received)) STORED,
    sender text NOT NULL,
    recipients text NOT NULL,
    subject text NOT NULL,
    message_id text NOT NULL,
    attachments text[] NOT NULL,
    source text NOT NULL,
    folder text NOT NULL,
    hold boolean NOT NULL DEFAULT false,
    body text NOT NULL,
    words tsvector NOT NULL,
    people tsvector NOT NULL,
    UNIQUE (username, digest)
);
-- The listing of everything, newest first, a page at a time.
CREATE INDEX archive_entries_listing
    ON archive_entries (username, sort_time DESC, id DESC);
-- An export's walk in id order, and every lookup of a user's ids.
CREATE INDEX archive_entries_ids ON archive_entries (username, id);
-- Retention.
CREATE INDEX archive_entries_received ON archive_entries (username, received);
CREATE INDEX archive_entries_words ON archive_entries USING gin (words);
CREATE INDEX archive_entries_people ON archive_entries USING gin (people);

CREATE TABLE archive_origins (
    username text NOT NULL,
    origin text NOT NULL,
    PRIMARY KEY (username, origin)
);
"""

SCHEMA: Final = Schema("archive", (_V1,))
