"""Properties of popbox.wireform: sizes, CRLF normalisation and dot-stuffing agree with
a simple reference model (support.wire) however a message is cut in pieces."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.wireform import (
    TERMINATOR,
    CrlfNormaliser,
    DotStuffer,
    WireSizeCounter,
    dot_stuffing_offsets,
    to_crlf,
    to_wire,
    wire_size,
)
from support.wire import dotted_after_lf, retr_wire, split_at
from support.wire import wire as normalise

# Bytes rich in the octets that matter: line ends, dots, CR, NUL and 8-bit.
MESSAGE_BYTES = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b".", b"..", b"a", b"\0", b"\xff", b" ", b"\n\n"]),
    max_size=60,
).map(b"".join) | st.binary(max_size=200)
CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


def crlf_reference(data: bytes) -> bytes:
    """Every LF not preceded by CR made CRLF; nothing else changes."""
    return re.sub(b"(?<!\r)\n", b"\r\n", data)


# -- sizes -------------------------------------------------------------------------


@given(MESSAGE_BYTES)
def test_wire_size_is_the_length_of_the_normalised_message(data: bytes) -> None:
    assert wire_size(data) == len(normalise(data))


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS)
def test_the_size_counter_counts_any_split_as_the_whole(data: bytes, cuts: list[int]) -> None:
    counter = WireSizeCounter()
    for piece in split_at(data, cuts):
        counter.feed(piece)
    assert counter.wire == wire_size(data)
    assert counter.stored == len(data)
    # Dovecot's W=: every line end CRLF, but no final CRLF added.
    assert counter.virtual == len(crlf_reference(data))
    assert counter.terminated == (not data or data.endswith(b"\n"))


# -- CRLF normalisation ------------------------------------------------------------


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS)
def test_crlf_normalisation_of_any_split_is_the_whole(data: bytes, cuts: list[int]) -> None:
    normaliser = CrlfNormaliser()
    stored = b"".join(normaliser.convert(piece) for piece in split_at(data, cuts))
    assert stored == crlf_reference(data)
    # What delivery stores is its own wire form but for the dots, size included.
    assert wire_size(stored) == wire_size(data)
    assert normalise(stored) == normalise(data)


@given(MESSAGE_BYTES)
def test_a_chunk_already_in_crlf_form_comes_back_itself(data: bytes) -> None:
    chunk = crlf_reference(data)
    if chunk:
        assert to_crlf(chunk, False) is chunk


# -- dot-stuffing --------------------------------------------------------------------


@settings(max_examples=500)
@given(MESSAGE_BYTES, CUTS)
def test_stuffing_any_split_is_the_reference(data: bytes, cuts: list[int]) -> None:
    """Bare LFs, bare CRs, runs of dots and dots on piece boundaries: a dot is added
    before every dot that opens a line, and the message opens a line."""
    stuffer = DotStuffer()
    out = []
    for piece in split_at(data, cuts):
        stuffed = stuffer.stuff(piece)
        if stuffed == piece:
            assert stuffed is piece  # nothing to add: no copy
        out.append(stuffed)
    assert b"".join(out) == dotted_after_lf(data)


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS, st.lists(st.booleans(), max_size=9), st.binary(max_size=3))
def test_offsets_and_stuff_share_one_state(
    data: bytes, cuts: list[int], by_offsets: list[bool], garbage: bytes
) -> None:
    """The zero-copy path (offsets into a reused window) and the copying path (stuff)
    may take turns on one message and still stuff it as one."""
    stuffer = DotStuffer()
    out = []
    for number, piece in enumerate(split_at(data, cuts)):
        if number < len(by_offsets) and by_offsets[number]:
            window = bytearray(piece + garbage)  # only the first len(piece) octets count
            offsets = stuffer.offsets(window, len(piece))
            assert offsets == sorted(set(offsets))
            bounds = zip([0, *offsets], [*offsets, len(piece)], strict=True)
            out.append(b".".join(bytes(window[start:stop]) for start, stop in bounds))
        else:
            out.append(stuffer.stuff(piece))
    assert b"".join(out) == dotted_after_lf(data)


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS)
def test_ending_adds_the_missing_line_end_and_the_terminator(
    data: bytes, cuts: list[int]
) -> None:
    stuffer = DotStuffer()
    for piece in split_at(data, cuts):
        stuffer.stuff(piece)
    if not data or data.endswith(b"\n"):
        assert stuffer.ending() == TERMINATOR
        assert stuffer.at_line_start
    else:
        assert stuffer.ending() == b"\r\n" + TERMINATOR
        assert not stuffer.at_line_start


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS, CUTS)
def test_crlf_stored_then_stuffed_is_what_retr_sends(
    data: bytes, cuts: list[int], cuts2: list[int]
) -> None:
    """Delivery's normalisation, then the stuffer over the stored bytes cut anew: the
    whole of a wire-ready RETR (the TLS and sendfile paths)."""
    normaliser = CrlfNormaliser()
    stored = b"".join(normaliser.convert(piece) for piece in split_at(data, cuts))
    stuffer = DotStuffer()
    body = b"".join(stuffer.stuff(piece) for piece in split_at(stored, cuts2))
    assert body + stuffer.ending() == retr_wire(data)


@settings(max_examples=500)
@given(MESSAGE_BYTES, CUTS)
def test_stored_pieces_to_wire_are_what_retr_sends(data: bytes, cuts: list[int]) -> None:
    """LF, CRLF or mixed storage, CR LF split between pieces, dots anywhere: the pieces
    in wire form and the ending are the reference's RETR body."""
    stuffer = DotStuffer()
    after_cr = False
    out = []
    for piece in split_at(data, cuts):
        out.append(to_wire(piece, after_cr, stuffer))
        if piece:
            after_cr = piece[-1:] == b"\r"
    assert b"".join(out) + stuffer.ending() == retr_wire(data)


@given(st.lists(st.sampled_from([b"x", b"a.b", b"", b"\r", b" ."]), max_size=12))
def test_a_piece_already_in_wire_form_comes_back_itself(lines: list[bytes]) -> None:
    piece = b"".join(b"x" + line + b"\r\n" for line in lines) or b"x"
    assert to_wire(piece, False, DotStuffer()) is piece


@pytest.mark.parametrize(
    ("pieces", "wire"),
    [
        ([], b".\r\n"),
        ([b""], b".\r\n"),
        ([b".", b".", b"\r\n"], b"...\r\n.\r\n"),
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b".b"], b"a\r.b\r\n.\r\n"),  # a bare CR is no line end
        ([b"ends in a bare CR\r"], b"ends in a bare CR\r\r\n.\r\n"),
        ([b"x\r\n", b""], b"x\r\n.\r\n"),  # an empty piece changes nothing
    ],
)
def test_stuffer_examples(pieces: list[bytes], wire: bytes) -> None:
    stuffer = DotStuffer()
    assert b"".join(map(stuffer.stuff, pieces)) + stuffer.ending() == wire


def test_an_undotted_piece_comes_back_itself() -> None:
    piece = b"no dotted line. Dots inside.\r\n" * 1000
    assert DotStuffer().stuff(piece) is piece
    after_text = DotStuffer()
    after_text.stuff(b"no line end yet")
    assert after_text.stuff(b".x\r\n") == b".x\r\n"
    assert DotStuffer().stuff(b".x\r\n.\r\n") == b"..x\r\n..\r\n"


def test_dot_lines_are_found_across_search_windows() -> None:
    # A base64-like run with no dot, then dotted lines right at and after the 64 KiB
    # window boundary (the memchr pre-check must not skip them).
    window = 64 * 1024
    stored = b"A" * (window - 2) + b"\r\n.x\r\n" + b"B" * window + b"\r\n.\r\n.y\r\n"
    offsets = dot_stuffing_offsets(stored, len(stored))
    assert [stored[o : o + 2] for o in offsets] == [b".x", b".\r", b".y"]
    assert DotStuffer().stuff(stored) == dotted_after_lf(stored)
