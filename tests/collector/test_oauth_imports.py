"""What each kind of account loads: msal only for Microsoft, httpx only for OAuth.

`popbox fetch` runs from cron every minute; msal (with requests) and httpx are a large
part of its start-up, so accounts that do not need them must not pay for them.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """\
import sys, tempfile, pathlib
from popbox.collector.config import fetch_settings_from_dict
from popbox.collector.auth import build_token_provider
import popbox.collector.poll

tmp = pathlib.Path(tempfile.mkdtemp())
def account(**oauth):
    entry = {"name": "a", "host": "h", "username": "u", "password_env": "X",
             "sinks": [{"kind": "maildir", "path": str(tmp / "m")}]}
    if oauth:
        entry.update(auth="oauth2", password_env=None, oauth=oauth)
    settings = fetch_settings_from_dict({"state_dir": str(tmp), "accounts": [entry]}, tmp)
    return settings.accounts[0], settings

def loaded():
    return " ".join(name for name in ("httpx", "msal") if name in sys.modules) or "-"

print("password", loaded())
print("command", type(build_token_provider(*account(
    token_source="command", token_command="true"))).__name__, loaded())
print("google", type(build_token_provider(*account(
    token_source="refresh_token", provider="google", client_id="c"))).__name__, loaded())
# Building a Microsoft provider would ask the authority; naming one is enough here.
import popbox.collector.oauth as oauth
print("microsoft", oauth.MsalRefreshTokenProvider.__name__, loaded())
"""


def test_msal_is_loaded_only_for_microsoft_accounts_and_httpx_only_for_oauth() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "password -",
        "command CommandTokenProvider httpx",
        "google RefreshTokenProvider httpx",
        "microsoft MsalRefreshTokenProvider httpx msal",
    ]
