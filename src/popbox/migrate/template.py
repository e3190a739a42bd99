"""Dovecot's ``pop3_uidl_format``: the template its POP3 server made each UIDL from.

The grammar is Dovecot 2.3's ``var_expand`` (src/lib/var-expand.c), the one every
``pop3_uidl_format`` in the field was written in: ``%`` then an optional ``-``, an
optional ``0`` (zero padding), a width, optionally ``.`` and a second number (the
first is then an offset), any modifiers, and a variable, either one letter or a
``{long name}``. The variables of a POP3 UIDL are::

    %u %{uid}          the message's IMAP UID (decimal)
    %v %{uidvalidity}  the folder's UIDVALIDITY (decimal)
    %m %{md5}          the MD5 of the header (hex; Dovecot offers it only on mbox)
    %f %{filename}     the Maildir base file name (up to ':')
    %g %{guid}         the message GUID (the uidlist's G field, else the base name)
    %%                 a percent sign

Modifiers apply in order: X (a decimal number as lowercase hex: ``%08Xu`` is the
default's eight hex digits), L and U (case), R (reverse), T (trim trailing space),
M (MD5 of the value, hex), E (backslash-escape ``\\``, ``"`` and ``'``). A zero-padded
width pads on the left and never cuts; a plain width cuts to that many characters.
Dovecot 2.4's new ``%{uid | hex(8)}`` syntax is not read: such a template is refused
with the reason, never guessed at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_UIDL_FORMAT",
    "TemplateError",
    "UidlTemplate",
    "UidlVariables",
]

# Dovecot's default pop3_uidl_format (2.0 to 2.3): UID and UIDVALIDITY, 8 hex digits each.
DEFAULT_UIDL_FORMAT: Final = "%08Xu%08Xv"
# var-expand.c's MAX_MODIFIER_COUNT: at most this many modifiers per variable.
MAX_MODIFIERS: Final = 10

_SHORT: Final = {"u": "uid", "v": "uidvalidity", "m": "md5", "f": "filename", "g": "guid"}
_LONG: Final = frozenset(_SHORT.values())


class TemplateError(ValueError):
    """The template cannot be read, or names what a POP3 UIDL never had."""


@dataclass(frozen=True, slots=True)
class UidlVariables:
    """What one message offers the template (None: this source does not know it)."""

    uid: int
    uidvalidity: int
    filename: str
    guid: str | None = None
    md5: str | None = None

    def lookup(self, name: str) -> str:
        value: object
        if name == "guid":
            value = self.guid if self.guid is not None else self.filename
        else:
            value = getattr(self, name)
        if value is None:
            raise TemplateError(f"the template uses %{{{name}}}, which this mailbox does not have")
        return str(value)


def _hex(value: str) -> str:
    # m_str_hex: str_to_ullong, 0 when the value is not a number.
    return format(int(value), "x") if value.isdigit() and value.isascii() else "0"


def _escape(value: str) -> str:
    return "".join("\\" + char if char in "\\\"'" else char for char in value)


_MODIFIERS: Final[Mapping[str, Callable[[str], str]]] = {
    "L": str.lower,
    "U": str.upper,
    "E": _escape,
    "X": _hex,
    "R": lambda value: value[::-1],
    "M": lambda value: hashlib.md5(
        value.encode("utf-8", "surrogateescape"), usedforsecurity=False
    ).hexdigest(),
    "T": str.rstrip,
}
# Dovecot's modifiers that no POP3 UIDL format uses (hashes modulo a width, LDAP DNs):
# refused by name rather than computed differently from Dovecot.
_UNSUPPORTED_MODIFIERS: Final = frozenset("HND")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    modifiers: tuple[Callable[[str], str], ...]
    offset: int
    width: int
    zero_padding: bool

    def render(self, value: str) -> str:
        for modifier in self.modifiers:
            value = modifier(value)
        if self.offset < 0:
            value = value[self.offset :] if len(value) > -self.offset else value
        else:
            value = value[self.offset :]
        if self.width == 0:
            return value
        if not self.zero_padding:
            width = self.width if self.width > 0 else max(len(value) + self.width, 0)
            return value[:width]
        return value.rjust(self.width, "0")


class UidlTemplate:
    """A parsed ``pop3_uidl_format``; ``render`` makes one message's UIDL."""

    def __init__(self, template: str) -> None:
        self.template = template
        self._parts: list[str | _Field] = _parse(template)
        self.names = frozenset(part.name for part in self._parts if isinstance(part, _Field))

    def render(self, variables: UidlVariables) -> str:
        return "".join(
            part if isinstance(part, str) else part.render(variables.lookup(part.name))
            for part in self._parts
        )

    def __repr__(self) -> str:
        return f"UidlTemplate({self.template!r})"


def _number(text: str, at: int) -> tuple[int, int]:
    start = at
    while at < len(text) and text[at].isdigit() and text[at].isascii():
        at += 1
    return (int(text[start:at]) if at > start else 0), at


def _parse(template: str) -> list[str | _Field]:
    parts: list[str | _Field] = []
    literal: list[str] = []
    at = 0
    while at < len(template):
        char = template[at]
        at += 1
        if char != "%":
            literal.append(char)
            continue
        sign = 1
        if template.startswith("-", at):
            sign, at = -1, at + 1
        zero = template.startswith("0", at)
        at += zero
        width, at = _number(template, at)
        offset = 0
        if template.startswith(".", at):
            offset, width, at = sign * width, 0, at + 1
            sign = 1
            zero = template.startswith("0", at)
            at += zero
            if template.startswith("-", at):
                sign, at = -1, at + 1
            width, at = _number(template, at)
            width *= sign
        modifiers: list[Callable[[str], str]] = []
        while at < len(template) and template[at] in _MODIFIERS and len(modifiers) < MAX_MODIFIERS:
            modifiers.append(_MODIFIERS[template[at]])
            at += 1
        if at >= len(template):
            raise TemplateError(f"{template!r} ends inside a %-variable")
        key = template[at]
        if key in _UNSUPPORTED_MODIFIERS:
            raise TemplateError(f"{template!r}: modifier {key} is not supported for UIDLs")
        if key == "{":
            end = template.find("}", at)
            if end < 0:
                raise TemplateError(f"{template!r}: '{{' without '}}'")
            name = template[at + 1 : end].strip()
            at = end + 1
            if name not in _LONG:
                raise TemplateError(
                    f"{template!r}: %{{{name}}} is not a UIDL variable "
                    f"(Dovecot 2.4 filters such as '| hex' are not read; use %08Xu style)"
                )
        else:
            at += 1
            if key == "%":
                literal.append("%")
                continue
            if key not in _SHORT:
                raise TemplateError(f"{template!r}: %{key} is not a UIDL variable")
            name = _SHORT[key]
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_Field(name, tuple(modifiers), offset, width, zero))
    if literal:
        parts.append("".join(literal))
    return parts
