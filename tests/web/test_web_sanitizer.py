"""The HTML sanitiser and the message reader against hostile input, each case named
after the trick it tries (no server: these are the pure functions under the pages)."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from popbox.web.render import (
    MAX_DEPTH,
    MAX_PARTS,
    attachment_headers,
    find_attachment,
    frame_document,
    sanitize_html,
    view_message,
)

TRICKS = {
    "script_tag": "<script>alert(1)</script>",
    "script_in_svg": "<svg><script>alert(1)</script></svg>",
    "event_handler": '<img src="data:image/png;base64,AA==" onerror="alert(1)">',
    "javascript_link": '<a href="javascript:alert(1)">x</a>',
    "javascript_link_with_spaces": '<a href=" jav&#x09;ascript:alert(1)">x</a>',
    "data_html_link": '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    "vbscript_link": '<a href="vbscript:msgbox(1)">x</a>',
    "remote_image": '<img src="https://tracker.example/p.gif">',
    "protocol_relative_image": '<img src="//tracker.example/p.gif">',
    "srcset_image": '<img srcset="https://tracker.example/p.gif 1x">',
    "svg_data_image": '<img src="data:image/svg+xml;base64,PHN2Zy8+">',
    "css_url": '<p style="background:url(https://tracker.example/p.gif)">x</p>',
    "css_escaped_url": '<p style="background:\\75rl(https://tracker.example/p.gif)">x</p>',
    "css_import": "<style>@import 'https://tracker.example/x.css';</style>",
    "css_expression": '<p style="width: expression(alert(1))">x</p>',
    "link_stylesheet": '<link rel="stylesheet" href="https://tracker.example/x.css">',
    "meta_refresh": '<meta http-equiv="refresh" content="0;url=https://evil.example/">',
    "base_href": '<base href="https://evil.example/">',
    "form_phish": '<form action="https://evil.example/"><input name="pw"></form>',
    "iframe": '<iframe src="https://evil.example/"></iframe>',
    "object_embed": '<object data="https://evil.example/x"></object><embed src="x">',
    "background_attribute": '<table background="https://tracker.example/bg.gif"><tr><td>x',
    "video_poster": '<video poster="https://tracker.example/p.gif"></video>',
    "math_href": '<math href="javascript:alert(1)"><mi>x</mi></math>',
    "noscript_mutation": '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_sanitiser_defeats(trick: str) -> None:
    clean = sanitize_html(f"<p>before</p>{TRICKS[trick]}<p>after</p>").lower()
    for banned in (
        "<script",
        "onerror",
        "javascript",
        "vbscript",
        "tracker.example",
        "evil.example",
        "<form",
        "<input",
        "<iframe",
        "<object",
        "<embed",
        "<base",
        "<meta",
        "<link",
        "url(",
        "expression",
        "data:text",
        "data:image/svg",
        "srcset",
        "<style",
        "@import",
    ):
        assert banned not in clean, (trick, banned, clean)
    assert "before" in clean
    assert "after" in clean


def test_sanitiser_keeps_what_mail_looks_like() -> None:
    clean = sanitize_html(
        '<table width="600" cellpadding="4"><tr><td bgcolor="#eeeeee">'
        '<font color="#333333" face="Arial">Hello</font>'
        '<p style="color: #123456; font-weight: bold; margin: 0">Bold</p>'
        '<a href="https://example.org/a">link</a> <a href="mailto:x@example.org">mail</a>'
        "</td></tr></table>"
    )
    assert 'width="600"' in clean
    assert 'bgcolor="#eeeeee"' in clean
    assert '<font color="#333333" face="Arial">' in clean
    assert "color:#123456" in clean.replace(" ", "")
    assert 'href="https://example.org/a"' in clean
    assert 'href="mailto:x@example.org"' in clean


def _nested(depth: int) -> bytes:
    inner = EmailMessage()
    inner.set_content("deep text\n")
    for _ in range(depth):
        outer = EmailMessage()
        outer.make_mixed()
        outer.attach(inner)
        inner = outer
    inner["Subject"] = "nested"
    return inner.as_bytes()


def test_nesting_bomb_is_read_to_a_bounded_depth() -> None:
    view = view_message(_nested(MAX_DEPTH * 3))
    assert view.text is None  # the text lies past the depth that is read
    assert len(view.attachments) == 1  # the rest is one opaque part


def test_part_bomb_lists_a_bounded_number_of_parts() -> None:
    message = EmailMessage()
    message.set_content("text\n")
    for number in range(MAX_PARTS + 100):
        message.add_attachment(
            b"x", maintype="application", subtype="octet-stream", filename=f"f{number}.bin"
        )
    view = view_message(message.as_bytes())
    assert len(view.attachments) == MAX_PARTS - 1
    assert find_attachment(message.as_bytes(), MAX_PARTS + 50) is None


def test_header_injection_in_an_attachment_name_stays_in_its_header() -> None:
    raw = (
        b"From: x@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n"
        b"--b\r\nContent-Type: text/html\r\n"
        b"Content-Disposition: attachment;\r\n"
        b" filename*=UTF-8''a%22%3B%20filename%3Devil.html%0D%0AX-Evil%3A%201.html\r\n\r\n"
        b"<script>alert(1)</script>\r\n--b--\r\n"
    )
    found = find_attachment(raw, 1)
    assert found is not None
    headers = attachment_headers(found[0])
    disposition = headers["content-disposition"]
    assert "\r" not in disposition
    assert "\n" not in disposition
    assert disposition.count('"') == 2
    assert headers["content-type"] == "application/octet-stream"


def test_unknown_charset_and_broken_encoding_still_show() -> None:
    raw = (
        b"From: x@example.org\r\nSubject: =?x-unknown?q?caf=E9?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-unknown\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n"
    )
    view = view_message(raw)
    assert view.text is not None
    assert frame_document(raw) is None
