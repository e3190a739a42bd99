"""Turn an envelope recipient (``RCPT TO`` or ``popbox deliver USER``) into a user name.

The rules follow Dovecot's LMTP with ``auth_username_format = %Ln``, the usual setup
for a single-domain mailbox server behind an MTA:

* ``alice`` (no domain) names the user ``alice``.
* ``alice@example.org`` names ``alice`` when ``example.org`` is one of
  ``lmtp.domains`` (compared case-insensitively). With *no* domains configured every
  domain is accepted and stripped, as Dovecot does: the MTA in front (Postfix's
  ``virtual_mailbox_domains``) already decided which domains it hands to us, and
  repeating that list in two places only lets them disagree.
* A recipient delimiter cuts off the detail: ``alice+lists@example.org`` is ``alice``.
  Every character of ``lmtp.recipient_delimiter`` is a delimiter (Dovecot 2.3 and
  Postfix 2.11 allow several, e.g. ``+-``); the cut is at the first one. An empty
  setting turns detail addresses off.
* Local parts are lowercased when ``lmtp.lowercase_local_part`` is set (the default):
  RFC 5321 lets the receiving side decide, and people type ``Alice@``.
* A quoted local part (``"alice"@example.org``) is unquoted first (RFC 5321 section
  4.1.2), so ``"alice"`` and ``alice`` are the same mailbox.
* Virtual users named with their domain (``alice@example.org`` in the passwd file,
  Dovecot's ``auth_username_format = %Lu``, for ``mail_location`` with ``%d/%n``):
  ``qualified`` is the user part with the lower-cased domain, and the Deliverer
  looks that name up first, then the bare user part.

The result is then checked with ``popbox.auth.validate_username``, the one definition
of a user name: a name that can never be a user (a path trick, a control character,
a ``:`` that would break the passwd file) is refused here, before any user database
or mail store sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from popbox.auth.names import is_valid_username, validate_username
from popbox.config import LmtpSettings
from popbox.errors import UnknownRecipient

__all__ = ["MAX_ADDRESS_LENGTH", "Recipient", "parse_recipient", "split_address"]

# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets including the brackets.
MAX_ADDRESS_LENGTH: Final = 254


@dataclass(frozen=True, slots=True)
class Recipient:
    """One envelope recipient, taken apart.

    ``address`` is the recipient as the MTA gave it (it goes into ``Delivered-To``),
    ``user`` the user name it maps to, ``detail`` the part after the delimiter
    (``lists`` in ``alice+lists@...``; empty when there is none), ``qualified`` the
    user name with the domain (``alice@example.org``; "" without a domain or when
    that can be no user name).
    """

    address: str
    user: str
    domain: str
    detail: str
    qualified: str = ""


def _unquote(quoted: str) -> str:
    """The content of an RFC 5321 Quoted-string (without its quotes), escapes undone."""
    out: list[str] = []
    escaped = False
    for char in quoted:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            raise UnknownRecipient("malformed quoted local part")
        else:
            out.append(char)
    if escaped:
        raise UnknownRecipient("malformed quoted local part")
    return "".join(out)


def split_address(address: str) -> tuple[str, str]:
    """Split ``local@domain`` into its local part (unquoted) and domain.

    Accepts angle brackets and an RFC 5321 source route (``<@relay:user@domain>``),
    which MTAs still send now and then and which only the last hop matters for.
    A bare name has an empty domain.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    if text.startswith('"'):
        end = 1
        while end < len(text):
            if text[end] == "\\":
                end += 2
                continue
            if text[end] == '"':
                break
            end += 1
        if end >= len(text):
            raise UnknownRecipient(f"unterminated quoted local part in {address!r}")
        local = _unquote(text[1:end])
        rest = text[end + 1 :]
        if rest and not rest.startswith("@"):
            raise UnknownRecipient(f"malformed address {address!r}")
        domain = rest[1:]
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            local, domain = text, ""
    return local, domain


def parse_recipient(address: str, settings: LmtpSettings) -> Recipient:
    """Map one envelope recipient to a user name under the configured rules.

    Raises UnknownRecipient for an address that is not ours (wrong domain, malformed)
    and InvalidUsername for one whose local part can never name a user.
    """
    if len(address) > MAX_ADDRESS_LENGTH + 2:
        raise UnknownRecipient("address too long")
    local, domain = split_address(address)
    if domain:
        wanted = {d.strip().lower().rstrip(".") for d in settings.domains}
        if wanted and domain.lower().rstrip(".") not in wanted:
            raise UnknownRecipient(f"domain {domain!r} is not handled here")
    if settings.lowercase_local_part:
        local = local.lower()
    user, detail = local, ""
    delimiters = settings.recipient_delimiter
    if delimiters:
        cut = next((i for i, char in enumerate(local) if char in delimiters), -1)
        # A delimiter in first place leaves no user at all ("+tag@"); Postfix and
        # Dovecot keep such a local part whole rather than map it to nobody.
        if cut > 0:
            user, detail = local[:cut], local[cut + 1 :]
    qualified = f"{user}@{domain.lower().rstrip('.')}" if domain else ""
    return Recipient(
        address=address,
        user=validate_username(user),
        domain=domain,
        detail=detail,
        qualified=qualified if qualified and is_valid_username(qualified) else "",
    )
