"""What the archive indexes of a message: decoded headers, its text, attachment names.

Any octets come in; an ``Extracted`` always comes out. The parts that matter are
read with the stdlib email package (compat32, which never raises on what it parses;
every decoding step after it is guarded), headers are decoded from RFC 2047 and
RFC 2231 in any charset Python knows (an unknown one falls back to UTF-8, then
Latin-1, never an error), text/plain parts are taken as they are and text/html parts
turned into text with nh3 (every tag stripped, script and style contents dropped).

Bounded whatever the message: the parser sees the message with every part's body cut
to ``MAX_PARSED_PIECE`` octets and all bodies together to ``MAX_PARSED_TOTAL`` (cut
where popbox.archive.segments cuts, so the MIME structure around them survives), at
most ``MAX_PART_TEXT`` octets of each text part and ``MAX_TEXT`` characters in all
are indexed, at most ``MAX_PARTS`` parts are looked at, and nothing else of a
non-text part is decoded: an attachment is never opened, so a zip bomb stays shut.
"""

from __future__ import annotations

import codecs
import email.header
import email.utils
import html
import re
import unicodedata
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from typing import Final

import nh3

from popbox.archive.segments import Octets, raw_pieces

__all__ = [
    "MAX_HEADER_TEXT",
    "MAX_PARSED_PIECE",
    "MAX_PARSED_TOTAL",
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
# Octets of one part's body the parser is given: enough for MAX_PART_TEXT in base64.
MAX_PARSED_PIECE: Final = MAX_PART_TEXT * 4 // 3 + 4096
# Octets of all bodies the parser is given together.
MAX_PARSED_TOTAL: Final = 4 * 1024 * 1024
# Header blocks handed to the parser whole up to this; a "header" past it is garbage.
MAX_PARSED_HEADERS: Final = 256 * 1024
# MIME parts looked at, and how deep multiparts may nest, in one message.
MAX_PARTS: Final = 1000
MAX_DEPTH: Final = 50
# Attachment names kept for one message (each bounded like a header).
MAX_ATTACHMENTS: Final = 200

_SPACE: Final = re.compile(r"\s+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
# A header block naming a content type whose body is never indexed.
_NOT_TEXT: Final = re.compile(
    rb"^content-type:[ \t]*(?!text/|multipart/|message/|application/xhtml)[^\s;]", re.I | re.M
)


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
    """Whitespace collapsed to single spaces, other control characters dropped (the
    index marks matches with some), NFKC (what queries are normalised to,
    popbox.archive.query.normalise, less the case), cut to ``limit`` characters."""
    text = _CONTROL.sub("", _SPACE.sub(" ", text)).strip()
    return unicodedata.normalize("NFKC", text)[:limit]


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
    if any("\udc80" <= char <= "\udcff" for char in raw):
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


def _part_text(part: Message, content_type: str) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = _decode_octets(payload[:MAX_PART_TEXT], charset)
    if content_type in _HTML_TYPES:
        text = _html_to_text(text)
    return text


def _for_parser(data: Octets) -> bytes:
    """The message as the parser should see it: headers and boundaries whole, the
    body of a part whose headers name a type that is not text left out (its name is
    in its headers), every other body cut short (MAX_PARSED_PIECE each,
    MAX_PARSED_TOTAL together), so an attachment costs nothing and the structure
    survives."""
    view = memoryview(data).cast("B")
    kept: list[bytes] = []
    budget = MAX_PARSED_TOTAL
    skip_body = False
    for piece in raw_pieces(view):
        size = piece.end - piece.start
        if not piece.body:
            take = min(size, MAX_PARSED_HEADERS)
            chunk = bytes(view[piece.start : piece.start + take])
            skip_body = _NOT_TEXT.search(chunk) is not None
        else:
            take = 0 if skip_body else min(size, MAX_PARSED_PIECE, budget)
            budget -= take
            chunk = bytes(view[piece.start : piece.start + take])
        if take < size and chunk and not chunk.endswith(b"\n"):
            # Keep the next boundary at a line start.
            chunk += b"\n"
        kept.append(chunk)
    return b"".join(kept)


def _walk(message: Message) -> list[Message]:
    """The leaf parts in order, iteratively, at most MAX_PARTS, MAX_DEPTH deep."""
    leaves: list[Message] = []
    stack: list[tuple[Message, int]] = [(message, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        payload = part.get_payload()
        if isinstance(payload, list):
            if depth < MAX_DEPTH:
                children = [child for child in payload if isinstance(child, Message)]
                stack.extend((child, depth + 1) for child in reversed(children))
        else:
            leaves.append(part)
    return leaves


def extract(data: Octets) -> Extracted:
    """What the index keeps of ``data``; never raises for any octets."""
    try:
        message = BytesParser(policy=_POLICY).parsebytes(_for_parser(data))
    except (RecursionError, MemoryError, ValueError, TypeError, LookupError):
        return Extracted()
    body: list[str] = []
    budget = MAX_TEXT
    names: list[str] = []
    has_attachment = False
    try:
        leaves = _walk(message)
    except RecursionError:
        leaves = []
    for part in leaves:
        try:
            content_type = part.get_content_type()
            disposition = part.get_content_disposition()
        except Exception:
            # Headers too broken to read: neither text nor a named attachment.
            content_type, disposition = "application/octet-stream", None
        name = _filename(part)
        if disposition == "attachment" or name is not None:
            has_attachment = True
            if len(names) < MAX_ATTACHMENTS:
                names.append(name or "")
            continue
        if budget > 0 and (content_type == "text/plain" or content_type in _HTML_TYPES):
            text = _squash(_part_text(part, content_type), budget)
            if text:
                body.append(text)
                budget -= len(text) + 1
    return Extracted(
        sender=_headers(message, "from"),
        recipients=_headers(message, "to", "cc"),
        subject=_headers(message, "subject"),
        message_id=_headers(message, "message-id"),
        date=_date(message),
        body=" ".join(body),
        attachments=tuple(names),
        has_attachment=has_attachment,
    )
