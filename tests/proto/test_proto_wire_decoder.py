"""The client's body decoder (proto.wire.WireDecoder) against a line-by-line reference.

Any wire bytes, valid stuffing or not, split anywhere, must decode to what reading them
line by line gives: a line ``.`` CRLF ends the body, any other line opening with ``.``
loses that dot, and the bytes after the terminator are left over untouched.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.wire import WireDecoder
from support.wire import split_at


def reference(wire: bytes) -> tuple[bytes, bool, bytes]:
    """(content, finished, leftover), one line at a time; an unfinished stream's last
    ``.`` or ``.\\r`` is not content yet (it may become the terminator)."""
    out: list[bytes] = []
    position = 0
    while True:
        end = wire.find(b"\n", position)
        if end < 0:
            rest = wire[position:]
            if rest not in (b".", b".\r"):
                out.append(rest[1:] if rest.startswith(b".") else rest)
            return b"".join(out), False, b""
        line = wire[position : end + 1]
        if line == b".\r\n":
            return b"".join(out), True, wire[end + 1 :]
        out.append(line[1:] if line.startswith(b".") else line)
        position = end + 1




# Octets that matter (line ends, dots, the terminator and its beginnings), long lines
# without dots (the decoder visits each "." while they are sparse) and runs of dots
# (where it switches to a C-level scan), mixed with arbitrary bytes.
WIRE = st.lists(
    st.sampled_from(
        [b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"\0\xff", b".\r\n", b"\r\n.", b"\r\n..",
         b"\n.\n", b"x" * 100, b"a.b.c.d.e.f.g.h.i", b"\r\n.\r"]
    ),
    max_size=60,
).map(b"".join) | st.binary(max_size=300)
CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@settings(max_examples=500)
@given(WIRE, CUTS)
def test_any_split_decodes_like_the_reference(wire: bytes, cuts: list[int]) -> None:
    decoder = WireDecoder()
    content = b"".join(decoder.decode(piece) for piece in split_at(wire, cuts))
    assert (content, decoder.finished, decoder.leftover) == reference(wire)


@settings(max_examples=500)
@given(WIRE, CUTS)
def test_decode_from_leaves_what_follows_in_the_buffer(wire: bytes, cuts: list[int]) -> None:
    # The client's way: one receive buffer, fed by reads, decoded in place.
    received = bytearray()
    decoder = WireDecoder()
    parts = []
    for piece in split_at(wire, cuts):
        received += piece
        parts.append(decoder.decode_from(received))
    content, finished, leftover = reference(wire)
    assert (b"".join(parts), decoder.finished) == (content, finished)
    if finished:
        assert received == leftover
    else:
        # All but a held terminator candidate, at the start of a line, was taken.
        held = bytes(received)
        assert held in (b"", b".", b".\r")
        assert not held or wire == held or wire.endswith(b"\n" + held)


@settings(max_examples=200)
@given(
    st.lists(
        st.sampled_from([b"", b".", b"..", b".x", b"x", b"x" * 200, b"1.2.3.4.5."]), max_size=40
    ),
    CUTS,
)
def test_stuffed_body_round_trips(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    decoder = WireDecoder()
    pieces = split_at(wire + b".\r\n+OK next\r\n", cuts)
    assert b"".join(decoder.decode(piece) for piece in pieces) == body
    assert decoder.finished
    assert decoder.leftover == b"+OK next\r\n"


def test_the_rest_of_a_read_is_neither_copied_nor_touched() -> None:
    received = bytearray(b"a\r\n..b\r\n.\r\n+OK\r\nnext body\r\n.\r\n")
    decoder = WireDecoder()
    assert decoder.decode_from(received) == b"a\r\n.b\r\n"
    assert decoder.finished
    assert received == b"+OK\r\nnext body\r\n.\r\n"
    assert decoder.decode_from(received) == b""  # finished: takes nothing more


@pytest.mark.parametrize(
    ("pieces", "content"),
    [
        ([b"a\r\n.", b"\r", b"\n"], b"a\r\n"),  # the terminator arrives octet by octet
        ([b".", b"\r\n"], b""),  # an empty body
        ([b"a\r\n.", b"x\r\n.\r\n"], b"a\r\nx\r\n"),  # a held "." was a stuffed dot
        ([b"a\r\n.\r", b"x\r\n.\r\n"], b"a\r\n\rx\r\n"),  # so was a held ".\r"
        ([b"a\n.\n.\r\n"], b"a\n\n"),  # a bare LF line "." is stuffing, not the end
        ([b"a\r.\r\n.\r\n"], b"a\r.\r\n"),  # a bare CR does not start a line
    ],
)
def test_held_terminator_candidates(pieces: list[bytes], content: bytes) -> None:
    decoder = WireDecoder()
    assert b"".join(decoder.decode(piece) for piece in pieces) == content
    assert decoder.finished


def test_waiting_for_more_returns_nothing() -> None:
    decoder = WireDecoder()
    received = bytearray(b".")
    assert decoder.decode_from(received) == b""
    assert received == b"."
    assert not decoder.finished
    received += b"\r"
    assert decoder.decode_from(received) == b""
    received += b"\n"
    assert decoder.decode_from(received) == b""
    assert decoder.finished
    assert received == b""


def test_a_body_that_turns_dot_dense_midway() -> None:
    # Sparse first (each dot visited), then dense (the scan takes over), read in pieces
    # that hold one or the other or both.
    lines = [b"x" * 500, b".a", b"x" * 500] + [b".", b"a.b.c.d.e.f", b".."] * 200
    body = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    for size in (64, 1000, 4096, len(wire) + 3):
        decoder = WireDecoder()
        stream = wire + b".\r\nrest"
        pieces = [stream[start : start + size] for start in range(0, len(stream), size)]
        assert b"".join(decoder.decode(piece) for piece in pieces) == body, size
        assert decoder.leftover == b"rest"
