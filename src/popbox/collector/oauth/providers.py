"""The token providers that need no msal, and ``create_token_provider``, which picks one.

- ``CommandTokenProvider``: a command prints the token (oama, a vault, a script).
- ``RefreshTokenProvider`` (Google, any RFC 6749 server): a stored refresh token,
  exchanged at the token endpoint; rotated refresh tokens are saved.
- ``ClientCredentialsProvider`` (any RFC 6749 server): app-only, no stored token.

A stored login that is missing or dead (``invalid_grant``) raises
``OAuthLoginRequired`` naming the command that mends it; every provider built here
knows its account and sink for that.

The Microsoft providers live in ``oauth.microsoft`` and are imported only for an
account with ``provider = "microsoft"``, so no other account ever loads msal.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from popbox.collector.config import AccountSettings, FetchSettings, OAuthSettings, SinkSettings
from popbox.collector.config_common import OAuthPurpose
from popbox.collector.oauth.bearer import (
    ERROR_EXCERPT_CHARS,
    SIGN_IN_COMMAND,
    CachedToken,
    check_bearer_token,
    login_required,
    sign_in_command,
)
from popbox.collector.oauth.flows import OAuthHttpClient, http_client_for
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.collector.tokens import TokenProvider
from popbox.errors import CollectorError, ConfigError, OAuthLoginRequired

__all__ = [
    "ClientCredentialsProvider",
    "CommandTokenProvider",
    "RefreshTokenProvider",
    "create_sink_token_provider",
    "create_token_provider",
    "token_provider_for",
]

# oama and similar helpers answer in well under a second; 30 s allows a vault unlock.
COMMAND_TIMEOUT: Final = 30.0
# Access tokens from Microsoft and Google live at least an hour; asking the command
# again after ten minutes keeps a long daemon from holding one close to its expiry.
COMMAND_TOKEN_MAX_AGE: Final = 600.0


class CommandTokenProvider:
    """Runs ``command`` (no shell); its first output line is the access token."""

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        max_age: float = COMMAND_TOKEN_MAX_AGE,
    ) -> None:
        self._argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self._argv:
            raise ConfigError("token_command: must name a program")
        self._timeout = timeout
        self._max_age = max_age
        self._cached: CachedToken | None = None
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if self._cached is not None and self._cached.fresh() and not force_refresh:
                return self._cached.token
            token = await self._run()
            self._cached = CachedToken(token, time.time() + self._max_age)
            return token

    async def _run(self) -> str:
        program = self._argv[0]
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise CollectorError(f"token command {program}: {exc.strerror}") from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError as exc:
            process.kill()
            await process.wait()
            raise CollectorError(
                f"token command {program} timed out after {self._timeout:.0f}s"
            ) from exc
        if process.returncode != 0:
            reason = err.decode("utf-8", "replace").strip()[:ERROR_EXCERPT_CHARS]
            raise CollectorError(f"token command {program} exited {process.returncode}: {reason}")
        lines = out.decode("utf-8", "replace").strip().splitlines()
        return check_bearer_token(lines[0].strip() if lines else "", f"token command {program}")


class RefreshTokenProvider:
    """Exchanges the stored refresh token (``TokenFile``) at an RFC 6749 endpoint.

    ``what`` names the login in errors, ``sign_in`` is the command that mends a dead one.
    """

    def __init__(
        self,
        token_file: TokenFile,
        client: OAuthHttpClient,
        *,
        what: str = "oauth",
        sign_in: str = SIGN_IN_COMMAND,
    ) -> None:
        self._file = token_file
        self._client = client
        self._what = what
        self._sign_in = sign_in
        self._cached: CachedToken | None = None
        # One refresh at a time: with rotating refresh tokens a second concurrent
        # refresh would use a token the first one just invalidated.
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if self._cached is not None and self._cached.fresh() and not force_refresh:
                return self._cached.token
            stored = await asyncio.to_thread(self._file.load)
            refresh_token = (stored or {}).get("refresh_token")
            if not isinstance(refresh_token, str) or not refresh_token:
                raise login_required(
                    self._what, f"never signed in (no refresh token in {self._file.path})",
                    self._sign_in,
                )
            try:
                document = await self._client.refresh(refresh_token)
            except OAuthLoginRequired as exc:
                raise login_required(
                    self._what, f"the stored login no longer works ({exc})", self._sign_in
                ) from exc
            rotated = document.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != refresh_token:
                await asyncio.to_thread(
                    self._file.save, {**(stored or {}), "refresh_token": rotated}
                )
            self._cached = CachedToken.from_response(
                str(document["access_token"]), document.get("expires_in"), "token endpoint"
            )
            return self._cached.token


class ClientCredentialsProvider:
    """App-only tokens (RFC 6749 section 4.4) from a generic token endpoint."""

    def __init__(self, client: OAuthHttpClient) -> None:
        self._client = client
        self._cached: CachedToken | None = None
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if self._cached is not None and self._cached.fresh() and not force_refresh:
                return self._cached.token
            document = await self._client.client_credentials()
            self._cached = CachedToken.from_response(
                str(document["access_token"]), document.get("expires_in"), "token endpoint"
            )
            return self._cached.token


def create_token_provider(account: AccountSettings, settings: FetchSettings) -> TokenProvider:
    """The TokenProvider for an ``auth = "oauth2"`` account's POP3 login."""
    oauth = account.oauth
    if oauth is None:
        raise ConfigError(f"fetch.accounts.{account.name}: no [oauth] table")
    return token_provider_for(
        oauth,
        settings.oauth_token_store(account),
        "pop3",
        f"fetch.accounts.{account.name}",
        sign_in=sign_in_command(account.name),
    )


def create_sink_token_provider(
    account: AccountSettings, settings: FetchSettings, sink: SinkSettings
) -> TokenProvider:
    """The TokenProvider for a sink's own OAuth2 login (IMAP, the Gmail API)."""
    oauth = getattr(sink, "oauth", None)
    if not isinstance(oauth, OAuthSettings):
        raise ConfigError(f"fetch.accounts.{account.name}: sink {sink.label} has no [oauth] table")
    purpose: OAuthPurpose = "gmail" if sink.kind == "gmail" else "imap"
    return token_provider_for(
        oauth,
        settings.sink_token_store(account, sink),
        purpose,
        f"fetch.accounts.{account.name}: sink {sink.label}",
        sign_in=sign_in_command(account.name, sink.label),
    )


def token_provider_for(
    oauth: OAuthSettings,
    store: Path,
    purpose: OAuthPurpose,
    what: str,
    *,
    sign_in: str = SIGN_IN_COMMAND,
) -> TokenProvider:
    """The provider for one ``[oauth]`` table whose refresh token lives in ``store``;
    ``what`` names the table in errors and ``sign_in`` is the command that signs it
    in again (``popbox oauth login ACCOUNT [--sink LABEL]``, see ``sign_in_command``)."""
    if oauth.token_source == "command":  # noqa: S105 a setting name, not a secret
        assert oauth.token_command is not None  # OAuthSettings validated it
        return CommandTokenProvider(oauth.token_command)
    token_file = TokenFile(store)
    client_id = oauth.client_id or ""
    scopes = oauth.effective_scopes(purpose)
    if oauth.token_source == "refresh_token":  # noqa: S105 a setting name
        if oauth.provider == "microsoft":
            from popbox.collector.oauth.microsoft import MsalRefreshTokenProvider, authority_of

            return MsalRefreshTokenProvider(
                token_file, client_id=client_id, authority=authority_of(oauth), scopes=scopes,
                what=what, sign_in=sign_in,
            )
        return RefreshTokenProvider(
            token_file, http_client_for(oauth, purpose), what=what, sign_in=sign_in
        )
    if oauth.provider == "google":
        # Gmail has no app-only grant; Workspace uses service accounts with signed
        # JWT assertions instead, which a token command can supply.
        raise ConfigError(
            f"{what}.oauth: Google has no client_credentials grant for Gmail; "
            "use token_source = refresh_token or command"
        )
    if oauth.provider == "microsoft":
        from popbox.collector.oauth.microsoft import MsalClientCredentialsProvider, authority_of

        source = oauth.client_secret_source()
        assert source is not None  # OAuthSettings requires one for client_credentials
        return MsalClientCredentialsProvider(
            client_id=client_id,
            client_secret=source.read(),
            authority=authority_of(oauth),
            scopes=scopes,
        )
    return ClientCredentialsProvider(http_client_for(oauth, purpose))
