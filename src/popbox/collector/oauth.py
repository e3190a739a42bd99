"""OAuth2 access tokens for XOAUTH2/OAUTHBEARER: token providers and `popbox oauth login`.

Every provider implements ``popbox.collector.tokens.TokenProvider``: it caches the
access token until shortly before it expires and fetches a new one when asked with
``force_refresh`` (the server rejected the old one mid-run). Sources:

- ``CommandTokenProvider``: a command prints the token (oama, a vault, a script).
- ``MsalRefreshTokenProvider`` (Microsoft): msal's token cache, written by
  ``popbox oauth login`` (device-code flow) to a 0600 file in the state directory.
- ``RefreshTokenProvider`` (Google, any RFC 6749 server): a stored refresh token,
  exchanged at the token endpoint with httpx; rotated refresh tokens are saved.
- ``MsalClientCredentialsProvider`` (Microsoft 365 app-only, POP.AccessAsApp) and
  ``ClientCredentialsProvider`` (any RFC 6749 server): no user, no stored token.

Microsoft goes through msal because Entra ID's details (authority discovery, token
cache format, refresh token rotation) are msal's to keep right; the generic paths use
plain RFC 6749/8628 requests because Google and others need nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click
import httpx

from popbox.collector.config import (
    AccountSettings,
    FetchSettings,
    OAuthSettings,
    load_fetch_settings,
)
from popbox.collector.tokens import TokenProvider
from popbox.errors import CollectorError, ConfigError, PopboxError

__all__ = [
    "ClientCredentialsProvider",
    "CommandTokenProvider",
    "MsalClientCredentialsProvider",
    "MsalRefreshTokenProvider",
    "OAuthHttpClient",
    "RefreshTokenProvider",
    "TokenFile",
    "create_token_provider",
    "login_command",
]

log = logging.getLogger(__name__)

# oama and similar helpers answer in well under a second; 30 s allows a vault unlock.
COMMAND_TIMEOUT: Final = 30.0
# Access tokens from Microsoft and Google live at least an hour; asking the command
# again after ten minutes keeps a long daemon from holding one close to its expiry.
COMMAND_TOKEN_MAX_AGE: Final = 600.0
# Renew this long before "expires_in" runs out: clock skew plus a slow login.
EXPIRY_MARGIN: Final = 120.0
# When a server omits expires_in, RFC 6749 leaves the lifetime open; an hour is what
# Microsoft and Google issue, and force_refresh covers a shorter real lifetime.
DEFAULT_TOKEN_LIFETIME: Final = 3600.0
HTTP_TIMEOUT: Final = 30.0
# RFC 8628 section 3.5: poll every 5 s unless told otherwise; slow_down adds 5 s.
DEVICE_POLL_INTERVAL: Final = 5.0
DEVICE_SLOW_DOWN: Final = 5.0
# Device codes typically expire after 15 minutes; never poll past this.
DEVICE_FLOW_MAX_WAIT: Final = 900.0
# Enough of an error to diagnose; tokens endpoints echo no secrets in errors.
ERROR_EXCERPT_CHARS: Final = 300

MICROSOFT_AUTHORITY_HOST: Final = "https://login.microsoftonline.com"
GOOGLE_TOKEN_ENDPOINT: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 a URL
GOOGLE_DEVICE_ENDPOINT: Final = "https://oauth2.googleapis.com/device/code"
# msal adds these itself and refuses them in a scope list.
MSAL_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})
# RFC 6750 section 2.1 b64token, the shape of every bearer token we can send in SASL.
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def _check_token(token: str, source: str) -> str:
    if not _BEARER_TOKEN.match(token):
        raise CollectorError(f"{source} did not return a bearer token")
    return token


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    renew_at: float

    def fresh(self) -> bool:
        return time.time() < self.renew_at


def _cached(token: str, expires_in: object, source: str) -> _Cached:
    lifetime = float(expires_in) if isinstance(expires_in, int | float) else None
    if lifetime is None and isinstance(expires_in, str) and expires_in.isdigit():
        lifetime = float(expires_in)  # some servers send the number as a string
    lifetime = DEFAULT_TOKEN_LIFETIME if lifetime is None else lifetime
    return _Cached(_check_token(token, source), time.time() + lifetime - EXPIRY_MARGIN)


# ---------------------------------------------------------------------------- storage


class TokenFile:
    """A JSON document readable only by its owner: the refresh token or msal's cache."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CollectorError(f"cannot read token store {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CollectorError(f"token store {self.path} is not a JSON object")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file atomically; it is 0600 from its first byte."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a crash
        finally:
            os.close(directory)


# ---------------------------------------------------------------------------- command


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
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if self._cached is not None and self._cached.fresh() and not force_refresh:
                return self._cached.token
            token = await self._run()
            self._cached = _Cached(token, time.time() + self._max_age)
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
            raise CollectorError(
                f"token command {program} exited {process.returncode}: {reason}"
            )
        lines = out.decode("utf-8", "replace").strip().splitlines()
        return _check_token(lines[0].strip() if lines else "", f"token command {program}")


# ---------------------------------------------------------------------------- generic


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """The answer of a device authorization endpoint (RFC 8628 section 3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    expires_in: float
    interval: float

    def message(self) -> str:
        return f"To sign in, open {self.verification_uri} and enter the code {self.user_code}"


class OAuthHttpClient:
    """RFC 6749 token requests and RFC 8628 device authorization, over httpx."""

    def __init__(
        self,
        token_endpoint: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        scopes: Sequence[str] = (),
        device_authorization_endpoint: str | None = None,
        timeout: float = HTTP_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.token_endpoint = token_endpoint
        self.device_authorization_endpoint = device_authorization_endpoint
        self._client_id = client_id
        self._client_secret = client_secret
        self._scopes = list(scopes)
        self._timeout = timeout
        self._transport = transport

    def __repr__(self) -> str:
        return f"OAuthHttpClient({self.token_endpoint!r})"  # no client secret here

    async def _post(self, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        form = {"client_id": self._client_id, **form}
        if self._client_secret is not None:
            # RFC 6749 section 2.3.1 allows the body form; Google documents only it.
            form["client_secret"] = self._client_secret
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport
            ) as client:
                response = await client.post(
                    url, data=form, headers={"Accept": "application/json"}
                )
        except httpx.HTTPError as exc:
            raise CollectorError(f"OAuth endpoint {url}: {type(exc).__name__}: {exc}") from exc
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise CollectorError(
                f"OAuth endpoint {url}: HTTP {response.status_code}, not a JSON object: "
                f"{response.text[:ERROR_EXCERPT_CHARS]}"
            )
        return response.status_code, document

    @staticmethod
    def _error(what: str, document: dict[str, Any]) -> CollectorError:
        code = str(document.get("error", "unknown_error"))
        detail = str(document.get("error_description", ""))[:ERROR_EXCERPT_CHARS]
        hint = ""
        if code == "invalid_grant":
            hint = " (the stored login is no longer valid: run `popbox oauth login` again)"
        return CollectorError(f"{what} failed: {code} {detail}".rstrip() + hint)

    async def _token_request(self, what: str, form: dict[str, str]) -> dict[str, Any]:
        if self._scopes:
            form["scope"] = " ".join(self._scopes)
        status, document = await self._post(self.token_endpoint, form)
        if status != 200 or "access_token" not in document:
            raise self._error(what, document)
        return document

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request("token refresh", form)

    async def client_credentials(self) -> dict[str, Any]:
        return await self._token_request("client credentials", {"grant_type": "client_credentials"})

    async def start_device_flow(self) -> DeviceCode:
        if self.device_authorization_endpoint is None:
            raise ConfigError("oauth: no device_authorization_endpoint configured")
        form = {"scope": " ".join(self._scopes)} if self._scopes else {}
        status, document = await self._post(self.device_authorization_endpoint, form)
        if status != 200 or "device_code" not in document:
            raise self._error("device authorization", document)
        return DeviceCode(
            device_code=str(document["device_code"]),
            user_code=str(document["user_code"]),
            # Google says verification_url; RFC 8628 says verification_uri.
            verification_uri=str(
                document.get("verification_uri") or document.get("verification_url")
            ),
            expires_in=float(document.get("expires_in", DEVICE_FLOW_MAX_WAIT)),
            interval=float(document.get("interval", DEVICE_POLL_INTERVAL)),
        )

    async def finish_device_flow(
        self, code: DeviceCode, *, sleep: Callable[[float], Any] = asyncio.sleep
    ) -> dict[str, Any]:
        """Poll the token endpoint until the user approved, refused, or time ran out."""
        interval = code.interval
        deadline = time.monotonic() + min(code.expires_in, DEVICE_FLOW_MAX_WAIT)
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": code.device_code,
        }
        while time.monotonic() < deadline:
            await sleep(interval)
            status, document = await self._post(self.token_endpoint, dict(form))
            if status == 200 and "access_token" in document:
                return document
            error = document.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += DEVICE_SLOW_DOWN
                continue
            raise self._error("device login", document)
        raise CollectorError("device login: the code expired before it was approved")


class RefreshTokenProvider:
    """Exchanges the stored refresh token (``TokenFile``) at an RFC 6749 endpoint."""

    def __init__(self, token_file: TokenFile, client: OAuthHttpClient) -> None:
        self._file = token_file
        self._client = client
        self._cached: _Cached | None = None
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
                raise CollectorError(
                    f"no refresh token in {self._file.path}: run `popbox oauth login`"
                )
            document = await self._client.refresh(refresh_token)
            rotated = document.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != refresh_token:
                await asyncio.to_thread(
                    self._file.save, {**(stored or {}), "refresh_token": rotated}
                )
            self._cached = _cached(
                str(document["access_token"]), document.get("expires_in"), "token endpoint"
            )
            return self._cached.token


class ClientCredentialsProvider:
    """App-only tokens (RFC 6749 section 4.4) from a generic token endpoint."""

    def __init__(self, client: OAuthHttpClient) -> None:
        self._client = client
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if self._cached is not None and self._cached.fresh() and not force_refresh:
                return self._cached.token
            document = await self._client.client_credentials()
            self._cached = _cached(
                str(document["access_token"]), document.get("expires_in"), "token endpoint"
            )
            return self._cached.token


# ---------------------------------------------------------------------------- msal


def _msal_scopes(scopes: Sequence[str]) -> list[str]:
    return [scope for scope in scopes if scope not in MSAL_RESERVED_SCOPES]


def _msal_options(authority: str, ca_file: Path | None) -> dict[str, Any]:
    """msal keyword arguments: a non-Microsoft authority host (a test or private
    endpoint) is used as given, without asking login.microsoftonline.com about it."""
    options: dict[str, Any] = {"authority": authority}
    if not authority.startswith(MICROSOFT_AUTHORITY_HOST + "/"):
        options.update(instance_discovery=False, validate_authority=False)
    if ca_file is None:
        options["timeout"] = HTTP_TIMEOUT
        return options
    import requests  # msal's own HTTP library, so a dependency already

    session = requests.Session()
    # requests lets REQUESTS_CA_BUNDLE override Session.verify (msal's ``verify``
    # option); a verify given with each request is the one setting it cannot override.
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, verify=str(ca_file), timeout=HTTP_TIMEOUT
    )
    session.mount("https://", requests.adapters.HTTPAdapter(max_retries=1))
    options["http_client"] = session
    return options


def _msal_result(result: dict[str, Any] | None, what: str) -> str:
    if not result or "access_token" not in result:
        result = result or {}
        code = result.get("error", "no_token")
        detail = str(result.get("error_description", ""))[:ERROR_EXCERPT_CHARS]
        raise CollectorError(f"{what} failed: {code} {detail}".rstrip())
    return _check_token(str(result["access_token"]), what)


class MsalRefreshTokenProvider:
    """Microsoft delegated access: msal's cache from ``popbox oauth login``."""

    def __init__(
        self,
        token_file: TokenFile,
        *,
        client_id: str,
        authority: str,
        scopes: Sequence[str],
        ca_file: Path | None = None,
    ) -> None:
        import msal

        self._file = token_file
        self._scopes = _msal_scopes(scopes)
        self._cache = msal.SerializableTokenCache()
        self._app = msal.PublicClientApplication(
            client_id, token_cache=self._cache, **_msal_options(authority, ca_file)
        )
        self._loaded = False
        self._lock = asyncio.Lock()

    def _acquire(self, force_refresh: bool) -> str:
        if not self._loaded:
            stored = self._file.load() or {}
            if isinstance(stored.get("msal_cache"), str):
                self._cache.deserialize(stored["msal_cache"])
            self._loaded = True
        accounts = self._app.get_accounts()
        if not accounts:
            raise CollectorError(f"no login stored in {self._file.path}: run `popbox oauth login`")
        result = self._app.acquire_token_silent_with_error(
            self._scopes, account=accounts[0], force_refresh=force_refresh
        )
        if self._cache.has_state_changed:
            # msal rotated the refresh token; losing it would force a new login.
            self._file.save({"format": "msal", "msal_cache": self._cache.serialize()})
            self._cache.has_state_changed = False
        return _msal_result(result, "Microsoft token refresh")

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            # msal is synchronous (requests); its own cache answers until near expiry.
            return await asyncio.to_thread(self._acquire, force_refresh)


class MsalClientCredentialsProvider:
    """Microsoft 365 app-only access (POP.AccessAsApp) with a client secret."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        authority: str,
        scopes: Sequence[str] = ("https://outlook.office365.com/.default",),
        ca_file: Path | None = None,
    ) -> None:
        import msal

        self._scopes = list(scopes)
        self._app = msal.ConfidentialClientApplication(
            client_id, client_credential=client_secret, **_msal_options(authority, ca_file)
        )
        self._lock = asyncio.Lock()

    def _acquire(self, force_refresh: bool) -> str:
        if force_refresh:
            self._app.remove_tokens_for_client()  # else msal answers from its cache
        result = self._app.acquire_token_for_client(scopes=self._scopes)
        return _msal_result(result, "Microsoft client credentials")

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            return await asyncio.to_thread(self._acquire, force_refresh)


# ---------------------------------------------------------------------------- factory


def _authority(oauth: OAuthSettings) -> str:
    return (oauth.authority or f"{MICROSOFT_AUTHORITY_HOST}/{oauth.tenant}").rstrip("/")


def _http_client(oauth: OAuthSettings, *, ca_file: Path | None = None) -> OAuthHttpClient:
    token_endpoint = oauth.token_endpoint
    device_endpoint = oauth.device_authorization_endpoint
    if oauth.provider == "google":
        token_endpoint = token_endpoint or GOOGLE_TOKEN_ENDPOINT
        device_endpoint = device_endpoint or GOOGLE_DEVICE_ENDPOINT
    if not token_endpoint or not oauth.client_id:
        raise ConfigError("oauth: provider generic needs token_endpoint and client_id")
    source = oauth.client_secret_source()
    return OAuthHttpClient(
        token_endpoint,
        oauth.client_id,
        client_secret=source.read() if source is not None else None,
        scopes=oauth.effective_scopes(),
        device_authorization_endpoint=device_endpoint,
    )


def create_token_provider(
    account: AccountSettings, settings: FetchSettings
) -> TokenProvider:
    """The TokenProvider for an ``auth = "oauth2"`` account (see collector.auth)."""
    oauth = account.oauth
    if oauth is None:
        raise ConfigError(f"fetch.accounts.{account.name}: no [oauth] table")
    if oauth.token_source == "command":  # noqa: S105 a setting name, not a secret
        assert oauth.token_command is not None  # OAuthSettings validated it
        return CommandTokenProvider(oauth.token_command)
    token_file = TokenFile(settings.oauth_token_store(account))
    client_id = oauth.client_id or ""
    if oauth.token_source == "refresh_token":  # noqa: S105 a setting name
        if oauth.provider == "microsoft":
            return MsalRefreshTokenProvider(
                token_file, client_id=client_id, authority=_authority(oauth),
                scopes=oauth.effective_scopes(),
            )
        return RefreshTokenProvider(token_file, _http_client(oauth))
    if oauth.provider == "google":
        # Gmail has no app-only grant; Workspace uses service accounts with signed
        # JWT assertions instead, which a token command can supply.
        raise ConfigError(
            f"fetch.accounts.{account.name}.oauth: Google has no client_credentials "
            "grant for Gmail; use token_source = refresh_token or command"
        )
    if oauth.provider == "microsoft":
        source = oauth.client_secret_source()
        assert source is not None  # OAuthSettings requires one for client_credentials
        return MsalClientCredentialsProvider(
            client_id=client_id, client_secret=source.read(), authority=_authority(oauth),
            scopes=oauth.effective_scopes(),
        )
    return ClientCredentialsProvider(_http_client(oauth))


# ---------------------------------------------------------------------------- login


def msal_device_login(
    oauth: OAuthSettings,
    token_file: TokenFile,
    echo: Callable[[str], None],
    *,
    ca_file: Path | None = None,
) -> None:
    """Microsoft device-code login with msal; stores msal's cache in ``token_file``."""
    import msal

    cache = msal.SerializableTokenCache()
    app = msal.PublicClientApplication(
        oauth.client_id, token_cache=cache, **_msal_options(_authority(oauth), ca_file)
    )
    flow = app.initiate_device_flow(scopes=_msal_scopes(oauth.effective_scopes()))
    if "user_code" not in flow:
        raise CollectorError(
            f"device login could not start: {flow.get('error')} "
            f"{str(flow.get('error_description', ''))[:ERROR_EXCERPT_CHARS]}"
        )
    echo(str(flow["message"]))
    _msal_result(app.acquire_token_by_device_flow(flow), "device login")
    token_file.save({"format": "msal", "msal_cache": cache.serialize()})


async def generic_device_login(
    client: OAuthHttpClient, token_file: TokenFile, echo: Callable[[str], None]
) -> None:
    """RFC 8628 device-code login; stores the refresh token in ``token_file``."""
    code = await client.start_device_flow()
    echo(code.message())
    document = await client.finish_device_flow(code)
    refresh_token = document.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise CollectorError("device login: the server issued no refresh token (scope?)")
    await asyncio.to_thread(
        token_file.save,
        {"format": "refresh_token", "refresh_token": refresh_token,
         "token_endpoint": client.token_endpoint, "saved_at": int(time.time())},
    )


@click.command("login")
@click.argument("account")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="POPBOX_CONFIG",
    required=True,
    help="The TOML file with the [fetch] table that defines ACCOUNT.",
)
def login_command(account: str, config_path: Path) -> None:
    """Sign ACCOUNT in once with the device-code flow and store its refresh token."""
    try:
        settings = load_fetch_settings(config_path)
        entry = settings.account(account)
        oauth = entry.oauth
        if entry.auth != "oauth2" or oauth is None:
            raise ConfigError(f"fetch.accounts.{account}: auth is not oauth2")
        if oauth.token_source != "refresh_token":  # noqa: S105 a setting name
            raise ConfigError(
                f"fetch.accounts.{account}: token_source = {oauth.token_source} "
                "needs no login (only refresh_token does)"
            )
        token_file = TokenFile(settings.oauth_token_store(entry))
        if oauth.provider == "microsoft":
            msal_device_login(oauth, token_file, click.echo)
        else:
            asyncio.run(generic_device_login(_http_client(oauth), token_file, click.echo))
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Signed in; the refresh token is stored in {token_file.path} (mode 0600).")
