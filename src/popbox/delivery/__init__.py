"""How mail gets in: the LMTP listener, the local delivery agent, recipients and quotas.

``LmtpService`` runs inside ``popbox serve``; ``run_lda`` is ``popbox deliver``; both
hand every message to the one ``Deliverer``.
"""

from __future__ import annotations

from popbox.delivery.deliverer import Delivered, Deliverer, ResolvedRecipient, trace_headers
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
