"""``cognito-sidecar login``: the authorization-code bootstrap that gets the machine credential.

Builds the hosted UI URL with PKCE (S256) and a random ``state``, listens once on the redirect URI's
own host, port and path for Cognito's redirect, checks ``state``, and exchanges the code exactly as
the seed does (Basic auth, ``grant_type``, ``code``, ``redirect_uri`` byte for byte the one in the
authorize URL, ``client_id``) plus the ``code_verifier``. The refresh token goes to a file, atomically,
mode 0600; it is printed only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import html
import secrets
import sys
import webbrowser
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.errors import ConfigError, SidecarError
from proxy.secrets import write_secret_file
from proxy.server.serving import running
from proxy.settings import load_settings
from proxy.tokens.build import endpoint_for, token_http
from proxy.tokens.endpoint import TokenEndpoint
from proxy.tokens.token import TokenResponse


class LoginError(SidecarError):
    """The login could not complete; the message says why and what to do."""

    code = "login_failed"


@dataclass(frozen=True)
class Pkce:
    verifier: str = field(repr=False)
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43-128
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def domain_of(token_url: str) -> str:
    """The user pool domain (hosted UI base) from the token URL."""
    return token_url.removesuffix("/oauth2/token")


def authorize_url(*, domain: str, client_id: str, redirect_uri: str, scope: str, state: str, pkce: Pkce | None) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
    }
    if pkce is not None:
        params |= {"code_challenge": pkce.challenge, "code_challenge_method": "S256"}
    return f"{domain}/oauth2/authorize?{urlencode(params)}"


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>cognito-sidecar</title></head>
<body style="font-family: sans-serif; margin: 3em"><h1>{title}</h1><p>{text}</p></body></html>"""


@contextlib.asynccontextmanager
async def callback_listener(redirect_uri: str, state: str) -> AsyncIterator[asyncio.Future[str]]:
    """Listen at ``redirect_uri`` for Cognito's redirect; the future gets the code or a ``LoginError``.

    The port is bound before this yields, so the authorize URL can be shown knowing the redirect will land.
    """
    parts = urlsplit(redirect_uri)
    if parts.scheme != "http" or not parts.hostname:
        raise LoginError(
            f"cannot listen at {redirect_uri}: only http://localhost-style redirect URIs can be caught here. "
            "Use --code with the code from the browser's address bar instead."
        )
    path = parts.path or "/"
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def callback(request: Request) -> Response:
        params = request.query_params
        if outcome.done():
            return HTMLResponse(_PAGE.format(title="Already done", text="You can close this tab."))
        if "error" in params:
            error = params["error"]
            description = params.get("error_description", "")
            outcome.set_exception(
                LoginError(
                    f"Cognito refused the sign-in: {error}"
                    + (f" ({description})" if description else "")
                    + ". If it says invalid_redirect or redirect_mismatch, add exactly "
                    f"{redirect_uri} to the app client's callback URLs (a trailing slash counts)."
                )
            )
            return HTMLResponse(_PAGE.format(title="Sign-in failed", text=html.escape(f"{error}: {description}")), 400)
        if not secrets.compare_digest(params.get("state", ""), state):
            outcome.set_exception(
                LoginError("the redirect carried a different state: it did not come from this login. Run it again.")
            )
            return HTMLResponse(_PAGE.format(title="Sign-in failed", text="Unexpected state."), 400)
        code = params.get("code")
        if not code:
            outcome.set_exception(LoginError("the redirect carried no code; run the login again."))
            return HTMLResponse(_PAGE.format(title="Sign-in failed", text="No code."), 400)
        outcome.set_result(code)
        return HTMLResponse(
            _PAGE.format(title="Signed in", text="cognito-sidecar has the code. You can close this tab.")
        )

    app = Starlette(routes=[Route(path, callback, methods=["GET"])])
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(running(app, host=parts.hostname, port=parts.port or 80, grace=1))
        except OSError as exc:
            raise LoginError(f"cannot listen for the redirect at {redirect_uri}: {exc}") from None
        yield outcome


async def wait_for_code(outcome: asyncio.Future[str], redirect_uri: str, wait_seconds: float) -> str:
    """The code from ``callback_listener``'s future, or ``LoginError`` after ``wait_seconds``."""
    try:
        async with asyncio.timeout(wait_seconds):
            return await outcome
    except TimeoutError:
        raise LoginError(
            f"no sign-in came back to {redirect_uri} within {wait_seconds:g} s. Open the URL above in a "
            "browser that can reach this machine, or copy the code from the address bar and use --code."
        ) from None


async def exchange(
    endpoint: TokenEndpoint, *, code: str, redirect_uri: str, verifier: str | None, client_secret: str | None
) -> TokenResponse:
    response = await endpoint.exchange_code(code, redirect_uri, verifier, client_secret)
    if not response.refresh_token:
        raise LoginError(
            "the code exchange worked but Cognito sent no refresh token: enable ALLOW_REFRESH_TOKEN_AUTH on the "
            "app client."
        )
    return response


def write_refresh_token(path: Path, token: str) -> None:
    try:
        # A directory made here is the owner's alone (0700): it holds nothing but secrets.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_secret_file(path, token)
    except OSError as exc:
        raise LoginError(f"cannot write the refresh token to {path}: {exc.strerror}") from None


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(env, purpose="login")
    out: Path | None = args.out or settings.refresh_token_file
    if out is None and not args.print_token:
        raise ConfigError(
            ["--out: say where to save the refresh token (or set SIDECAR_REFRESH_TOKEN_FILE, or --print)"]
        )
    secret = settings.client_secret.get_secret_value() if settings.client_secret else None
    async with token_http(settings) as http:
        endpoint = endpoint_for(settings, settings, http)
        verifier = args.code_verifier
        code = args.code
        if code is None:
            pkce = None if args.no_pkce else Pkce.new()
            state = secrets.token_urlsafe(24)
            url = authorize_url(
                domain=domain_of(settings.token_url),
                client_id=settings.client_id,
                redirect_uri=args.redirect_uri,
                scope=args.scope,
                state=state,
                pkce=pkce,
            )
            async with callback_listener(args.redirect_uri, state) as outcome:
                print(f"Open this URL in a browser and sign in:\n\n  {url}\n", file=sys.stderr, flush=True)
                if not args.no_browser and (
                    env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or sys.platform == "darwin"
                ):
                    webbrowser.open(url)
                print(f"Waiting up to {args.timeout:g} s for the redirect to {args.redirect_uri} ...", file=sys.stderr)
                code = await wait_for_code(outcome, args.redirect_uri, args.timeout)
            verifier = pkce.verifier if pkce else None
        response = await exchange(
            endpoint, code=code, redirect_uri=args.redirect_uri, verifier=verifier, client_secret=secret
        )
    refresh_token = response.refresh_token or ""  # exchange() refuses an answer without one
    if out is not None:
        write_refresh_token(out, refresh_token)
        print(f"Saved the refresh token to {out} (mode 0600). Next, run the sidecar with it:", file=sys.stderr)
        print(f"  SIDECAR_REFRESH_TOKEN_FILE={out} cognito-sidecar serve", file=sys.stderr)
    if args.print_token:
        print(refresh_token)
    return 0
