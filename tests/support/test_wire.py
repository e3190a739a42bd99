"""The reference wire form the suite checks popbox against (support.wire)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from support.wire import unstuff, wire

# Lines made of the characters that matter: dots, CR and LF.
LINES = st.lists(st.text(alphabet=".a\r", max_size=6).map(str.encode), max_size=6)


def test_unstuff_removes_one_leading_dot_per_line() -> None:
    assert unstuff(b"..a\r\nb.\r\n...\r\n") == b".a\r\nb.\r\n..\r\n"
    assert unstuff(b"") == b""


def test_wire_form_ends_every_line_with_crlf() -> None:
    assert wire(b"a\nb\r\nc") == b"a\r\nb\r\nc\r\n"
    assert wire(b"bare\rCR\n") == b"bare\rCR\r\n"
    assert wire(b"") == b""


@given(LINES)
def test_unstuff_undoes_rfc1939_stuffing(lines: list[bytes]) -> None:
    # RFC 1939 section 3, written out separately: a line starting with "." gets another.
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    assert unstuff(stuffed) == b"".join(line + b"\r\n" for line in lines)
