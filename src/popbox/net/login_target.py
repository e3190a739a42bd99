"""What a login asks to open: its name read by the grammar, settled with the user database.

The grammar (net.login_names) is pure; two questions only the user database answers
are settled here, before the password check: whether ``alice+invoices`` is a user of
that name rather than alice's folder (a user of the name wins), and, for a member's
login (``support*bob``, or SASL PLAIN's authzid), whose mailbox it is. The database
is asked whatever the answers, so such a login costs the same whether the mailbox
exists or not.
"""

from __future__ import annotations

from popbox.auth.base import PassDB, UserRecord
from popbox.errors import InvalidUsername
from popbox.net.login import LoginEvent, VerifiedLogin
from popbox.net.login_names import LoginGrammar, LoginName
from popbox.proto.events import LoginRequest

__all__ = ["read_login"]


async def read_login(
    grammar: LoginGrammar, passdb: PassDB, event: LoginEvent
) -> tuple[LoginName | None, UserRecord | None]:
    """The login's reading (None: it can be no login) and, for a member's login, the
    shared mailbox's user (None if there is none). AuthError if the database cannot
    be asked."""
    text = event.username
    if isinstance(event, LoginRequest | VerifiedLogin) and event.authzid:
        # RFC 4616's authzid: the mailbox to open as the member ``username``, which is
        # what MAILBOX*MEMBER says, and nothing when shared logins are off.
        separator = grammar.master_separator
        if not separator:
            return None, None
        text = f"{event.authzid}{separator}{text}"
    try:
        name = grammar.parse(text)
    except InvalidUsername:
        return None, None
    if name.unsplit is not None:
        whole = await passdb.lookup(name.unsplit)
        if whole is not None:
            name = name.as_unsplit()
            return name, whole if name.shared else None
    mailbox = await passdb.lookup(name.mailbox) if name.shared else None
    return name, mailbox
