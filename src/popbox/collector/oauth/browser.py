"""The browser login: authorization code with PKCE (RFC 7636, S256) and a loopback
redirect (RFC 8252), for Google and any RFC 6749 server; Microsoft's goes through
msal (``oauth.microsoft``) on the same listener.

Google allows no device flow for the mail scopes (``https://mail.google.com/``, the
Gmail API's), so its accounts sign in this way. The user opens the printed address
(popbox opens a browser itself when the machine has one); the answer comes back to
``http://127.0.0.1:PORT/`` or is pasted into the terminal (``oauth.loopback``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from popbox.collector.oauth.bearer import ERROR_EXCERPT_CHARS
from popbox.collector.oauth.flows import OAuthHttpClient, save_refresh_token
from popbox.collector.oauth.loopback import BROWSER_LOGIN_MAX_WAIT, RedirectListener
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import CollectorError

__all__ = [
    "GOOGLE_OFFLINE_PARAMETERS",
    "BrowserOptions",
    "authorize_in_browser",
    "browser_available",
    "generic_browser_login",
    "pkce_pair",
]

# Google issues a refresh token only with access_type=offline, and again on a later
# login only with prompt=consent (else the second login gets an access token alone).
GOOGLE_OFFLINE_PARAMETERS: Final = {"access_type": "offline", "prompt": "consent"}
# RFC 7636 section 4.1: 43 to 128 characters; 48 random octets give 64.
PKCE_VERIFIER_OCTETS: Final = 48
# RFC 6749 section 10.12: the state is unguessable; 32 octets as for the verifier.
STATE_OCTETS: Final = 32


@dataclass(frozen=True, slots=True)
class BrowserOptions:
    """How the browser login talks to its user."""

    echo: Callable[[str], None] = print
    port: int = 0
    """The loopback port; 0 = any free one (a fixed one suits ``ssh -L``)."""
    open_browser: bool = True
    """Open the address with ``webbrowser`` when this machine has a browser."""
    pasted: Callable[[], Iterator[str]] | None = None
    """Lines the user pastes (standard input); None = only the listener."""
    max_wait: float = BROWSER_LOGIN_MAX_WAIT
    """Seconds to wait for the answer."""


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``code_verifier`` and its S256 ``code_challenge`` (RFC 7636 section 4.2)."""
    verifier = secrets.token_urlsafe(PKCE_VERIFIER_OCTETS)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def browser_available() -> bool:
    """Whether ``webbrowser`` would open a window the user sees: on a server it
    would start a text browser in this terminal (lynx, w3m) and hide the prompt."""
    if os.environ.get("BROWSER"):
        return True  # the user named one
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_browser(url: str) -> None:
    """Open ``url`` from a daemon thread: a browser named in BROWSER runs until it is
    closed, and the login must not wait for that (nor the process exit)."""

    def run() -> None:
        import webbrowser  # only here: it probes the desktop on import

        with contextlib.suppress(webbrowser.Error, OSError):
            webbrowser.open(url, new=1)

    threading.Thread(target=run, name="popbox-oauth-browser", daemon=True).start()


async def authorize_in_browser(
    start: Callable[[str], Awaitable[tuple[str, str]]],
    options: BrowserOptions,
    *,
    redirect_host: str = "127.0.0.1",
) -> tuple[dict[str, str], str]:
    """Listen, show the address ``start(redirect_uri)`` returns with its state, and
    wait for the answer. Returns the redirect's parameters and the redirect URI;
    CollectorError when the user or the server refused (``error=access_denied``)."""
    async with RedirectListener(options.port) as listener:
        redirect_uri = listener.redirect_uri(redirect_host)
        url, state = await start(redirect_uri)
        listener.expect(state)
        echo = options.echo
        echo("Open this address in a browser and sign in:")
        echo("")
        echo(f"    {url}")
        echo("")
        if options.open_browser and browser_available():
            _open_browser(url)
            echo("(popbox asked this machine's browser to open it.)")
        echo(
            f"The browser then goes to {redirect_uri}/. If it runs on "
            "another machine, that page does not load: copy the whole address from its "
            "address bar, paste it here and press Enter."
        )
        parameters = await listener.wait(
            max_wait=options.max_wait, pasted=options.pasted, echo=echo
        )
    if "error" in parameters:
        code = parameters["error"][:ERROR_EXCERPT_CHARS]
        detail = parameters.get("error_description", "")[:ERROR_EXCERPT_CHARS]
        why = " (the user declined, or the app may not ask for these scopes)"
        raise CollectorError(
            f"browser login refused: {code} {detail}".rstrip()
            + (why if code == "access_denied" else "")
        )
    return parameters, redirect_uri


def authorization_url(endpoint: str, parameters: Mapping[str, str]) -> str:
    """``endpoint`` with ``parameters`` added to whatever query it has."""
    joiner = "&" if urllib.parse.urlsplit(endpoint).query else "?"
    return endpoint + joiner + urllib.parse.urlencode(parameters, quote_via=urllib.parse.quote)


async def generic_browser_login(
    client: OAuthHttpClient,
    authorization_endpoint: str,
    token_file: TokenFile,
    options: BrowserOptions,
    *,
    extra_parameters: Mapping[str, str] | None = None,
) -> None:
    """Authorization code with PKCE; stores the refresh token in ``token_file``
    exactly as the device login does."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(STATE_OCTETS)

    async def start(redirect_uri: str) -> tuple[str, str]:
        parameters = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **({"scope": " ".join(client.scopes)} if client.scopes else {}),
            **(extra_parameters or {}),
        }
        return authorization_url(authorization_endpoint, parameters), state

    answer, redirect_uri = await authorize_in_browser(start, options)
    document = await client.exchange_code(answer["code"], redirect_uri, verifier)
    await save_refresh_token(token_file, document, client.token_endpoint, "browser login")
