"""Dovecot's pop3_uidl_format, read and expanded as Dovecot 2.3's var_expand does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popbox.migrate.template import DEFAULT_UIDL_FORMAT, TemplateError, UidlTemplate, UidlVariables

VARS = UidlVariables(uid=1, uidvalidity=1700000000, filename="1700.M1P2.host,S=12", guid="g-1")

uids = st.integers(min_value=1, max_value=0xFFFFFFFE)


@given(uid=uids, uidvalidity=uids)
def test_the_default_is_eight_lowercase_hex_digits_of_uid_then_uidvalidity(
    uid: int, uidvalidity: int
) -> None:
    rendered = UidlTemplate(DEFAULT_UIDL_FORMAT).render(
        UidlVariables(uid=uid, uidvalidity=uidvalidity, filename="f")
    )
    assert rendered == f"{uid:08x}{uidvalidity:08x}"


def test_known_dovecot_uidl() -> None:
    # What Dovecot 2.3 shows for UID 1 in a folder of UIDVALIDITY 1700000000.
    assert UidlTemplate("%08Xu%08Xv").render(VARS) == "000000016553f100"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("%u", "1"),
        ("%{uid}-%{uidvalidity}", "1-1700000000"),
        ("%v.%u", "1700000000.1"),
        ("%f", "1700.M1P2.host,S=12"),
        ("%g", "g-1"),
        ("%Uf", "1700.M1P2.HOST,S=12"),
        ("%Xv", "6553f100"),
        ("%XUv", "6553F100"),
        ("%UXv", "6553f100"),
        ("%4f", "1700"),
        ("%.4f", "1700"),
        ("%4.2f", ".M"),
        ("%-3.2f", "=1"),
        ("%05u", "00001"),
        ("%Rf", "21=S,tsoh.2P1M.0071"),
        ("100%%", "100%"),
        ("%Mu", "c4ca4238a0b923820dcc509a6f75849b"),
    ],
)
def test_width_offset_and_modifiers_follow_var_expand(template: str, expected: str) -> None:
    assert UidlTemplate(template).render(VARS) == expected


def test_guid_defaults_to_the_base_file_name() -> None:
    variables = UidlVariables(uid=1, uidvalidity=2, filename="base")
    assert UidlTemplate("%g").render(variables) == "base"


def test_md5_is_refused_where_the_source_has_none() -> None:
    with pytest.raises(TemplateError, match="md5"):
        UidlTemplate("%m").render(VARS)


@pytest.mark.parametrize(
    "template", ["%q", "%{hostname}", "%{uid | hex(8)}", "%08X", "%{uid", "%Hu"]
)
def test_templates_dovecot_would_not_expand_for_uidls_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        UidlTemplate(template)


@given(st.text(max_size=40))
def test_any_template_either_parses_or_says_why(template: str) -> None:
    try:
        parsed = UidlTemplate(template)
    except TemplateError:
        return
    rendered = parsed.render(
        UidlVariables(uid=7, uidvalidity=9, filename="name", guid="guid", md5="ab" * 16)
    )
    assert isinstance(rendered, str)
    if "%" not in template:
        assert rendered == template
