"""TokenProvider: the seam between the POP3 client's XOAUTH2/OAUTHBEARER and the token sources.

The client side (``collector.auth``, the client, the poller) and the token sources
(``popbox.collector.oauth``) both import this module, and it imports nothing of the
collector, so neither side has to import the other.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["StaticTokenProvider", "TokenProvider"]


@runtime_checkable
class TokenProvider(Protocol):
    """Hands out OAuth2 access tokens for one account."""

    async def token(self, *, force_refresh: bool = False) -> str:
        """A currently valid access token.

        ``force_refresh`` is set after the server rejected the last token (it expired
        mid-run): the provider must not return a cached token then. Raises
        CollectorError when no token can be had (ConfigError when never configured).
        """
        ...


class StaticTokenProvider:
    """A fixed token, or a list handed out in turn on refresh (tests, one-shot use)."""

    def __init__(self, *tokens: str) -> None:
        if not tokens:
            raise ValueError("at least one token")
        self._tokens = list(tokens)
        self._index = 0
        self.refreshes = 0

    async def token(self, *, force_refresh: bool = False) -> str:
        if force_refresh:
            self.refreshes += 1
            self._index = min(self._index + 1, len(self._tokens) - 1)
        return self._tokens[self._index]
