"""The login-name grammar: which mailbox, folder and device a POP3 login name asks for.

POP3 has one string to name all of it, so the parts ride in the name, each behind a
configured separator ([mailbox] in the config; any of them may be "" to turn it off)::

    [recent:]MAILBOX[+FOLDER][~DEVICE][*MEMBER]

    alice                  alice's INBOX as the default device
    alice~phone            the same, as the device "phone"
    alice+invoices~phone   the folder "invoices", as the device "phone"
    recent:alice           recent mode: the last recent_days of mail
    support*bob            the shared mailbox "support", opened with bob's password,
                           as the device "bob"
    support~laptop*bob     the same, as the device "bob/laptop"

Every part is checked with the rule that owns it (auth.names for users,
store.mailbox for folders and devices); a name that breaks any of them raises
InvalidUsername, so the client hears ``-ERR [AUTH]`` as for any bad login. User
names may hold "+", so ``alice+invoices`` may also be the user of that name: the
parse says so (``LoginName.unsplit``) and the broker asks the user database, which
this module, being pure, never does. It lives in net rather than auth because it
joins auth's rules with store's, which the layers keep apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from popbox.auth.names import MAX_USERNAME_LENGTH, is_valid_username, validate_username
from popbox.config import check_login_separators
from popbox.errors import InvalidMailboxName, InvalidUsername
from popbox.store.mailbox import (
    DEFAULT_DEVICE,
    INBOX,
    MAX_DEVICE_NAME,
    MAX_FOLDER_NAME,
    check_device_name,
    check_folder_name,
)

__all__ = ["MAX_LOGIN_NAME", "LoginGrammar", "LoginName"]

# The longest name whose every part is at its own limit (two users, a folder, a
# device, three separators and a prefix) fits; longer is refused before any parsing.
MAX_LOGIN_NAME: Final = 2 * MAX_USERNAME_LENGTH + MAX_FOLDER_NAME + MAX_DEVICE_NAME + 32
# How much of a refused name an error message shows (never a line of attacker input).
_SHOWN: Final = 40


@dataclass(frozen=True, slots=True)
class LoginName:
    """What one login name asks for."""

    mailbox: str
    """The user whose mailbox opens."""
    login: str
    """The user whose password is checked: the mailbox's owner, or a member."""
    folder: str = INBOX
    device: str = DEFAULT_DEVICE
    """The device name; a member's device is ``member`` or ``member/name``."""
    recent: bool = False
    unsplit: str | None = None
    """MAILBOX+FOLDER taken whole, when that too could name a user: a user of that
    name wins over the folder (``as_unsplit``)."""

    @property
    def shared(self) -> bool:
        """A member opens someone else's mailbox with their own password."""
        return self.login != self.mailbox

    def as_unsplit(self) -> LoginName:
        """The reading where MAILBOX+FOLDER is one user name and the folder is INBOX."""
        if self.unsplit is None:
            raise ValueError("this login name has only one reading")
        login = self.login if self.shared else self.unsplit
        return dataclasses.replace(
            self, mailbox=self.unsplit, login=login, folder=INBOX, unsplit=None
        )


class LoginGrammar:
    """Parses login names with one configuration's separators and recent prefix."""

    __slots__ = ("_device", "_folder", "_master", "_recent")

    def __init__(
        self,
        *,
        device_separator: str,
        folder_separator: str,
        master_separator: str,
        recent_prefix: str,
    ) -> None:
        """ValueError (naming the setting) for separators that would make names ambiguous."""
        check_login_separators(
            device_separator=device_separator,
            folder_separator=folder_separator,
            master_separator=master_separator,
            recent_prefix=recent_prefix,
        )
        self._device = device_separator
        self._folder = folder_separator
        self._master = master_separator
        self._recent = recent_prefix

    @property
    def master_separator(self) -> str:
        return self._master

    def parse(self, text: str) -> LoginName:
        """The parts of ``text``; InvalidUsername if it can name no login at all."""
        if len(text) > MAX_LOGIN_NAME:
            raise InvalidUsername(f"login name of {len(text)} characters is too long")
        try:
            return self._parse(text)
        except InvalidMailboxName as exc:
            raise InvalidUsername(str(exc)) from exc

    def _parse(self, text: str) -> LoginName:
        recent = bool(self._recent) and text.startswith(self._recent)
        if recent:
            text = text[len(self._recent) :]
        text, member = self._cut(text, self._master, "member")
        text, device = self._cut(text, self._device, "device")
        if device is not None:
            if "/" in device:
                # "member/name" is what the broker makes of a member's device; a name
                # typed with a "/" could pose as some member's device.
                raise InvalidUsername(f"device name {_shown(device)} may not hold '/'")
            check_device_name(device)
        login = validate_username(member) if member is not None else None
        if member is not None:
            device = member if device is None else f"{member}/{device}"
            check_device_name(device)
        mailbox, folder, unsplit = self._mailbox_and_folder(text)
        return LoginName(
            mailbox=mailbox,
            login=login if login is not None else mailbox,
            folder=folder,
            device=device if device is not None else DEFAULT_DEVICE,
            recent=recent,
            unsplit=unsplit,
        )

    @staticmethod
    def _cut(text: str, separator: str, what: str) -> tuple[str, str | None]:
        """``text`` before ``separator`` and what follows it (None: no such part)."""
        if not separator or separator not in text:
            return text, None
        head, _, tail = text.partition(separator)
        if separator in tail:
            raise InvalidUsername(f"login name {_shown(text)} names more than one {what}")
        return head, tail

    def _mailbox_and_folder(self, text: str) -> tuple[str, str, str | None]:
        """MAILBOX[+FOLDER]: the mailbox, the folder, and the text whole if it could
        be a user name as well."""
        separator = self._folder
        if not separator or separator not in text:
            return validate_username(text), INBOX, None
        whole = text if is_valid_username(text) else None
        mailbox, _, folder = text.partition(separator)
        try:
            if separator in folder:
                raise InvalidUsername(f"login name {_shown(text)} names more than one folder")
            return validate_username(mailbox), check_folder_name(folder), whole
        except (InvalidUsername, InvalidMailboxName):
            if whole is None:
                raise
            return whole, INBOX, None


def _shown(text: str) -> str:
    return repr(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")
