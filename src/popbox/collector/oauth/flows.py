"""Plain OAuth2 over httpx: RFC 6749 refresh, authorization-code and client-credentials
grants, RFC 8628 device flow.

Google and any standards-following server need nothing more than these requests;
Microsoft's Entra ID goes through msal instead (``oauth.microsoft``). A refresh the
server answers with ``invalid_grant`` (revoked, expired) is ``OAuthLoginRequired``:
only signing in again helps; every other failure stays a ``CollectorError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from popbox.collector.config import OAuthSettings
from popbox.collector.config_common import OAuthPurpose
from popbox.collector.oauth.bearer import ERROR_EXCERPT_CHARS
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import CollectorError, ConfigError, OAuthLoginRequired

__all__ = [
    "GOOGLE_AUTHORIZATION_ENDPOINT",
    "GOOGLE_DEVICE_ENDPOINT",
    "GOOGLE_TOKEN_ENDPOINT",
    "HTTP_TIMEOUT",
    "DeviceCode",
    "OAuthHttpClient",
    "authorization_endpoint_for",
    "generic_device_login",
    "http_client_for",
    "save_refresh_token",
]

HTTP_TIMEOUT: Final = 30.0
# RFC 8628 section 3.5: poll every 5 s unless told otherwise; slow_down adds 5 s.
DEVICE_POLL_INTERVAL: Final = 5.0
DEVICE_SLOW_DOWN: Final = 5.0
# Device codes typically expire after 15 minutes; never poll past this.
DEVICE_FLOW_MAX_WAIT: Final = 900.0

GOOGLE_TOKEN_ENDPOINT: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 a URL
GOOGLE_DEVICE_ENDPOINT: Final = "https://oauth2.googleapis.com/device/code"
GOOGLE_AUTHORIZATION_ENDPOINT: Final = "https://accounts.google.com/o/oauth2/v2/auth"


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
        self.client_id = client_id
        self._client_secret = client_secret
        self._scopes = list(scopes)
        self._timeout = timeout
        self._transport = transport

    def __repr__(self) -> str:
        return f"OAuthHttpClient({self.token_endpoint!r})"  # no client secret here

    @property
    def scopes(self) -> list[str]:
        return list(self._scopes)

    async def _post(self, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        form = {"client_id": self.client_id, **form}
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
    def _error(
        what: str, status: int, document: dict[str, Any], *, grant_dies: bool = False
    ) -> CollectorError:
        code = str(document.get("error", f"HTTP {status}"))
        detail = str(document.get("error_description", ""))[:ERROR_EXCERPT_CHARS]
        message = f"{what} failed: {code} {detail}".rstrip()
        if grant_dies and code == "invalid_grant":
            return OAuthLoginRequired(message)
        return CollectorError(message)

    async def _token_request(
        self, what: str, form: dict[str, str], *, scoped: bool = True, grant_dies: bool = False
    ) -> dict[str, Any]:
        if scoped and self._scopes:
            form["scope"] = " ".join(self._scopes)
        status, document = await self._post(self.token_endpoint, form)
        if status != 200 or "access_token" not in document:
            raise self._error(what, status, document, grant_dies=grant_dies)
        return document

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A new access token; ``OAuthLoginRequired`` when the server no longer
        honours the refresh token (RFC 6749 section 5.2 ``invalid_grant``)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request("token refresh", form, grant_dies=True)

    async def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str
    ) -> dict[str, Any]:
        """RFC 6749 section 4.1.3 with the PKCE verifier (RFC 7636 section 4.5)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        # The scopes were granted with the code; section 4.1.3 sends none here.
        return await self._token_request("code exchange", form, scoped=False)

    async def client_credentials(self) -> dict[str, Any]:
        return await self._token_request("client credentials", {"grant_type": "client_credentials"})

    async def start_device_flow(self) -> DeviceCode:
        if self.device_authorization_endpoint is None:
            raise ConfigError("oauth: no device_authorization_endpoint configured")
        form = {"scope": " ".join(self._scopes)} if self._scopes else {}
        status, document = await self._post(self.device_authorization_endpoint, form)
        if status != 200 or "device_code" not in document:
            raise self._error("device authorization", status, document)
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
            raise self._error("device login", status, document)
        raise CollectorError("device login: the code expired before it was approved")


def http_client_for(oauth: OAuthSettings, purpose: OAuthPurpose = "pop3") -> OAuthHttpClient:
    """The client for a generic or Google ``[oauth]`` table (Google's endpoints filled in)."""
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
        scopes=oauth.effective_scopes(purpose),
        device_authorization_endpoint=device_endpoint,
    )


async def generic_device_login(
    client: OAuthHttpClient, token_file: TokenFile, echo: Callable[[str], None]
) -> None:
    """RFC 8628 device-code login; stores the refresh token in ``token_file``."""
    code = await client.start_device_flow()
    echo(code.message())
    document = await client.finish_device_flow(code)
    await save_refresh_token(token_file, document, client.token_endpoint, "device login")


async def save_refresh_token(
    token_file: TokenFile, document: dict[str, Any], token_endpoint: str, what: str
) -> None:
    """Store the refresh token of a token endpoint's answer, as every login does."""
    refresh_token = document.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise CollectorError(f"{what}: the server issued no refresh token (scope?)")
    await asyncio.to_thread(
        token_file.save,
        {"format": "refresh_token", "refresh_token": refresh_token,
         "token_endpoint": token_endpoint, "saved_at": int(time.time())},
    )


def authorization_endpoint_for(oauth: OAuthSettings) -> str:
    """Where the browser login starts: ``authorization_endpoint``, or Google's."""
    if oauth.authorization_endpoint:
        return oauth.authorization_endpoint
    if oauth.provider == "google":
        return GOOGLE_AUTHORIZATION_ENDPOINT
    raise ConfigError(
        "oauth: the browser login needs authorization_endpoint for provider generic "
        "(or use --flow device with device_authorization_endpoint)"
    )

