"""The collector's body decoding alone: pipelined RETR replies through ClientConnection.

A stream of whole RETR replies (status line, dot-stuffed body, terminator) in the
benchmark's message mix is fed to ``popbox.proto.client.ClientConnection`` in reads of
a fixed size, as the collector's session feeds it, and every event is drained. No
socket, no disk: what is measured is the sans-I/O client's line reading and body
decoding. Prints the best of ``--reps`` runs in MB/s of wire bytes per read size, in
CPU time of this process (other load on the machine does not count).

    .venv/bin/python -m bench.client_decode [--megabytes 50] [--reads 65536,262144]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Final

from bench import mailgen
from popbox.proto.client import NEED_DATA, ClientConnection, MessageData, MessageEnd

__all__ = ["build_stream", "decode_stream"]


# The worst case for a decoder that visits each ".": text dense with dots, and lines
# that open with one (so that every line is stuffed).
_DOT_DENSE: Final = (
    b"see www.example.com/a.b.c/index.html v1.2.3, e.g. i.e. etc. ... Mr. X.\n"
    b"...and ... so on.\n.\n..\n"
)


def build_stream(megabytes: float, profile: mailgen.Profile | None) -> tuple[bytes, int, str]:
    """Pipelined RETR replies of at least ``megabytes``, in ``profile``'s mix (None: dot-
    dense text); (wire, messages, content hash)."""
    replies: list[bytes] = []
    digest = hashlib.sha256()
    total = 0
    number = 0
    while total < megabytes * 1_000_000:
        number += 1
        if profile is None:
            stored = b"Subject: dots\n\n" + _DOT_DENSE * (200 + number % 300)
        else:
            stored = mailgen.message(1, "bench", number, profile)
        digest.update(mailgen.wire_form(stored))
        reply = b"+OK message follows\r\n" + mailgen.stuffed_wire(stored) + b".\r\n"
        replies.append(reply)
        total += len(reply)
    return b"".join(replies), number, digest.hexdigest()


def decode_stream(
    wire: bytes, messages: int, read_size: int, *, verify: bool = False
) -> tuple[float, str]:
    """CPU seconds to decode ``wire`` in reads of ``read_size``; with ``verify`` (slower:
    the hashing is timed too) the content's hash, else its length."""
    conn = ClientConnection()
    conn.receive_data(b"+OK ready\r\n")
    conn.next_event()
    for number in range(1, messages + 1):
        conn.retr(number)
    digest = hashlib.sha256()
    pieces: list[bytes] = []
    update = digest.update if verify else pieces.append
    ends = 0
    with memoryview(wire) as view:
        reads = [bytes(view[start : start + read_size]) for start in range(0, len(wire), read_size)]
    started = time.process_time()
    for data in reads:
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, MessageData):
                update(event.data)
            elif isinstance(event, MessageEnd):
                ends += 1
                pieces.clear()
    elapsed = time.process_time() - started
    if ends != messages:
        raise AssertionError(f"{ends} message ends for {messages} messages")
    return elapsed, digest.hexdigest() if verify else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--reads", default="65536,262144")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    profiles = (("no-attachments", mailgen.NO_ATTACHMENTS), ("realistic", mailgen.REALISTIC),
                ("dot-dense", None))
    for name, profile in profiles:
        wire, messages, expected = build_stream(args.megabytes, profile)
        for read_size in (int(size) for size in args.reads.split(",")):
            if decode_stream(wire, messages, read_size, verify=True)[1] != expected:
                raise AssertionError("decoded content differs from the messages")
            best = min(decode_stream(wire, messages, read_size)[0] for _ in range(args.reps))
            print(f"{name:15} {len(wire) / 1e6:6.1f} MB {messages:5} msgs "
                  f"read {read_size // 1024:4} KiB: {best * 1000:7.1f} ms "
                  f"{len(wire) / 1e6 / best:7.0f} MB/s")


if __name__ == "__main__":
    main()
