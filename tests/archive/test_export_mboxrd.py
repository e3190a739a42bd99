"""The mbox framing both ways (popbox.archive.mboxrd): what export writes, import reads
back to the same octets, however the chunks fall and whatever the lines say."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.archive.mboxrd import (
    LINE_PIECE,
    SPOOL_THRESHOLD,
    MboxrdQuoter,
    envelope_sender,
    from_line,
    read_mbox,
)

# The mboxrd rule on whole lines: what the streaming quoter must agree with.
_WHOLE_LINES = re.compile(rb"(?m)^(>*From )")

_pieces = st.lists(
    st.sampled_from([b"From ", b">", b"\n", b"\r\n", b"x", b"Fr", b"om", b" ", b"F", b"rom "]),
    max_size=40,
).map(b"".join)


def _quote_in_chunks(message: bytes, cuts: list[int]) -> bytes:
    quoter = MboxrdQuoter()
    out = []
    start = 0
    for cut in sorted({min(cut, len(message)) for cut in cuts}):
        out.append(quoter.feed(message[start:cut]))
        start = cut
    out.append(quoter.feed(message[start:]))
    out.append(quoter.flush())
    return b"".join(out)


def _mbox(messages: list[bytes]) -> bytes:
    parts = []
    for message in messages:
        parts.append(from_line("someone@example.org", 0))
        parts.append(_quote_in_chunks(message, []))
        parts.append(b"\n" if message.endswith(b"\n") else b"\n\n")
    return b"".join(parts)


def _read(data: bytes, spool: Path) -> list[bytes]:
    out = []
    for message in read_mbox(io.BytesIO(data), spool):
        content = message.content
        out.append(content.read_bytes() if isinstance(content, Path) else content)
    return out


@given(_pieces, st.lists(st.integers(0, 60), max_size=8))
def test_quoting_does_not_depend_on_where_chunks_end(message: bytes, cuts: list[int]) -> None:
    assert _quote_in_chunks(message, cuts) == _WHOLE_LINES.sub(rb">\1", message)


@settings(max_examples=200)
@given(st.lists(_pieces.map(lambda body: b"Subject: x\n\n" + body + b"\n"), max_size=5))
def test_messages_with_from_lines_come_back_byte_identical(messages: list[bytes]) -> None:
    spool = Path("/nonexistent-spool")  # small messages never reach the spool
    assert _read(_mbox(messages), spool) == messages


def test_crlf_and_lf_lines_are_kept_as_they_are(tmp_path: Path) -> None:
    messages = [
        b"Subject: crlf\r\n\r\nFrom the start\r\n>From quoted\r\n\r\n",
        b"Subject: lf\n\nFrom here\n\n\n",
        b"Subject: mixed\r\n\nline\r\nline\n",
    ]
    data = _mbox(messages)
    assert b"\n>From the start\r\n>>From quoted\r\n" in data
    assert _read(data, tmp_path) == messages


def test_thunderbird_mboxo_with_dash_from_lines_and_crlf_framing(tmp_path: Path) -> None:
    data = (
        b"From - Sat Jan 04 10:00:00 2020\r\n"
        b"X-Mozilla-Status: 0001\r\nSubject: one\r\n\r\n>From a quoted line\r\n\r\n"
        b"From - Sat Jan 04 10:01:00 2020\r\n"
        b"X-Mozilla-Status: 0009\r\nSubject: deleted\r\n\r\nbody\r\n\r\n"
        b"From - Sat Jan 04 10:02:00 2020\r\n"
        b"Subject: three\r\n\r\nlast\r\n"
    )
    read = list(read_mbox(io.BytesIO(data), tmp_path))
    assert [message.expunged for message in read] == [False, True, False]
    assert read[0].content == (
        b"X-Mozilla-Status: 0001\r\nSubject: one\r\n\r\nFrom a quoted line\r\n"
    )
    assert read[2].content == b"Subject: three\r\n\r\nlast\r\n"


def test_an_unquoted_from_inside_a_paragraph_stays_in_its_message(tmp_path: Path) -> None:
    data = b"From a@b Thu Jan  1 00:00:00 1970\nSubject: x\n\nline\nFrom me, hello\n\n"
    assert _read(data, tmp_path) == [b"Subject: x\n\nline\nFrom me, hello\n"]


def test_a_file_that_does_not_begin_with_from_is_no_mbox(tmp_path: Path) -> None:
    messages = read_mbox(io.BytesIO(b"Subject: x\n\nbody\n"), tmp_path)
    with pytest.raises(ValueError, match="does not begin with a From line"):
        next(messages)


def test_a_large_message_goes_to_the_spool_and_a_long_line_stays_whole(tmp_path: Path) -> None:
    line = b"A" * (LINE_PIECE * 3) + b"\n"
    body = b"Subject: big\n\n" + line * (SPOOL_THRESHOLD // len(line) + 2)
    small = b"Subject: small\n\nFrom x\n"
    data = _mbox([body, small])
    read = list(read_mbox(io.BytesIO(data), tmp_path))
    assert isinstance(read[0].content, Path)
    assert read[0].content.parent == tmp_path
    assert read[0].content.read_bytes() == body
    assert read[1].content == small


def test_from_line_names_the_envelope_sender_or_mailer_daemon() -> None:
    assert from_line("a@example.org", 0) == b"From a@example.org Thu Jan  1 00:00:00 1970\n"
    assert from_line("", 86400).startswith(b"From MAILER-DAEMON Fri Jan  2 ")
    assert from_line("two words", 0).startswith(b"From MAILER-DAEMON ")


def test_envelope_sender_reads_only_the_header_block() -> None:
    assert envelope_sender(b"Return-Path: <a@b.example>\r\nSubject: x\r\n\r\n") == "a@b.example"
    assert envelope_sender(b"return-path:   <>\n\n") == ""
    assert envelope_sender(b"Subject: x\n\nReturn-Path: <body@example>\n") == ""
