"""The token endpoint client: client authentication and error classification.

Talks to Cognito's ``/oauth2/token`` exactly as Cognito expects (see shared/docs/cognito.md): a form
POST, ``Authorization: Basic base64(client_id:client_secret)`` when the app client has a secret, and
``client_id`` in the body as well. Every failure becomes a ``TokenEndpointError`` that says what
happened, the likely causes for the flow in progress, what to do, and the raw status and body.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable

import httpx2

from proxy.egress.failures import EgressFailure, describe_failure, proxy_refusal
from proxy.egress.route import EgressProxy, target_of
from proxy.egress.transport import proxy_status
from proxy.errors import (
    EgressError,
    PermanentTokenError,
    TokenEndpointError,
    TokenError,
    TransientTokenError,
)
from proxy.tokens.explain import PERMANENT_ERRORS, explain
from proxy.tokens.token import TokenResponse

# Raw error bodies are quoted to the person; anything longer than this is an HTML page or worse.
BODY_EXCERPT_CHARS = 300


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date, RFC 9110 10.2.3); ``None``
    when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now, 0.0)


def _secret_forms(client_id: str, client_secret: str | None) -> tuple[str, ...]:
    """Every form in which the client secret leaves this process, so that an endpoint echoing the request
    cannot make the sidecar show it: raw (and form-encoded, see ``_excerpt``), and as the Basic credentials
    ``base64(id:secret)``, with or without padding."""
    if not client_secret:
        return ()
    basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode("ascii")
    return (client_secret, basic, basic.rstrip("="))


# A secret at least this long is replaced wherever it occurs (it cannot turn up by chance, and an endpoint that
# glues it to other letters must not reveal it); a shorter one only where it stands alone.
REDACT_ANYWHERE = 8


def _redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` replaced: everywhere when it is long enough to be a real secret, else only where it
    stands alone (not inside a run of letters and digits), so that a short secret (``r``) leaves "Errno" whole
    while ``client_secret=r&`` still hides it."""
    if len(secret) >= REDACT_ANYWHERE:
        return text.replace(secret, "[redacted]")
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "[redacted]", text)


def _excerpt(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = _redact(text, secret)
            encoded = urllib.parse.quote_plus(secret)
            if encoded != secret:
                text = _redact(text, encoded)
    text = " ".join(text.split())
    if len(text) > BODY_EXCERPT_CHARS:
        text = text[:BODY_EXCERPT_CHARS] + "..."
    return text


class TokenEndpoint:
    """Client of one app client at one token endpoint. Holds no refresh token itself."""

    def __init__(
        self,
        client: httpx2.AsyncClient,
        *,
        token_url: str,
        client_id: str,
        timeout: float,
        proxy: EgressProxy | None = None,
    ) -> None:
        self._client = client
        self.token_url = token_url
        self.client_id = client_id
        self._timeout = timeout
        # The egress proxy requests to the token URL go through (the client chooses it; this names it in errors).
        self.proxy = proxy
        # HTTP requests by outcome: "success" or the failure's ``failure_kind`` (for /-/metrics).
        self.outcomes: Counter[str] = Counter()
        # Failures on the way (egress proxy, TLS) by code (for /-/metrics).
        self.egress_failures: Counter[str] = Counter()
        self.last_answer_at = 0.0

    def __repr__(self) -> str:
        return f"TokenEndpoint(token_url={self.token_url!r}, client_id={self.client_id!r})"

    async def refresh(
        self, refresh_token: str, client_secret: str | None, *, on_refresh_token: Callable[[str], None] | None = None
    ) -> TokenResponse:
        """The refresh_token grant. ``on_refresh_token`` gets a refresh token in the answer (rotation) before
        anything else is done with the answer, so that it can be stored at once."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.client_id}
        return await self.request(
            "refresh", form, client_secret, secrets=(refresh_token,), on_refresh_token=on_refresh_token
        )

    async def client_credentials(self, scopes: str, client_secret: str) -> TokenResponse:
        """The client_credentials grant (machine to machine); ``scopes`` space-separated, may be empty."""
        form = {"grant_type": "client_credentials", "client_id": self.client_id}
        if scopes:
            form["scope"] = scopes
        return await self.request("client_credentials", form, client_secret)

    async def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None, client_secret: str | None
    ) -> TokenResponse:
        """The authorization_code grant, as the seed does it, plus the PKCE verifier when there is one."""
        form = {
            "grant_type": "authorization_code",
            "client_id": self.client_id,
            "code": code,
            "redirect_uri": redirect_uri,
        }
        if code_verifier:
            form["code_verifier"] = code_verifier
        return await self.request("login", form, client_secret, secrets=(code, code_verifier or ""))

    async def request(
        self,
        flow: str,
        form: dict[str, str],
        client_secret: str | None,
        *,
        secrets: tuple[str, ...] = (),
        on_refresh_token: Callable[[str], None] | None = None,
    ) -> TokenResponse:
        """POST ``form`` with client authentication; classify every failure."""
        try:
            answer = await self._post(flow, form, client_secret, secrets=secrets, on_refresh_token=on_refresh_token)
        except TokenError as exc:
            self.outcomes[exc.failure_kind] += 1
            raise
        self.outcomes["success"] += 1
        return answer

    async def _post(
        self,
        flow: str,
        form: dict[str, str],
        client_secret: str | None,
        *,
        secrets: tuple[str, ...],
        on_refresh_token: Callable[[str], None] | None,
    ) -> TokenResponse:
        secrets = (*secrets, *_secret_forms(self.client_id, client_secret))
        # A public client authenticates with client_id in the body alone: no Authorization header at all.
        auth = httpx2.BasicAuth(self.client_id, client_secret) if client_secret else httpx2.USE_CLIENT_DEFAULT
        try:
            response = await self._client.post(
                self.token_url,
                data=form,
                auth=auth,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx2.TimeoutException as exc:
            raise TransientTokenError.unanswered(
                flow=flow,
                summary=f"The token endpoint {self.token_url} did not answer within {self._timeout:g} s "
                f"({type(exc).__name__}).",
                fix="check network access to the Cognito domain",
            ) from None
        except httpx2.HTTPError as exc:
            failure = describe_failure(
                exc,
                target=target_of(self.token_url),
                what="token_endpoint",
                proxy=self.proxy,
                proxy_status=proxy_status(exc),
                connect_error=isinstance(exc, httpx2.ConnectError),
            )
            if failure is not None:
                raise self._egress_error(flow, failure) from None
            raise TransientTokenError.unanswered(
                flow=flow,
                summary=f"Could not reach the token endpoint {self.token_url} ({type(exc).__name__}: "
                f"{_excerpt(str(exc), secrets) or 'no detail'}).",
                fix="check DNS, proxy and firewall settings for the Cognito domain",
            ) from None
        if response.status_code == 407 and self.proxy is not None:  # a plain-http endpoint: the proxy answered
            raise self._egress_error(flow, proxy_refusal(self.proxy, 407, target_of(self.token_url)))
        # When the whole answer was in hand: the start of the window in which a rotated refresh token exists
        # only in this process's memory.
        self.last_answer_at = time.perf_counter()
        if response.status_code == 200:
            return parse_success(flow, response, on_refresh_token)
        raise classify(flow, self.token_url, response, secrets)

    def _egress_error(self, flow: str, failure: EgressFailure) -> EgressError:
        self.egress_failures[failure.code] += 1
        return EgressError(
            code=failure.code,
            flow=flow,
            status=None,
            error=None,
            body="",
            summary=f"Could not reach the token endpoint {self.token_url}: {failure.summary}.",
            fix=failure.fix,
        )


def parse_success(
    flow: str, response: httpx2.Response, on_refresh_token: Callable[[str], None] | None
) -> TokenResponse:
    """The tokens of a 200 answer; a rotated refresh token goes to ``on_refresh_token`` before anything else is
    looked at. A 200 body holds tokens: it is never quoted, only described."""
    try:
        data = json.loads(response.content)
    except ValueError:
        data = None
    if on_refresh_token is not None and isinstance(data, dict):
        rotated = data.get("refresh_token")
        if isinstance(rotated, str) and rotated:
            on_refresh_token(rotated)  # before anything else: until it is stored, a crash loses it
    if not isinstance(data, dict) or not (data.get("access_token") or data.get("id_token")):
        shape = (
            f"keys {sorted(data)}" if isinstance(data, dict) else f"{len(response.content)} bytes, not a JSON object"
        )
        raise TransientTokenError(
            flow=flow,
            status=200,
            error=None,
            body=f"(body withheld: {shape})",
            summary="The token endpoint answered 200 without tokens.",
            causes=("a proxy or captive portal answered instead of Cognito", "the endpoint is overloaded"),
            fix="check SIDECAR_TOKEN_URL",
        )
    expires_in = data.get("expires_in")

    def text(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) and value else None

    return TokenResponse(
        id_token=text("id_token"),
        access_token=text("access_token"),
        refresh_token=text("refresh_token"),
        expires_in=int(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None,
        token_type=str(data.get("token_type", "Bearer")),
    )


def classify(flow: str, token_url: str, response: httpx2.Response, secrets: tuple[str, ...]) -> TokenEndpointError:
    """What a non-200 answer means: a refusal a person must fix, or a failure worth retrying."""
    status = response.status_code
    causes: tuple[str, ...] = ()
    body = _excerpt(response.content.decode("utf-8", "replace"), secrets)
    error: str | None = None
    try:
        data = json.loads(response.content)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            error = data["error"]
    except ValueError:
        pass
    if error in PERMANENT_ERRORS and status in (400, 401):
        causes, fix = explain(error, flow)
        return PermanentTokenError(
            flow=flow,
            status=status,
            error=error,
            body=body,
            summary=f"Cognito refused the {flow} request with {error}.",
            causes=causes,
            fix=fix,
        )
    if status in (404, 405):
        return PermanentTokenError(
            flow=flow,
            status=status,
            error=error,
            body=body,
            summary=f"{token_url} is not a token endpoint (HTTP {status}).",
            causes=("SIDECAR_COGNITO_DOMAIN or SIDECAR_TOKEN_URL names the wrong host or path",),
            fix="use the user pool domain from Cognito (App integration > Domain); the token URL is it plus "
            "/oauth2/token.",
        )
    # Cognito throttles with 429, or with TooManyRequestsException in a JSON or HTML body under another status.
    throttled = status == 429 or b"TooManyRequestsException" in response.content
    retry_after = (
        parse_retry_after(response.headers.get("retry-after"), now=time.time()) if status in (429, 503) else None
    )
    if throttled or (status == 400 and error is None):
        summary = f"The token endpoint is throttling or answered an unknown error (HTTP {status})."
        causes = ("the account's UserAuthentication quota is exhausted",)
    elif status >= 500:
        summary = f"The token endpoint failed (HTTP {status})."
        causes = ("Cognito or a proxy in between is having trouble",)
    else:
        summary = f"The token endpoint answered HTTP {status}" + (f" with {error}." if error else ".")
    return TransientTokenError(
        flow=flow,
        status=status,
        error=error,
        body=body,
        summary=summary,
        causes=causes,
        fix="if it persists, check the token endpoint's health",
        retry_after=retry_after,
        throttled=throttled,
    )
