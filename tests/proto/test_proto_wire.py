"""Property and example tests of the RETR/TOP wire form (RFC 1939 section 3 and 11)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.wire import WireDecoder, WireEncoder
from popbox.wireform import CrlfNormaliser, DotStuffer, wire_size
from support.wire import split_at, stuff, top_content
from support.wire import wire as normalise

# Bytes rich in the octets that matter: line ends, dots, CR, NUL and 8-bit.
MESSAGE_BYTES = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b".", b"..", b"a", b"\0", b"\xff", b" ", b"\n\n"]),
    max_size=60,
).map(b"".join) | st.binary(max_size=200)


def encode(data: bytes, cuts: list[int], body_lines: int | None = None) -> bytes:
    encoder = WireEncoder(body_lines)
    out = b"".join(encoder.encode(piece) for piece in split_at(data, cuts))
    return out + encoder.finish()


CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS, CUTS)
def test_round_trip_across_chunk_boundaries(data: bytes, cuts: list[int], cuts2: list[int]) -> None:
    wire = encode(data, cuts)
    assert wire == stuff(normalise(data)) + b".\r\n"
    decoder = WireDecoder()
    content = b"".join(decoder.decode(piece) for piece in split_at(wire + b"+OK next", cuts2))
    assert decoder.finished
    assert content == normalise(data)
    assert len(content) == wire_size(data)
    assert decoder.leftover == b"+OK next"


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS)
def test_no_line_starts_with_a_single_dot_except_the_terminator(
    data: bytes, cuts: list[int]
) -> None:
    lines = encode(data, cuts).split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    for line in lines[:-2]:
        assert not line.startswith(b".") or line.startswith(b"..")


# Lines as a store keeps them: text, empty lines, lines opening with dots, bare CRs.
LINES = st.lists(
    st.sampled_from([b"", b".", b"..", b".a", b"a", b"a.b", b"\r", b"a\rb", b"\xff\0"]),
    max_size=12,
)


@settings(max_examples=200)
@given(LINES, st.sampled_from([b"\r\n", b"\n"]), st.booleans())
def test_crlf_and_lf_stores_split_at_every_position(
    lines: list[bytes], ending: bytes, final_newline: bool
) -> None:
    # The fast paths (wire-ready CRLF chunks, LF-only chunks) must agree with the
    # reference wherever a chunk boundary falls: inside a CRLF, before or after a dot.
    data = ending.join(lines) + (ending if final_newline and lines else b"")
    expected = stuff(normalise(data)) + b".\r\n"
    for cut in range(len(data) + 1):
        assert encode(data, [cut]) == expected
        for cut2 in range(cut, len(data) + 1, 3):
            assert encode(data, [cut, cut2]) == expected


@given(LINES)
def test_wire_ready_chunk_passes_through_uncopied(lines: list[bytes]) -> None:
    chunk = b"".join(b"x" + line.replace(b"\r", b"") + b"\r\n" for line in lines) or b"x"
    encoder = WireEncoder()
    assert encoder.encode(chunk) is chunk


@settings(max_examples=100)
@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"a"]), max_size=40))
def test_mixed_line_ends_split_at_every_position(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    expected = stuff(normalise(data)) + b".\r\n"
    for cut in range(len(data) + 1):
        assert encode(data, [cut]) == expected


@settings(max_examples=300)
@given(MESSAGE_BYTES, CUTS, st.integers(min_value=0, max_value=6) | st.just(10**12))
def test_top_matches_reference(data: bytes, cuts: list[int], body_lines: int) -> None:
    assert encode(data, cuts, body_lines) == stuff(top_content(data, body_lines)) + b".\r\n"


def test_top_sets_done_and_ignores_the_rest() -> None:
    encoder = WireEncoder(1)
    assert encoder.encode(b"H: v\n\nbody1\nbo") == b"H: v\r\n\r\nbody1\r\n"
    assert encoder.done
    assert encoder.encode(b"dy2\n") == b""
    assert encoder.finish() == b".\r\n"


def test_top_without_blank_line_sends_all_headers() -> None:
    assert encode(b"A: 1\nB: 2", [3], 0) == b"A: 1\r\nB: 2\r\n.\r\n"


def test_message_starting_with_blank_line_has_no_headers() -> None:
    assert encode(b"\nbody\nmore\n", [], 1) == b"\r\nbody\r\n.\r\n"


@pytest.mark.parametrize(
    ("pieces", "wire"),
    [
        ([b"a\r", b"\nb"], b"a\r\nb\r\n.\r\n"),  # CRLF split: not a bare LF
        ([b"a\r\n", b".b"], b"a\r\n..b\r\n.\r\n"),  # dot after a chunk-ending CRLF
        ([b"a\r", b".b"], b"a\r.b\r\n.\r\n"),  # bare CR is not a line end
        ([b".", b".", b"\n"], b"...\r\n.\r\n"),
        ([b"a\r"], b"a\r\r\n.\r\n"),  # a final bare CR stays, then CRLF is added
        ([b"\0\xff\rz\n"], b"\0\xff\rz\r\n.\r\n"),
        ([], b".\r\n"),
    ],
)
def test_chunk_boundary_examples(pieces: list[bytes], wire: bytes) -> None:
    encoder = WireEncoder()
    assert b"".join(encoder.encode(piece) for piece in pieces) + encoder.finish() == wire


def test_decoder_terminator_split_everywhere() -> None:
    wire = b"x\r\n..y\r\n.\r\nrest"
    for cut in range(len(wire) + 1):
        for cut2 in range(cut, len(wire) + 1):
            decoder = WireDecoder()
            parts = [wire[:cut], wire[cut:cut2], wire[cut2:]]
            content = b"".join(decoder.decode(part) for part in parts)
            assert content == b"x\r\n.y\r\n"
            assert decoder.finished
            assert decoder.leftover == b"rest"


def test_decoder_empty_content() -> None:
    decoder = WireDecoder()
    assert decoder.decode(b".\r\n") == b""
    assert decoder.finished


def test_decoder_not_finished_without_terminator() -> None:
    decoder = WireDecoder()
    assert decoder.decode(b"a\r\n.") == b"a\r\n"
    assert not decoder.finished
    assert decoder.decode(b".b\r\n") == b".b\r\n"
    assert decoder.decode(b".\r") == b""
    assert not decoder.finished
    assert decoder.decode(b"\n") == b""
    assert decoder.finished


def test_encoder_works_on_large_chunks_without_per_line_cost() -> None:
    # Correctness on a chunk with many lines (the hot path is whole-chunk operations).
    data = b"line\n.dot\n" * 50_000
    wire = encode(data, [len(data) // 3, 65536])
    assert wire == b"line\r\n..dot\r\n" * 50_000 + b".\r\n"


@pytest.mark.parametrize("data", [b"", b"a", b"a\n", b"a\r\n", b"a\r", b"\n\n", b"a\nb"])
def test_wire_size_examples(data: bytes) -> None:
    assert wire_size(data) == len(normalise(data))


# -- the encoder against the other RETR paths' use of popbox.wireform (CRLF storage,
# the zero-copy path's offsets, the wire-ready path's stuffing)


def crlf_stored(data: bytes, cuts: list[int]) -> bytes:
    """What delivery stores with save_crlf: ``data`` normalised piece by piece."""
    normaliser = CrlfNormaliser()
    return b"".join(normaliser.convert(piece) for piece in split_at(data, cuts))


def planned_wire(stored: bytes) -> bytes:
    """The RETR body the sendfile path sends: a dot before each offset, the ending."""
    stuffer = DotStuffer()
    offsets = stuffer.offsets(stored, len(stored))
    pieces, start = [], 0
    for offset in offsets:
        pieces += [stored[start:offset], b"."]
        start = offset
    pieces.append(stored[start:])
    return b"".join(pieces) + stuffer.ending()


@given(MESSAGE_BYTES, st.lists(st.integers(min_value=0), max_size=6))
def test_crlf_storage_keeps_the_wire_form_and_size(data: bytes, cuts: list[int]) -> None:
    stored = crlf_stored(data, cuts)
    # Delivered and RETRieved: the client sees exactly what LF storage would give it.
    assert encode(stored, []) == encode(data, [])
    assert wire_size(stored) == wire_size(data)
    # No bare LF is left, and a CR LF split across pieces stayed one line end.
    assert stored.count(b"\n") == stored.count(b"\r\n")
    assert stored == crlf_stored(data, [])


@given(MESSAGE_BYTES, st.lists(st.integers(min_value=0), max_size=6))
def test_stuffing_offsets_give_the_encoders_bytes(data: bytes, cuts: list[int]) -> None:
    stored = crlf_stored(data, cuts)
    assert planned_wire(stored) == encode(stored, cuts)


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"a\r\n.b\r\n.\r\n",
        b"no final line end",
        b"ends in a bare CR\r",
        b"bare CR \r. is no line start\r\n",
    ],
)
def test_stuffing_examples(stored: bytes) -> None:
    assert planned_wire(stored) == encode(stored, [])


@given(MESSAGE_BYTES, st.lists(st.integers(min_value=0), max_size=6))
def test_stuffing_wire_ready_pieces_gives_the_encoders_bytes(
    data: bytes, cuts: list[int]
) -> None:
    stored = crlf_stored(data, [])
    stuffer = DotStuffer()
    out = [stuffer.stuff(piece) for piece in split_at(stored, cuts)]
    assert b"".join(out) + stuffer.ending() == encode(stored, [])
