"""How mail gets in: the LMTP listener, the local delivery agent, recipients and quotas.

``LmtpService`` runs inside ``popbox serve``; ``run_lda`` is ``popbox deliver``; both
hand every message to the one ``Deliverer``, as does the collector's popbox sink.

The names below load on first use: ``popbox deliver`` runs once per message under an
MTA and must not pay for aiosmtpd, which only the LMTP listener needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from popbox.delivery.deliverer import (
        Delivered,
        Deliverer,
        ResolvedRecipient,
        trace_headers,
    )
    from popbox.delivery.lda import run_lda
    from popbox.delivery.lmtp import LmtpService, reply_for_error
    from popbox.delivery.recipients import Recipient, parse_recipient

__all__ = [
    "Delivered",
    "Deliverer",
    "LmtpService",
    "Recipient",
    "ResolvedRecipient",
    "parse_recipient",
    "reply_for_error",
    "run_lda",
    "trace_headers",
]

# Each public name and the module under popbox.delivery that defines it.
_HOMES: dict[str, str] = {
    "Delivered": "deliverer",
    "Deliverer": "deliverer",
    "ResolvedRecipient": "deliverer",
    "trace_headers": "deliverer",
    "run_lda": "lda",
    "LmtpService": "lmtp",
    "reply_for_error": "lmtp",
    "Recipient": "recipients",
    "parse_recipient": "recipients",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
