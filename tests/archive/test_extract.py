"""What the index takes from a message (popbox.archive.extract), and how a message
is cut into stored pieces (popbox.archive.segments): hostile input included."""

from __future__ import annotations

import base64
import io
import os
import tracemalloc
import zipfile

from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.archive.extract import MAX_TEXT, extract
from popbox.archive.segments import MERGE_BELOW, raw_pieces, segment_ends, split_segments


def multipart(parts: list[tuple[str, bytes]], *, subject: bytes = b"parts") -> bytes:
    """A multipart/mixed message of (headers, body) parts."""
    out = [
        b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nSubject: " + subject,
        b'\r\nContent-Type: multipart/mixed; boundary="B0"\r\n\r\npreamble\r\n',
    ]
    for headers, body in parts:
        out.append(b"--B0\r\n" + headers.encode() + b"\r\n\r\n" + body + b"\r\n")
    out.append(b"--B0--\r\n")
    return b"".join(out)


def attachment(name: str, payload: bytes) -> tuple[str, bytes]:
    return (
        f"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
        f'filename="{name}"\r\nContent-Transfer-Encoding: base64',
        base64.encodebytes(payload).replace(b"\n", b"\r\n").rstrip(),
    )


def test_headers_are_decoded_from_rfc2047_in_any_charset() -> None:
    message = (
        b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.de>\r\n"
        b"To: =?iso-8859-1?q?Ren=E9?= <r@example.fr>\r\nCc: =?koi8-r?b?8NLJ18XU?= <c@x>\r\n"
        b"Subject: =?iso-2022-jp?b?GyRCJEYkOSRIGyhC?=\r\n"
        b"Date: Mon, 07 Dec 2026 10:00:00 +0100\r\nMessage-ID: <m1@example.de>\r\n\r\nhi\r\n"
    )
    got = extract(message)
    assert got.sender == "Jürgen Müller <j@example.de>"
    assert got.recipients == "René <r@example.fr>, Привет <c@x>"
    assert got.subject == "てすと"
    assert got.message_id == "<m1@example.de>"
    assert got.date == 1796634000.0
    assert got.body == "hi"


def test_unknown_charsets_and_raw_8bit_fall_back_without_failing() -> None:
    message = (
        b"Subject: =?x-no-such-charset?q?caf=E9?= \xe9t\xe9\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nna\xefve caf\xc3\xa9\r\n"
    )
    got = extract(message)
    assert "été" in got.subject
    assert "na" in got.body


def test_html_is_indexed_as_text_without_scripts_or_styles() -> None:
    html = (
        b"<html><head><style>.x{color:red}</style><script>var secret='hidden';</script>"
        b"</head><body><p>Meeting&nbsp;at <b>noon</b> &amp; lunch</p>"
        b"<img src=x onerror=alert(1)></body></html>"
    )
    got = extract(multipart([("Content-Type: text/html; charset=utf-8", html)]))
    assert got.body == "Meeting at noon & lunch"
    assert "hidden" not in got.body
    assert "color" not in got.body


def test_plain_and_html_alternatives_and_attachment_names() -> None:
    message = multipart(
        [
            ("Content-Type: text/plain; charset=utf-8", "Grüße aus Köln".encode()),
            attachment("report.pdf", b"%PDF-1.4 binary"),
            (
                "Content-Type: image/png\r\nContent-Disposition: attachment; "
                "filename*=utf-8''r%C3%A9sum%C3%A9.png",
                b"iVBORw0KGgo=",
            ),
        ]
    )
    got = extract(message)
    assert got.body == "Grüße aus Köln"
    assert got.attachments == ("report.pdf", "résumé.png")
    assert got.has_attachment
    assert got.sender == "Alice <alice@example.com>"


def test_message_without_attachment() -> None:
    got = extract(b"Subject: plain\n\njust text\n")
    assert got.attachments == ()
    assert not got.has_attachment


def test_date_that_does_not_parse_is_none() -> None:
    assert extract(b"Date: the day after tomorrow\n\nx\n").date is None


def test_zip_bomb_attachment_is_never_opened() -> None:
    # 100 MB of zeros in a zip of about 100 KB: opening it would show in memory.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * (100 * 1024 * 1024))
    message = multipart(
        [("Content-Type: text/plain", b"see zip"), attachment("bomb.zip", buffer.getvalue())]
    )
    tracemalloc.start()
    try:
        got = extract(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.attachments == ("bomb.zip",)
    assert got.body == "see zip"
    assert peak < 5 * len(message) + (1 << 20)


def test_huge_attachment_costs_bounded_memory() -> None:
    payload = os.urandom(30 * 1024 * 1024)
    message = multipart([("Content-Type: text/plain", b"big one"), attachment("big.bin", payload)])
    del payload
    tracemalloc.start()
    try:
        got = extract(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.attachments == ("big.bin",)
    assert got.body == "big one"
    assert peak < 16 * 1024 * 1024


def test_huge_text_is_indexed_only_up_to_the_bound() -> None:
    message = b"Subject: long\n\n" + b"word " * (3 * MAX_TEXT)
    got = extract(message)
    assert 0 < len(got.body) <= MAX_TEXT


def test_deeply_nested_multiparts_do_not_fail() -> None:
    depth = 3000
    head = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    message = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + b"deep text\r\n"
    extract(message)


MALFORMED = [
    b"",
    b"\r\n\r\n",
    b"no headers at all",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
    b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n\r\n----\r\n',
    b'Content-Type: text/plain; charset="\\\r\n\r\nbroken param\r\n',
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n",
    b"Subject: =?utf-8?b?not-base64?=\r\nFrom: =?utf-8?q?=FF=FE?=\r\n\r\nx",
    b"Content-Disposition: attachment; filename*=bogus''%FF%FE\r\n\r\nx",
    b"From: \x00\xff\xfe\r\nTo: <<<>>>@@\r\n\r\n\xff\xfe\xfd",
    b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\n\r\nx",
    b"\xff" * 10000,
]


def test_malformed_mime_never_raises() -> None:
    for message in MALFORMED:
        extract(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_any_octets_extract(data: bytes) -> None:
    extract(data)


PIECES = st.sampled_from(
    [
        b"--B\r\n",
        b"--B--\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"Content-Type: text/plain\r\n",
        b"x" * 9000,
        b"line\n",
        b"--",
        b"\n--x\n\n",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(PIECES, st.binary(max_size=50)), max_size=30).map(b"".join))
def test_pieces_give_back_the_exact_input(data: bytes) -> None:
    extract(b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n' + data)
    assert b"".join(split_segments(data)) == data
    raws = raw_pieces(data)
    # Contiguous, non-empty, covering the input.
    assert all(piece.end > piece.start for piece in raws)
    assert [piece.start for piece in raws] == [0, *(piece.end for piece in raws)][: len(raws)]
    assert (raws[-1].end if raws else 0) == len(data)
    ends = segment_ends(data)
    assert ends == sorted(set(ends))
    assert not ends or ends[-1] == len(data)


def test_the_same_attachment_is_the_same_piece_in_two_messages() -> None:
    payload = os.urandom(50_000)
    first = multipart([("Content-Type: text/plain", b"one"), attachment("a.bin", payload)])
    second = multipart(
        [("Content-Type: text/html", b"<p>another text, longer</p>"), attachment("b.bin", payload)],
        subject=b"a different subject line",
    )
    shared = {
        piece
        for piece in set(split_segments(first)) & set(split_segments(second))
        if len(piece) >= MERGE_BELOW
    }
    assert len(shared) == 1
    (piece,) = shared
    assert base64.b64decode(piece) == payload


def test_small_pieces_are_merged() -> None:
    message = b"Subject: x\r\n\r\n" + b"--a\r\n\r\nhi\r\n" * 20
    assert split_segments(message) == [message]


def test_nested_parts_forwarded_messages_and_signature_dashes() -> None:
    inner = b"From: inner@example.org\nSubject: forwarded\n\ntext of the forwarded message\n"
    message = (
        b"From: a@example.com\nSubject: outer\n"
        b'Content-Type: multipart/mixed; boundary="out"\n\n'
        b"--out\n"
        b'Content-Type: multipart/alternative; boundary="out-alt"\n\n'
        b"--out-alt\nContent-Type: text/plain\n\nplain words\n-- \nsignature line\n"
        b"--out-alt\nContent-Type: text/html\n\n<p>html words</p>\n"
        b"--out-alt--\n"
        b"--out\nContent-Type: message/rfc822\n\n" + inner + b"--out\n\n"
        b"a part without headers is plain text\n"
        b"--out--\nepilogue is not text\n"
    )
    got = extract(message)
    assert got.subject == "outer"
    # The HTML alternative of indexed plain text adds nothing.
    assert got.body == (
        "plain words -- signature line text of the forwarded message "
        "a part without headers is plain text"
    )
    assert not got.has_attachment


def test_quoted_printable_and_base64_text_parts_are_decoded() -> None:
    message = multipart(
        [
            (
                "Content-Type: text/plain; charset=iso-8859-1\r\n"
                "Content-Transfer-Encoding: quoted-printable",
                b"caf=E9 cr=\r\n=E8me",
            ),
            (
                "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64",
                base64.encodebytes("base64 Grüße".encode()),
            ),
            (
                "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64",
                b"Y3V0IHNob3J0IGJ1dCBkZWNvZGVk===!!",
            ),
        ]
    )
    got = extract(message)
    assert got.body.startswith("café crème base64 Grüße cut short")


def test_a_charset_naming_a_compression_codec_never_decompresses() -> None:
    """Decompression bomb through the charset: zlib_codec is a Python codec, but not
    a text encoding, so the part is read as UTF-8/Latin-1 octets, never inflated."""
    import zlib

    bomb = zlib.compress(b"A" * (50 * 1024 * 1024))
    message = (
        b"Subject: =?zlib_codec?b?" + base64.b64encode(bomb[:2000]) + b"?=\r\n"
        b"Content-Type: text/plain; charset=zlib_codec\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(bomb)
    )
    tracemalloc.start()
    try:
        got = extract(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "AAAAAAAA" not in got.body
    assert peak < 10 * len(message) + (1 << 20)


def test_a_boundary_that_begins_with_another_is_not_taken_for_it() -> None:
    message = (
        b'Content-Type: multipart/mixed; boundary="b"\n\n'
        b'--b\nContent-Type: multipart/alternative; boundary="b--x"\n\n'
        b"--b--x\nContent-Type: text/plain\n\ninner text\n--b--x--\n"
        b"--b\nContent-Type: text/plain\n\nsecond part\n--b--\n"
    )
    assert extract(message).body == "inner text second part"


def test_named_text_shown_inline_is_indexed_and_named() -> None:
    message = multipart(
        [
            ('Content-Type: text/plain; name="notes.txt"', b"inline notes"),
            ("Content-Type: text/plain\r\nContent-Disposition: attachment", b"attached text"),
        ]
    )
    got = extract(message)
    assert got.body == "inline notes"
    assert got.attachments == ("notes.txt", "")
    assert got.has_attachment


def test_a_line_that_is_no_header_starts_the_body() -> None:
    got = extract(b"Subject: no blank line\nthis is the body\nit: goes on\n")
    assert got.subject == "no blank line"
    assert got.body == "this is the body it: goes on"
