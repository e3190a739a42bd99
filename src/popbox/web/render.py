"""A stored message as the web page shows it: headers, the text part escaped, the HTML
part sanitised for a sandboxed frame, attachments listed and handed out one by one;
and a search snippet with its matches marked.

Everything a message holds is hostile until it is made harmless here. Text is escaped
by the templates (autoescape); the only markup built in Python is ``snippet_markup``'s,
from escaped parts. The HTML part goes through nh3 (ammonia) with an allowlist: no
scripts, no event handlers, no forms, frames or objects, links only to http(s) and
mailto, style attributes only with properties that cannot load anything, and images
only as data: URLs, which ``cid:`` references to the message's own images become;
every remote image is dropped (a tracking pixel loads nothing). The frame it is shown
in (pages_user) adds its own walls: a sandbox without scripts or same-origin and a
Content-Security-Policy of its own.

A message is parsed whole with the stdlib email package, so what is parsed is bounded:
``MAX_VIEW_OCTETS`` of message, ``MAX_PARTS`` parts, ``MAX_DEPTH`` levels of nesting.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from typing import Final
from urllib.parse import quote

import nh3
from markupsafe import Markup, escape

from popbox.archive.base import Snippet

__all__ = [
    "MAX_VIEW_OCTETS",
    "AttachmentInfo",
    "MessageView",
    "attachment_headers",
    "find_attachment",
    "frame_document",
    "parse_message",
    "snippet_markup",
    "view_message",
]

# A message bigger than this is offered as a download only: parsing builds it in
# memory a few times over, and 32 MiB is past the attachment limits of the big mail
# providers (25 MiB at Gmail and Outlook).
MAX_VIEW_OCTETS: Final = 32 * 1024 * 1024
# Real mail has a few dozen parts; a hostile one with thousands only costs us.
MAX_PARTS: Final = 500
# Nested multiparts and forwarded messages: real mail nests a handful of levels.
MAX_DEPTH: Final = 20
# Text shown on the page; the rest is in the raw download.
MAX_TEXT_CHARS: Final = 2 * 1024 * 1024
# HTML handed to the sanitiser: ammonia is linear, but a page of more is unreadable.
MAX_HTML_CHARS: Final = 4 * 1024 * 1024
# One cid: image inlined as a data: URL, and all of them in one message together.
MAX_INLINE_IMAGE: Final = 2 * 1024 * 1024
MAX_INLINE_TOTAL: Final = 8 * 1024 * 1024
# A file name as offered to the browser; file systems take 255 octets.
MAX_FILENAME: Final = 150

# Image types a browser draws without running anything (no SVG: it can hold script).
SAFE_IMAGES: Final = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Types an attachment keeps on download; every other one goes as octet-stream, so
# nothing the browser would render as a page (HTML, SVG, XML) gets that chance.
SAFE_DOWNLOAD_TYPES: Final = SAFE_IMAGES | {"application/pdf", "text/plain"}
SHOWN_HEADERS: Final = ("From", "To", "Cc", "Reply-To", "Date", "Subject", "Message-ID")
# CSS properties kept in style attributes: looks, never anything that can hold url().
STYLE_PROPERTIES: Final = frozenset(
    {
        "color",
        "background-color",
        "font",
        "font-family",
        "font-size",
        "font-style",
        "font-weight",
        "text-align",
        "text-decoration",
        "text-indent",
        "text-transform",
        "line-height",
        "letter-spacing",
        "white-space",
        "vertical-align",
        "width",
        "height",
        "max-width",
        "min-width",
        "margin",
        "margin-top",
        "margin-right",
        "margin-bottom",
        "margin-left",
        "padding",
        "padding-top",
        "padding-right",
        "padding-bottom",
        "padding-left",
        "border",
        "border-top",
        "border-right",
        "border-bottom",
        "border-left",
        "border-color",
        "border-style",
        "border-width",
        "border-collapse",
        "border-spacing",
        "border-radius",
        "display",
    }
)
# What no kept style may contain, whatever its property: ways to load or run things.
_STYLE_DANGER: Final = re.compile(r"url|image|expression|@|\\|behavior|binding|src", re.I)
_DATA_IMAGE: Final = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]+", re.I)
_LINK_SCHEMES: Final = ("http://", "https://", "mailto:")
_UNSAFE_FILENAME: Final = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def snippet_markup(snippet: Snippet) -> Markup:
    """The snippet's text escaped, its matched parts in ``<mark>``."""
    return Markup("").join(
        Markup("<mark>{}</mark>").format(text) if matched else escape(text)
        for text, matched in snippet.parts
    )


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """An attachment as listed: its number in the message (the download URL's), name,
    declared type and decoded size."""

    index: int
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class MessageView:
    headers: tuple[tuple[str, str], ...]
    text: str | None
    text_truncated: bool
    has_html: bool
    attachments: tuple[AttachmentInfo, ...]


def parse_message(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)  # policy.default makes EmailMessages
    return message


def _leaves(message: Message, depth: int = 0) -> Iterator[Message]:
    """The message's leaf parts in order; a forwarded message is one leaf."""
    if message.is_multipart() and depth < MAX_DEPTH:
        payload = message.get_payload()
        if isinstance(payload, list):
            for part in payload:
                if isinstance(part, Message):
                    yield from _leaves(part, depth + 1)
        return
    yield message


def _bounded_leaves(message: Message) -> list[Message]:
    leaves: list[Message] = []
    for leaf in _leaves(message):
        leaves.append(leaf)
        if len(leaves) >= MAX_PARTS:
            break
    return leaves


def _is_body(part: Message, kind: str) -> bool:
    return (
        part.get_content_type() == kind
        and part.get_content_disposition() != "attachment"
        and not part.get_filename()
    )


def _bodies(leaves: list[Message]) -> tuple[Message | None, Message | None]:
    text = next((part for part in leaves if _is_body(part, "text/plain")), None)
    html = next((part for part in leaves if _is_body(part, "text/html")), None)
    return text, html


def _attachment_parts(leaves: list[Message]) -> list[Message]:
    text, html = _bodies(leaves)
    return [part for part in leaves if part is not text and part is not html]


def _payload(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822" or part.is_multipart():
        # A forwarded message (or a multipart past MAX_DEPTH) goes out as it came.
        return part.as_bytes(policy=email.policy.default)
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text_of(part: Message) -> str:
    """A text part decoded by its charset; an unknown charset as UTF-8, loosely."""
    raw = _payload(part)
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


def _header(message: Message, name: str) -> str | None:
    try:
        value = message.get(name)
    except (ValueError, TypeError, IndexError):
        # The email package's header parser raises these on some hostile headers.
        return None
    return None if value is None else str(value)


def _filename(part: Message, index: int) -> str:
    try:
        name = part.get_filename() or ""
    except (ValueError, TypeError, IndexError):
        name = ""
    name = _UNSAFE_FILENAME.sub("_", name).strip(" .")[:MAX_FILENAME]
    if not name and part.get_content_type() == "message/rfc822":
        name = f"message-{index}.eml"
    return name or f"attachment-{index}"


def view_message(data: bytes) -> MessageView:
    """What the message page shows of the message ``data``."""
    message = parse_message(data)
    headers = tuple(
        (name, value) for name in SHOWN_HEADERS if (value := _header(message, name)) is not None
    )
    leaves = _bounded_leaves(message)
    text_part, html_part = _bodies(leaves)
    text = _text_of(text_part) if text_part is not None else None
    truncated = text is not None and len(text) > MAX_TEXT_CHARS
    attachments = tuple(
        AttachmentInfo(index, _filename(part, index), part.get_content_type(), len(_payload(part)))
        for index, part in enumerate(_attachment_parts(leaves), start=1)
    )
    return MessageView(
        headers=headers,
        text=text[:MAX_TEXT_CHARS] if text is not None else None,
        text_truncated=truncated,
        has_html=html_part is not None,
        attachments=attachments,
    )


def find_attachment(data: bytes, index: int) -> tuple[AttachmentInfo, bytes] | None:
    """Attachment ``index`` (1-based, as ``view_message`` numbers them) and its octets."""
    parts = _attachment_parts(_bounded_leaves(parse_message(data)))
    if not 1 <= index <= len(parts):
        return None
    part = parts[index - 1]
    payload = _payload(part)
    info = AttachmentInfo(index, _filename(part, index), part.get_content_type(), len(payload))
    return info, payload


def attachment_headers(info: AttachmentInfo) -> dict[str, str]:
    """Download headers for an attachment: always a download (RFC 6266, the name in
    ASCII and in UTF-8), a type that cannot become a page, no sniffing."""
    ascii_name = info.filename.encode("ascii", "replace").decode().replace("?", "_")
    content_type = (
        info.content_type
        if info.content_type in SAFE_DOWNLOAD_TYPES
        else "application/octet-stream"
    )
    return {
        "content-type": content_type,
        "content-disposition": (
            f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(info.filename)}"
        ),
        "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox",
    }


class _InlineImages:
    """The attribute filter: keeps what is harmless, turns cid: images into data: URLs."""

    def __init__(self, leaves: list[Message]) -> None:
        self._by_cid: dict[str, Message] = {}
        for part in leaves:
            cid = _header(part, "Content-ID")
            if cid:
                self._by_cid.setdefault(cid.strip().strip("<>"), part)
        self._inlined = 0

    def __call__(self, tag: str, attribute: str, value: str) -> str | None:
        if attribute == "style":
            # Declarations that could load or run something go; the rest stay. A ";"
            # inside a quoted url() splits it, but every piece of it still says "url".
            kept = [d for d in value.split(";") if d.strip() and not _STYLE_DANGER.search(d)]
            return ";".join(kept) or None
        if tag == "a" and attribute == "href":
            return value if value.lower().startswith(_LINK_SCHEMES) else None
        if tag == "img" and attribute == "src":
            return self._image(value.strip())
        return value

    def _image(self, src: str) -> str | None:
        if src.lower().startswith("cid:"):
            part = self._by_cid.get(src[4:].strip("<>"))
            if part is None or part.get_content_type() not in SAFE_IMAGES:
                return None
            payload = _payload(part)
            if len(payload) > MAX_INLINE_IMAGE or self._inlined + len(payload) > MAX_INLINE_TOTAL:
                return None
            self._inlined += len(payload)
            encoded = base64.b64encode(payload).decode("ascii")
            return f"data:{part.get_content_type()};base64,{encoded}"
        if _DATA_IMAGE.fullmatch(src) and len(src) <= MAX_INLINE_IMAGE * 4 // 3 + 64:
            return src
        return None  # remote (or any other) images load nothing


def sanitize_html(html: str, leaves: list[Message] | None = None) -> str:
    """``html`` with everything that could run, load or submit removed."""
    allowed_tags = set(nh3.ALLOWED_TAGS) - {"area", "map"}
    attributes = {tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()}
    attributes.setdefault("*", set()).update({"style", "dir", "lang", "title"})
    attributes["font"] = {"color", "face", "size"}
    attributes["td"] = attributes.get("td", set()) | {"bgcolor", "valign", "width", "height"}
    attributes["table"] = attributes.get("table", set()) | {
        "bgcolor",
        "border",
        "cellpadding",
        "cellspacing",
        "width",
    }
    return nh3.clean(
        html[:MAX_HTML_CHARS],
        tags=allowed_tags | {"font"},
        attributes=attributes,
        attribute_filter=_InlineImages(leaves or []),
        url_schemes={"http", "https", "mailto", "cid", "data"},
        filter_style_properties=set(STYLE_PROPERTIES),
        strip_comments=True,
        link_rel="noopener noreferrer",
    )


_FRAME_PAGE: Final = (
    '<!doctype html><html><head><meta charset="utf-8">'
    "<style>body{{font:14px/1.45 system-ui,sans-serif;margin:12px;color:#1f2328;"
    "overflow-wrap:anywhere}}img{{max-width:100%;height:auto}}</style></head>"
    "<body>{body}</body></html>"
)


def frame_document(data: bytes) -> str | None:
    """The sanitised HTML part as a whole document for the message frame (None if
    the message has no HTML part)."""
    leaves = _bounded_leaves(parse_message(data))
    _, html_part = _bodies(leaves)
    if html_part is None:
        return None
    return _FRAME_PAGE.format(body=sanitize_html(_text_of(html_part), leaves))
