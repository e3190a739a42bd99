"""Where mail lives: the storage contract and its implementations.

``MailStore`` and ``Maildrop`` (store.base) are the plug-in point; ``MemoryStore`` is
the reference implementation for tests, ``MaildirStore`` the embedded default.
"""

from popbox.store.base import Maildrop, MailStore, MessageInfo, Usage, WireReadyFile
from popbox.store.maildir import MaildirStore
from popbox.store.maildrop import MaildirMaildrop
from popbox.store.memory import MemoryMaildrop, MemoryStore

__all__ = [
    "MailStore",
    "MaildirMaildrop",
    "MaildirStore",
    "Maildrop",
    "MemoryMaildrop",
    "MemoryStore",
    "MessageInfo",
    "Usage",
    "WireReadyFile",
]
