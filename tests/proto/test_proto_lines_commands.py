"""Line framing limits and the command grammar, including hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.commands import HUGE_NUMBER, BadCommand, Command, Verb, parse_command
from popbox.proto.lines import LINE_TOO_LONG, LineReader


def test_crlf_and_bare_lf_lines() -> None:
    reader = LineReader(100)
    reader.feed(b"ONE\r\nTWO\nTHR")
    assert reader.read_line(100) == b"ONE"
    assert reader.read_line(100) == b"TWO"
    assert reader.read_line(100) is None
    reader.feed(b"EE\r\n")
    assert reader.read_line(100) == b"THREE"


def test_a_line_split_between_cr_and_lf() -> None:
    reader = LineReader(100)
    reader.feed(b"NOOP\r")
    assert reader.read_line(100) is None
    reader.feed(b"\n")
    assert reader.read_line(100) == b"NOOP"


def test_limit_counts_the_line_end() -> None:
    reader = LineReader(100)
    reader.feed(b"x" * 9 + b"\n" + b"y" * 10 + b"\n")
    assert reader.read_line(10) == b"x" * 9
    assert reader.read_line(10) is LINE_TOO_LONG
    assert reader.buffered == 0


def test_one_mib_line_is_never_buffered() -> None:
    reader = LineReader(2048)
    peak = 0
    chunk = b"A" * 65536
    for _ in range(16):
        reader.feed(chunk)
        peak = max(peak, reader.buffered)
        assert reader.read_line(2048) in (LINE_TOO_LONG, None)
        peak = max(peak, reader.buffered)
    reader.feed(b"AAAA\r\nNOOP\r\n")
    assert peak <= 2048
    assert reader.read_line(2048) == b"NOOP"
    assert reader.read_line(2048) is None


def test_one_mib_line_in_a_single_feed_keeps_only_the_limit() -> None:
    reader = LineReader(2048)
    reader.feed(b"STAT\r\n" + b"A" * (1 << 20))
    assert reader.buffered <= 6 + 2048
    reader.feed(b"A" * (1 << 20) + b"\r\nNOOP\r\n")
    assert reader.read_line(2048) == b"STAT"
    assert reader.read_line(2048) is LINE_TOO_LONG
    assert reader.read_line(2048) == b"NOOP"
    assert reader.read_line(2048) is None


def test_too_long_is_reported_once_per_line() -> None:
    reader = LineReader(64)
    reader.feed(b"B" * 100)
    assert reader.read_line(64) is LINE_TOO_LONG
    reader.feed(b"B" * 100)
    assert reader.read_line(64) is None
    reader.feed(b"\nCAPA\n")
    assert reader.read_line(64) == b"CAPA"


def test_clear_forgets_everything() -> None:
    reader = LineReader(64)
    reader.feed(b"USER evil\r\nPA")
    reader.clear()
    assert reader.read_line(64) is None
    reader.feed(b"CAPA\r\n")
    assert reader.read_line(64) == b"CAPA"


# -- commands -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"stat", Command(Verb.STAT)),
        (b"STAT ", Command(Verb.STAT)),
        (b"LIST", Command(Verb.LIST)),
        (b"list 7", Command(Verb.LIST, number=7)),  # type: ignore[arg-type]
        (b"TOP 1 10", Command(Verb.TOP, number=1, lines=10)),  # type: ignore[arg-type]
        (b"TOP 1 " + b"9" * 40, Command(Verb.TOP, number=1, lines=HUGE_NUMBER)),  # type: ignore[arg-type]
        (b"USER fr\xc3\xa9d", Command(Verb.USER, name="fr\u00e9d")),
        (b"PASS a b  c", Command(Verb.PASS, secret="a b  c")),
        (b"AUTH plain", Command(Verb.AUTH, name="PLAIN")),
        (b"AUTH PLAIN =", Command(Verb.AUTH, name="PLAIN", initial_response=b"=")),
        (b"AUTH", Command(Verb.AUTH)),
        (
            b"APOP u C4C9334BAC560ECC979E58001B3E22FB",
            Command(Verb.APOP, name="u", secret="c4c9334bac560ecc979e58001b3e22fb"),
        ),
    ],
)
def test_valid_commands(line: bytes, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "unknown"),
    [
        (b"", False),
        (b"   ", False),
        (b"XYZZY", True),
        (b"RETRIEVE 1", True),
        (b"STAT 1", False),
        (b"NOOP x", False),
        (b"LIST 1 2", False),
        (b"RETR", False),
        (b"DELE", False),
        (b"USER", False),
        (b"USER a b", False),
        (b"USER \xff", False),
        (b"USER a\x01", False),
        (b"PASS", False),
        (b"PASS \xc3", False),
        (b"TOP 1", False),
        (b"TOP 1 2 3", False),
        (b"AUTH PLAIN x y", False),
        (b"AUTH PL\xc3\x80IN", False),
        (b"STAT\0", False),
        (b"ST\xc3\x80T", True),
        (b"\xff\xfe", True),
        (b"K" * 41, True),
    ],
)
def test_bad_commands(line: bytes, unknown: bool) -> None:
    result = parse_command(line)
    assert isinstance(result, BadCommand)
    assert result.unknown is unknown
    assert result.reason


@settings(max_examples=500)
@given(
    st.binary(max_size=80)
    | st.sampled_from([b"RETR ", b"TOP 1 ", b"AUTH PLAIN "]).flatmap(
        lambda prefix: st.binary(max_size=40).map(lambda tail: prefix + tail)
    )
)
def test_parser_never_raises(line: bytes) -> None:
    result = parse_command(line)
    assert isinstance(result, Command | BadCommand)
    if isinstance(result, Command) and result.number is not None:
        assert 0 <= result.number <= HUGE_NUMBER


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from([b"NOOP", b"LIST 1", b"", b"x" * 40, b"a\rb", b"\rx", b"y" * 70]),
        max_size=20,
    ),
    st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=1),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_lines_come_out_whole_and_in_order_wherever_the_feeds_split(
    lines: list[bytes], ends: list[bytes], cuts: list[int]
) -> None:
    # A pipelined burst is split into lines in one go; CRLF and bare-LF lines, lines
    # over the limit and feeds cut anywhere must still give each line once, in order.
    limit = 64
    stream = b"".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    expected: list[object] = []
    for i, line in enumerate(lines):
        raw = line + ends[i % len(ends)][:-1]  # the line and its CR, if any
        expected.append(LINE_TOO_LONG if len(raw) + 1 > limit else line)
    points = [*sorted({cut % (len(stream) + 1) for cut in cuts}), len(stream)]
    reader, got, start = LineReader(limit), [], 0
    for point in points:
        reader.feed(stream[start:point])
        start = point
        while (line := reader.read_line(limit)) is not None:
            got.append(line)
    assert got == expected
    assert reader.buffered == 0


# -- a shared buffer (the client: reply lines, then a body read raw from the same bytes)


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from([b"+OK", b"", b"x" * 40, b"a\rb", b"\rx", b".", b"y" * 62]),
        max_size=20,
    ),
    st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=1),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_shared_buffer_gives_the_same_lines_one_at_a_time(
    lines: list[bytes], ends: list[bytes], cuts: list[int]
) -> None:
    limit = 64
    stream = b"".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    points = [*sorted({cut % (len(stream) + 1) for cut in cuts}), len(stream)]
    batch, shared, received = LineReader(limit), [], bytearray()
    reader = LineReader(limit, shared=received)
    expected, start = [], 0
    for point in points:
        batch.feed(stream[start:point])
        reader.feed(stream[start:point])
        start = point
        while (line := batch.read_line(limit)) is not None:
            expected.append(line)
        while (line := reader.read_line(limit)) is not None:
            shared.append(line)
            # Only the line left the buffer: the rest is as received.
            assert stream[:start].endswith(bytes(received))
    assert LINE_TOO_LONG not in expected
    assert shared == expected
    assert received == b""


def test_shared_buffer_keeps_what_follows_a_line_as_received() -> None:
    received = bytearray()
    reader = LineReader(64, shared=received)
    body = b"line one\r\n" + b"x" * 5000  # no line end within any limit: not a line
    reader.feed(b"+OK\r\n" + body)
    assert reader.read_line(64) == b"+OK"
    assert received == body  # kept whole, though longer than the hard limit
    assert reader.buffered == len(body)


def test_shared_buffer_reports_too_long_and_leaves_the_line() -> None:
    received = bytearray()
    reader = LineReader(64, shared=received)
    reader.feed(b"a" * 63)
    assert reader.read_line(64) is None  # 63 octets: the LF may still make it 64
    reader.feed(b"a")
    assert reader.read_line(64) is LINE_TOO_LONG
    assert reader.read_line(64) is LINE_TOO_LONG  # the caller ends the session
    assert len(received) == 64
