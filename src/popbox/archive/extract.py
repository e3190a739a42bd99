"""What the archive indexes of a message: decoded headers, its text, attachment names.

Any octets come in; an ``Extracted`` always comes out. The MIME structure is walked
here, part by part, over the octets as they lie (a part's body is never copied
unless it is text to index): each header block is unfolded here into a stdlib
compat32 Message, whose helpers read content types and parameters (each call is
guarded), headers are decoded from RFC 2047 and RFC 2231 in any charset Python knows
(an unknown one falls back to UTF-8, then Latin-1, never an error), text/plain parts
are taken as they are and text/html parts turned into text with nh3 (every tag
stripped, script and style contents dropped). A message/rfc822 part is walked as
the message it holds.

Bounded whatever the message: at most ``MAX_PART_TEXT`` octets of each text part and
``MAX_TEXT`` characters in all are indexed, at most ``MAX_PARTS`` parts ``MAX_DEPTH``
deep are looked at, header blocks are read up to ``MAX_PARSED_HEADERS``, and nothing
of a non-text part's body is decoded: an attachment is never opened, so a zip bomb
stays shut.
"""

from __future__ import annotations

import binascii
import codecs
import email.header
import email.utils
import html
import logging
import mmap
import re
import unicodedata
from dataclasses import dataclass, field
from email.message import Message
from email.policy import Compat32
from typing import Final, TypeAlias

import nh3

from popbox.archive.segments import Octets

log = logging.getLogger("popbox.archive")

# What the walk searches in place (a view is copied once into bytes first).
_Findable: TypeAlias = bytes | bytearray | mmap.mmap

__all__ = [
    "MAX_HEADER_TEXT",
    "MAX_PARSED_HEADERS",
    "MAX_PARTS",
    "MAX_PART_TEXT",
    "MAX_TEXT",
    "Extracted",
    "extract",
]

# A header value as shown and indexed: RFC 5322 2.1.1's line limit is 998 octets,
# and a list of recipients past this is noise for a search.
MAX_HEADER_TEXT: Final = 2000
# Octets of one text part that are indexed: a long book's worth of text (notmuch
# indexes whole parts; this keeps a hostile 50 MB "text" part cheap).
MAX_PART_TEXT: Final = 512 * 1024
# Characters of text indexed for one message, all parts together.
MAX_TEXT: Final = 1024 * 1024
# Encoded octets of one text part that are decoded: enough for MAX_PART_TEXT in base64.
MAX_ENCODED_TEXT: Final = MAX_PART_TEXT * 4 // 3 + 4096
# A header block is read up to this; a "header" past it is garbage.
MAX_PARSED_HEADERS: Final = 256 * 1024
# MIME parts looked at, and how deep multiparts may nest, in one message.
MAX_PARTS: Final = 1000
MAX_DEPTH: Final = 50
# Attachment names kept for one message (each bounded like a header).
MAX_ATTACHMENTS: Final = 200

# Control characters other than whitespace: dropped (the index marks matches with some).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_TYPES: Final = _HTML_TYPES | {"text/plain"}
# The blank line that ends a header block.
_BLANK_LINE: Final = re.compile(rb"\r?\n\r?\n")


class _RawHeaders(Compat32):
    """compat32, but header values come back as the raw text (8-bit octets as
    surrogates) rather than a Header object, so one decoder sees them all."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY: Final = _RawHeaders()


@dataclass(frozen=True, slots=True)
class Extracted:
    """What the index holds of one message."""

    sender: str = ""
    recipients: str = ""
    """To and Cc, as one line."""
    subject: str = ""
    message_id: str = ""
    date: float | None = None
    body: str = ""
    """Text of its text/plain and text/html parts, whitespace collapsed."""
    attachments: tuple[str, ...] = ()
    has_attachment: bool = False


def _squash(text: str, limit: int) -> str:
    """Whitespace collapsed to single spaces, other control characters dropped, NFKC
    (what queries are normalised to, popbox.archive.query.normalise, less the case),
    cut to ``limit`` characters."""
    text = " ".join(text[: limit * 2].split())
    if not text.isascii():
        text = unicodedata.normalize("NFKC", _CONTROL.sub("", text))
    elif _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return text[:limit]


def _decode_octets(data: bytes, charset: str | None) -> str:
    """Octets in their declared charset; an unknown or wrong one never fails."""
    if charset:
        try:
            codecs.lookup(charset)
        except (LookupError, ValueError):
            charset = None
        else:
            try:
                return data.decode(charset, "replace")
            except (LookupError, ValueError, TypeError):
                charset = None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _header_text(value: object) -> str:
    """A raw header value decoded (RFC 2047 words, 8-bit octets) and squashed."""
    raw = value if isinstance(value, str) else str(value)
    if not raw.isascii() and any("\udc80" <= char <= "\udcff" for char in raw):
        # Raw 8-bit octets in a header (compat32 keeps them as surrogates).
        raw = _decode_octets(raw.encode("ascii", "surrogateescape"), None)
    text = raw
    if "=?" in raw:
        try:
            text = str(email.header.make_header(email.header.decode_header(raw)))
        except Exception:
            # An unknown charset or a broken word: decode what can be, word by word.
            try:
                chunks = email.header.decode_header(raw)
            except Exception:
                chunks = [(raw, None)]
            text = "".join(
                chunk if isinstance(chunk, str) else _decode_octets(chunk, charset)
                for chunk, charset in chunks
            )
    return _squash(text, MAX_HEADER_TEXT)


def _headers(message: Message, *names: str) -> str:
    values: list[str] = []
    for name in names:
        for value in message.get_all(name, []) or []:
            text = _header_text(value)
            if text:
                values.append(text)
    return _squash(", ".join(values), MAX_HEADER_TEXT)


def _date(message: Message) -> float | None:
    value = message.get("date")
    if value is None:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(_header_text(value))
        return moment.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _filename(part: Message) -> str | None:
    disposition = part.get("content-disposition", "")
    content_type = part.get("content-type", "")
    if "name" not in disposition.lower() and "name" not in content_type.lower():
        return None  # the common case, without parsing parameters
    try:
        name = part.get_filename()
    except Exception:
        return None
    return None if name is None else _header_text(name)


def _html_to_text(markup: str) -> str:
    cleaned = nh3.clean(
        markup, tags=set(), clean_content_tags={"script", "style"}, strip_comments=True
    )
    return html.unescape(cleaned)


def _decode_body(data: bytes, encoding: str) -> bytes:
    """A part's body with its Content-Transfer-Encoding undone, as far as it goes."""
    if encoding == "base64":
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            # Bad padding (a cut or broken body): decode the whole quanta there are.
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            try:
                return binascii.a2b_base64(cleaned[: len(cleaned) // 4 * 4])
            except binascii.Error:
                return b""
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


@dataclass(slots=True)
class _Found:
    """What the walk has found so far, and what it may still take."""

    body: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    has_attachment: bool = False
    text_left: int = MAX_TEXT
    parts_left: int = MAX_PARTS
    top: Message | None = None
    """The message's own headers."""
    plain_parts: int = 0
    """text/plain parts indexed: an HTML alternative after one is the same words."""


def _headers_of(data: _Findable, start: int, end: int) -> tuple[Message, int]:
    """The header block at ``start`` read, and where its body starts."""
    first = bytes(data[start : start + 2])
    if first.startswith(b"\n"):
        return Message(policy=_POLICY), start + 1  # no headers: the defaults
    if first == b"\r\n":
        return Message(policy=_POLICY), start + 2
    limit = min(end, start + MAX_PARSED_HEADERS)
    blank = _BLANK_LINE.search(data, start, limit)
    if blank is not None:
        block_end, body_start = blank.start(), blank.end()
    else:
        # Headers to the end (or garbage past any sane header block): no body.
        block_end = body_start = limit
    block = bytes(data[start:block_end])
    message, stop = _parse_headers(block)
    return message, body_start if stop is None else start + stop


def _parse_headers(block: bytes) -> tuple[Message, int | None]:
    """A header block as a compat32 Message, fields unfolded as RFC 5322 2.2.3 says;
    and where its body starts early if a line that is no header field ends it first
    (as the stdlib parser reads a missing blank line), else None."""
    message = Message(policy=_POLICY)
    name: str | None = None
    value: list[str] = []
    offset = 0
    stop: int | None = None
    for raw in block.decode("ascii", "surrogateescape").split("\n"):
        line = raw.removesuffix("\r")
        if line[:1] in (" ", "\t") and name is not None:
            value.append(line)
            offset += len(raw) + 1
            continue
        if name is not None:
            message.set_raw(name, "\r\n".join(value))
            name = None
        field_name, colon, rest = line.partition(":")
        field_name = field_name.rstrip()
        if not (colon and field_name and " " not in field_name):
            stop = offset
            break
        name, value = field_name, [rest.lstrip(" \t")]
        offset += len(raw) + 1
    if name is not None:
        message.set_raw(name, "\r\n".join(value))
    return message, stop


def _parts(data: _Findable, boundary: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) of each part between the delimiter lines of ``boundary``."""
    marker = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    position = start
    while position < end:
        found = data.find(marker, position, end)
        if found < 0:
            break
        position = found + len(marker)
        if found != start and data[found - 1 : found] != b"\n":
            continue
        line_end = data.find(b"\n", position, end)
        line_end = end if line_end < 0 else line_end + 1
        rest = bytes(data[position:line_end])
        closing = rest.startswith(b"--") and not rest[2:].strip()
        if rest.strip() and not closing:
            continue  # a longer boundary that begins with this one
        if part_start is not None:
            # The line end before a delimiter belongs to it (RFC 2046 5.1.1).
            part_end = found - (2 if data[found - 2 : found] == b"\r\n" else 1)
            parts.append((part_start, max(part_start, part_end)))
        if closing:
            return parts
        part_start = line_end
        position = line_end
    if part_start is not None and part_start < end:
        parts.append((part_start, end))
    return parts


def _walk(
    data: _Findable, start: int, end: int, depth: int, found: _Found, skip_html: bool = False
) -> Message:
    """Walk the entity at ``start``: its parts, its text, its attachments' names.
    ``skip_html``: an HTML alternative of plain text already indexed adds no words."""
    headers, body_start = _headers_of(data, start, end)
    if found.top is None:
        found.top = headers
    found.parts_left -= 1
    try:
        content_type = headers.get_content_type()
        disposition = headers.get_content_disposition()
    except Exception:
        # Headers too broken to read: neither text nor a named attachment.
        content_type, disposition = "application/octet-stream", None
    if content_type.startswith("multipart/") and depth < MAX_DEPTH:
        try:
            boundary = headers.get_boundary()
        except Exception:
            boundary = None
        if boundary:
            encoded = boundary.encode("utf-8", "surrogateescape")
            alternative = content_type == "multipart/alternative"
            plain_before = found.plain_parts
            for part_start, part_end in _parts(data, encoded, body_start, end):
                if found.parts_left <= 0:
                    break
                skip = alternative and found.plain_parts > plain_before
                _walk(data, part_start, part_end, depth + 1, found, skip)
        return headers
    if content_type == "message/rfc822" and depth < MAX_DEPTH and disposition != "attachment":
        _walk(data, body_start, end, depth + 1, found)
        return headers
    name = _filename(headers)
    if disposition == "attachment" or name is not None:
        found.has_attachment = True
        if len(found.names) < MAX_ATTACHMENTS:
            found.names.append(name or "")
        if disposition == "attachment" or content_type not in _TEXT_TYPES:
            return headers
        # Text not marked as an attachment that has a file name all the same: mail
        # clients show it inline, so its words are the message's.
    if skip_html and content_type in _HTML_TYPES:
        return headers
    if content_type in _TEXT_TYPES and found.text_left > 0:
        encoding = str(headers.get("content-transfer-encoding", "")).strip().lower()
        raw = bytes(data[body_start : min(end, body_start + MAX_ENCODED_TEXT)])
        try:
            charset = headers.get_content_charset()
        except Exception:
            charset = None
        text = _decode_octets(_decode_body(raw, encoding)[:MAX_PART_TEXT], charset)
        if content_type in _HTML_TYPES:
            text = _html_to_text(text)
        text = _squash(text, found.text_left)
        if text:
            found.body.append(text)
            found.text_left -= len(text) + 1
            found.plain_parts += content_type == "text/plain"
    return headers


def extract(data: Octets) -> Extracted:
    """What the index keeps of ``data``; never raises for any octets."""
    # One copy of a view; callers with a file hand over its mapping itself.
    whole = data.tobytes() if isinstance(data, memoryview) else data
    found = _Found()
    try:
        _walk(whole, 0, len(whole), 0, found)
    except Exception:
        # Whatever a hostile message trips in the stdlib's header helpers: index what
        # the walk found before it (the top headers are read first of all).
        log.debug("message only partly indexed", exc_info=True)
    message = found.top if found.top is not None else Message(policy=_POLICY)
    return Extracted(
        sender=_headers(message, "from"),
        recipients=_headers(message, "to", "cc"),
        subject=_headers(message, "subject"),
        message_id=_headers(message, "message-id"),
        date=_date(message),
        body=" ".join(found.body),
        attachments=tuple(found.names),
        has_attachment=found.has_attachment,
    )
