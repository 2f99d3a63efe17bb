"""The status page at ``/-/``, in a real headless browser (Debian's chromium; ``scripts/check`` installs it): the
page renders from live data, shows a refused token's explanation, lists requests without their query strings, and
shows no secret anywhere in the DOM. Its headers and its refusals are checked over plain HTTP."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import httpx2
import pytest

from proxy.status import PAGE
from tests.conftest import Stack, assert_hidden, run_sidecar

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium is missing (scripts/check installs Debian's)")


async def dom(url: str) -> str:
    """The page's DOM once its script has run (its first fetch of /-/status.json included)."""
    command = [
        str(BROWSER),
        "--headless",
        "--no-sandbox",  # the suite may run as root
        "--disable-gpu",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def text_of(html: str) -> str:
    """What a person reads: the DOM without its tags."""
    return re.sub(r"<[^>]+>", " ", html)


@pytest.mark.slow
async def test_the_status_page_shows_a_refused_token_and_the_last_requests_and_never_a_secret(
    stack: Stack, client: httpx2.AsyncClient
):
    stack.emulator.cognito.fail_next(400, '{"error":"invalid_grant"}', times=1)
    async with run_sidecar(stack.settings(metrics_listen="127.0.0.1:0")) as sidecar:
        refused = await client.get(f"{sidecar.url}/orders/7?email=someone@example.com")
        page = await client.get(f"{sidecar.url}/-/")
        first = await dom(f"{sidecar.url}/-/")
        # The refusal is held for a minute; a new secret file value would end it. Here: a request after the first
        # look, which the page shows on its next one.
        later = await client.get(f"{sidecar.url}/items/42")
        second = await dom(f"{sidecar.url}/-/")
        on_metrics_listener = await client.get(f"{sidecar.metrics_url}/-/")
    assert refused.status_code == 503 and refused.headers["x-sidecar-error"] == "token_rejected"
    assert later.status_code == 503
    # Served with a strict policy, and no script or style of its own inline.
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in PAGE and "style=" not in PAGE and "<style" not in PAGE
    # What the browser rendered from /-/status.json.
    shown = text_of(first)
    assert "/ → " + stack.upstream_url in shown
    assert "token_rejected" in shown and "invalid_grant" in shown  # the refusal, explained
    assert "ALLOW_REFRESH_TOKEN_AUTH" in shown or "cognito-sidecar login" in shown
    assert "/orders/7" in shown and "someone@example.com" not in shown  # never a query string
    assert "/items/42" not in shown and "/items/42" in text_of(second)  # live data: the later request
    for html in (first, second):
        assert_hidden(html, stack.emulator.refresh_token, stack.emulator.client.secret or "")
        assert "eyJ" not in html  # no JWT, whatever its kind
    assert on_metrics_listener.status_code == 404  # never on the metrics listener


async def test_the_status_data_names_the_token_in_hands_claims_not_the_token(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings()) as sidecar:
        assert (await client.get(f"{sidecar.url}/a")).status_code == 200
        data = (await client.get(f"{sidecar.url}/-/status.json")).json()
        held = sidecar.tokens.usable()
    assert held is not None
    [route] = data["routes"]
    credential = route["credential"]
    assert (credential["state"], credential["last_outcome"]) == ("ready", "success")
    assert credential["claims"]["aud"] == stack.emulator.client.client_id and credential["claims"]["token_use"] == "id"
    assert 0 < credential["next_refresh_in"] < credential["expires_in"] <= 3600
    assert [row["path"] for row in data["requests"]] == ["/a"]  # the page's own /-/ requests are not listed
    assert_hidden(str(data), held["id_token"].value, stack.emulator.refresh_token, stack.emulator.client.secret or "")
