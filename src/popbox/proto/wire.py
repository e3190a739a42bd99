"""Wire form of a stored message: LF -> CRLF, a final CRLF, dot-stuffing (RFC 1939 s3).

(Placeholder holding the size rule every other part depends on; the streaming
encoder and decoder live here too.)
"""

from __future__ import annotations

__all__ = ["wire_size"]


def wire_size(data: bytes) -> int:
    """Octets RETR sends for ``data`` before dot-stuffing (what STAT and LIST report).

    Every bare LF becomes CRLF and a message that does not end in a line ending gets
    a final CRLF. An empty message stays empty.
    """
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    size = len(data) + bare_lf
    if not data.endswith(b"\n"):
        size += 2
    return size
