"""The messages the browser tests put in the archive: ordinary mail to search, one with
attachments to download, and one whose HTML tries every way to run a script or load
something (each way aimed at a tracker site on loopback, so a load is seen); and
``fill_archive``, which keeps them for alice (and one message for bob)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from support.browser_web import ThreadedWeb

__all__ = [
    "ATTACHMENT_BIN",
    "ATTACHMENT_PDF",
    "ATTACHMENT_SUBJECT",
    "HOSTILE_MARKER",
    "HOSTILE_PATHS",
    "HOSTILE_SUBJECT",
    "PWNED",
    "REMOTE_PIXEL",
    "SCRIPT_RAN_PATH",
    "ZEPPELIN_SUBJECTS",
    "AliceMail",
    "attachment_message",
    "fill_archive",
    "hostile_html",
    "hostile_message",
    "ordinary_messages",
]

# What any script of the hostile message would set, as document.title and as a global.
PWNED = "pwned"
# Markup in a header is text to the page: shown as written, never run.
HOSTILE_SUBJECT = "Invoice 7731 <script>document.title='pwned'</script> overdue"
# Off loopback: the outside-world trap must see no request for it either.
REMOTE_PIXEL = "https://pixel.tracker.example/open.gif"
# Text of the hostile message that the page must show (so the test knows it rendered).
HOSTILE_MARKER = "Please find the overdue invoice below"
# What any script of the hostile message asks the tracker for, from any frame.
SCRIPT_RAN_PATH = "/script-ran"
# Every tracker path the hostile HTML points at: none of them may be requested.
HOSTILE_PATHS = (
    "/external.js",
    "/pixel.gif",
    "/onerror.gif",
    "/srcset.gif",
    "/poster.gif",
    "/input.gif",
    "/style-import.css",
    "/style-url.gif",
    "/inline-style.gif",
    "/link.css",
    "/prefetch",
    "/frame",
    "/object",
    "/embed",
    "/form",
    "/refresh",
    "/base/relative.gif",
    "/audio",
    "/video",
    "/svg-image",
    SCRIPT_RAN_PATH,
)
ATTACHMENT_SUBJECT = "Signed contract and data"
ZEPPELIN_SUBJECTS = frozenset(
    {"Zeppelin project kickoff", "Re: Zeppelin budget", "Zeppelin hangar visit"}
)
# Deterministic attachment contents, so a download can be compared with what was sent.
ATTACHMENT_PDF = b"%PDF-1.4\n" + hashlib.sha256(b"report").digest() * 300 + b"\n%%EOF\n"
ATTACHMENT_BIN = bytes(range(256)) * 17 + b"\x00\xff\r\n.\r\n"

_BASE_DATE = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
# When the messages came into the archive: fixed, so the screenshots of the message
# page come out the same run after run.
ARCHIVED_AT = (_BASE_DATE + timedelta(days=1)).timestamp()


def _message(subject: str, sender: str, to: str, when: datetime) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(when)
    message["Message-ID"] = f"<{hashlib.sha1(subject.encode()).hexdigest()}@example.org>"
    return message


def ordinary_messages(user: str) -> list[bytes]:
    """A dozen everyday messages; three of them speak of the "zeppelin" project."""
    topics = [
        ("Lunch on Friday", "Shall we try the new place on the corner?"),
        ("Zeppelin project kickoff", "The zeppelin project starts on Monday at nine."),
        ("Holiday rota", "Please add your days to the shared sheet."),
        ("Re: Zeppelin budget", "Finance approved the zeppelin budget for next year."),
        ("Printer on floor 3", "It jams again; facilities are on it."),
        ("Quarterly numbers", "Revenue up four percent, costs flat."),
        ("Team photo", "Wear something blue on Thursday."),
        (
            "Zeppelin hangar visit",
            "The bus leaves at eight; bring a zeppelin-proof coat.\n"
            "From the hangar roof you can see the river.",
        ),
        ("Parking permits", "New permits are at reception."),
        ("Code review backlog", "Twelve reviews are waiting for a second reader."),
        ("Fire drill", "Wednesday at eleven, use the east stairs."),
        ("Welcome Dana", "Dana joins the support team today."),
    ]
    out = []
    for number, (subject, body) in enumerate(topics):
        message = _message(
            subject, "Carol Sender <carol@example.org>", user, _BASE_DATE + timedelta(hours=number)
        )
        message.set_content(f"Hello,\n\n{body}\n\nCarol\n")
        out.append(message.as_bytes(policy=SMTP))
    return out


def attachment_message(user: str) -> bytes:
    """A message with a PDF and a binary attachment (names with a space and an accent)."""
    message = _message(ATTACHMENT_SUBJECT, "Legal <legal@example.org>", user, _BASE_DATE)
    message.set_content("Attached: the signed contract and the raw export.\n")
    message.add_alternative(
        "<p>Attached: the <b>signed contract</b> and the raw export.</p>"
        "<table border=1 cellpadding=4><tr><td>Contract</td><td>signed 2 Nov</td></tr>"
        "<tr><td>Export</td><td>4.3 KiB</td></tr></table>",
        subtype="html",
    )
    message.add_attachment(
        ATTACHMENT_PDF, maintype="application", subtype="pdf", filename="signed contract.pdf"
    )
    message.add_attachment(
        ATTACHMENT_BIN, maintype="application", subtype="octet-stream", filename="export-é.bin"
    )
    return message.as_bytes(policy=SMTP)


def hostile_html(tracker: str) -> str:
    """HTML that runs scripts and loads from ``tracker`` (an origin) every way it can.

    Every script sets ``document.title`` and ``window.pwned`` to PWNED and asks
    ``tracker`` for SCRIPT_RAN_PATH; every load asks ``tracker`` for one of
    HOSTILE_PATHS.
    """
    run = f"document.title='{PWNED}';window.{PWNED}=1;new Image().src='{tracker}{SCRIPT_RAN_PATH}'"
    return f"""<html><head>
<base href="{tracker}/base/">
<meta http-equiv="refresh" content="0;url={tracker}/refresh">
<link rel="stylesheet" href="{tracker}/link.css">
<link rel="prefetch" href="{tracker}/prefetch">
<style>@import url("{tracker}/style-import.css");
body {{ background: url("{tracker}/style-url.gif"); }}</style>
<script>{run}</script>
<script src="{tracker}/external.js"></script>
</head>
<body onload="{run}">
<p>{HOSTILE_MARKER}.</p>
<img src="{tracker}/pixel.gif" width="1" height="1">
<img src="x-missing.gif" onerror="{run}">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" srcset="{tracker}/srcset.gif 2x">
<img src="relative.gif">
<img src="{REMOTE_PIXEL}">
<div style="background-image: url('{tracker}/inline-style.gif')">styled</div>
<svg onload="{run}"><image href="{tracker}/svg-image"></image></svg>
<video poster="{tracker}/poster.gif" src="{tracker}/video"></video>
<audio src="{tracker}/audio" autoplay></audio>
<iframe src="{tracker}/frame"></iframe>
<object data="{tracker}/object"></object>
<embed src="{tracker}/embed">
<form id="hostile-form" action="{tracker}/form" method="post">
<input type="image" src="{tracker}/input.gif">
<input name="card" value="4111">
<button id="hostile-submit" type="submit">Pay now</button></form>
<a id="hostile-link" href="javascript:{run}">View invoice</a>
<details open ontoggle="{run}"><summary>details</summary></details>
<p>Kind regards, Accounts</p>
</body></html>"""


def hostile_message(user: str, tracker: str) -> bytes:
    """A message whose HTML part is ``hostile_html(tracker)``, with the same HTML and
    a scripted SVG as attachments (invoice.html, logo.svg)."""
    message = _message(HOSTILE_SUBJECT, "Accounts <accounts@invoices.example>", user, _BASE_DATE)
    message.set_content(f"{HOSTILE_MARKER}.\n<script>{PWNED}()</script>\n")
    message.add_alternative(hostile_html(tracker), subtype="html")
    message.add_attachment(
        hostile_html(tracker).encode(), maintype="text", subtype="html", filename="invoice.html"
    )
    message.add_attachment(
        f'<svg xmlns="http://www.w3.org/2000/svg" onload="{PWNED}()">'
        f'<image href="{tracker}/svg-attachment"/></svg>'.encode(),
        maintype="image",
        subtype="svg+xml",
        filename="logo.svg",
    )
    return message.as_bytes(policy=SMTP)


@dataclass(frozen=True)
class AliceMail:
    """What alice's archive holds: entry ids, and the octets each was added with."""

    ordinary: tuple[int, ...]
    attachments: int
    hostile: int
    octets: dict[int, bytes]


def fill_archive(web: ThreadedWeb, tracker: str) -> AliceMail:
    """alice's archive: a dozen everyday messages, one with attachments, and one whose
    HTML aims everything it can at ``tracker`` (an origin); bob keeps one of his own."""
    octets: dict[int, bytes] = {}

    def keep(message: bytes) -> int:
        entry_id = web.archive("alice", message, received=ARCHIVED_AT)
        octets[entry_id] = message
        return entry_id

    ordinary = tuple(keep(message) for message in ordinary_messages("alice@example.org"))
    attachments = keep(attachment_message("alice@example.org"))
    hostile = keep(hostile_message("alice@example.org", tracker))
    web.archive("bob", ordinary_messages("bob@example.org")[0], received=ARCHIVED_AT)
    return AliceMail(ordinary, attachments, hostile, octets)
