"""Runs notmuch queries in-process for bench.archive: one long-lived process per database.

Started with the system's python3 (Debian's python3-notmuch2 binds libnotmuch for it,
not for the project's virtualenv) as ``python3 bench/notmuch_query.py CONFIG``; it opens
the database once, then answers one JSON line per request on stdin::

    {"query": "meeting AND budget", "limit": 50}
    -> {"seconds": 0.0012, "total": 4031, "top": ["<id@host>", ...]}

``seconds`` covers what a search page needs from notmuch, measured here so that
neither process start-up nor the pipe is counted: the exact count of matches, then the
first ``limit`` messages newest first with their Message-ID, date, From and Subject.
It imports nothing from popbox and runs on any Python 3 that has notmuch2.
"""

from __future__ import annotations

import json
import sys
import time

import notmuch2


def _answer(db: notmuch2.Database, query: str, limit: int) -> dict[str, object]:
    started = time.perf_counter()
    total = db.count_messages(query, exclude_tags=())
    top = []
    for message in db.messages(query, sort=notmuch2.Database.SORT.NEWEST_FIRST,
                               exclude_tags=()):
        if len(top) == limit:
            break
        # What a results page shows; notmuch keeps these in its database.
        message.header("From")
        message.header("Subject")
        top.append((f"<{message.messageid}>", message.date))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "total": total, "top": [mid for mid, _ in top]}


def main() -> int:
    config = sys.argv[1]
    db = notmuch2.Database(mode=notmuch2.Database.MODE.READ_ONLY, config=config)
    print(json.dumps({"ready": True, "messages": db.count_messages("*")}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _answer(db, request["query"], int(request["limit"]))
        except notmuch2.NotmuchError as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
