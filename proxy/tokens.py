"""The token endpoint client: grants, client authentication and error classification.

Talks to Cognito's ``/oauth2/token`` exactly as Cognito expects (see shared/docs/cognito.md): a form
POST, ``Authorization: Basic base64(client_id:client_secret)`` when the app client has a secret, and
``client_id`` in the body as well. Every failure becomes a ``TokenEndpointError`` that says what
happened, the likely causes for the flow in progress, what to do, and the raw status and body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx2
import jwt

from proxy.errors import PermanentTokenError, TokenEndpointError, TokenUnusableError, TransientTokenError

# Raw error bodies are quoted to the person; anything longer than this is an HTML page or worse.
BODY_EXCERPT_CHARS = 300

TOKEN_KINDS = ("id_token", "access_token")

# OAuth error codes after which retrying cannot help until a person changes something.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)

_BASIC_HINT = (
    "the Basic value must be base64 of client_id:client_secret, encoded once, and the secret must belong to this "
    "app client (a public client has no secret: leave SIDECAR_CLIENT_SECRET unset)"
)

# (error, flow) -> (likely causes, what to do). flow "*" applies to every flow.
EXPLANATIONS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("invalid_grant", "refresh"): (
        (
            "the refresh token expired (its life counts from the original sign-in; refreshing or rotation does not "
            "extend it; default 30 days)",
            "it was revoked (sign-out, /oauth2/revoke or an admin action)",
            "it was issued to another app client than SIDECAR_CLIENT_ID",
            "refresh token rotation is on and this token was rotated out after its grace period",
        ),
        "get a new refresh token with `cognito-sidecar login` (the authorization-code flow) and put it in "
        "SIDECAR_REFRESH_TOKEN_FILE, then restart or send SIGHUP.",
    ),
    ("invalid_grant", "login"): (
        (
            "the authorization code was already used or is older than a few minutes",
            "redirect_uri differs from the one in the authorize request, byte for byte (a trailing slash counts)",
            "the code was issued to another app client",
            "the PKCE code_verifier does not match the code_challenge",
        ),
        "run `cognito-sidecar login` again and exchange the new code at once, with the same --redirect-uri.",
    ),
    ("invalid_client", "*"): (
        (
            "SIDECAR_CLIENT_ID or SIDECAR_CLIENT_SECRET is wrong or from another user pool",
            _BASIC_HINT,
            "the app client's secret was rotated and this one was removed",
        ),
        "copy the app client id and secret again from Cognito (App integration > App clients) into "
        "SIDECAR_CLIENT_ID and SIDECAR_CLIENT_SECRET_FILE.",
    ),
    ("unauthorized_client", "*"): (
        (
            "the grant in use is not enabled on the app client (refresh tokens need the "
            "ALLOW_REFRESH_TOKEN_AUTH flow; client_credentials needs that grant and a secret)",
            "the redirect_uri is not registered on the app client (Cognito says error_description=invalid_redirect)",
        ),
        "enable the grant (and the callback URL) on the app client in Cognito, or use the credential it was made for.",
    ),
    ("invalid_request", "*"): (
        (
            "a required form field is missing or malformed",
            "the request did not reach Cognito's /oauth2/token unchanged",
        ),
        "check SIDECAR_TOKEN_URL (or SIDECAR_COGNITO_DOMAIN) points at the user pool domain, with no proxy rewriting "
        "the request.",
    ),
    ("unsupported_grant_type", "*"): (
        ("the endpoint does not know this grant_type", "SIDECAR_TOKEN_URL is not a Cognito token endpoint"),
        "check SIDECAR_TOKEN_URL ends with /oauth2/token on the user pool domain.",
    ),
    ("invalid_scope", "*"): (
        ("a requested scope is not allowed for this app client",),
        "request only scopes enabled on the app client (App client > Hosted UI > Custom scopes).",
    ),
}


def explain(error: str, flow: str) -> tuple[tuple[str, ...], str]:
    """The likely causes and the fix for an OAuth error code during ``flow``."""
    return EXPLANATIONS.get((error, flow)) or EXPLANATIONS.get((error, "*")) or ((), "")


@dataclass(frozen=True)
class TokenResponse:
    """A successful token endpoint answer. Token values never appear in its repr."""

    id_token: str | None = field(repr=False)
    access_token: str | None = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int | None
    token_type: str


@dataclass(frozen=True)
class Token:
    """One token ready to inject: its value and when it stops being usable.

    ``refresh_at`` is when a request should trigger a refresh (expiry minus the safety margin);
    ``expires_at`` is when it must never be sent again (the real expiry, less a little clock skew).
    """

    kind: str
    value: str = field(repr=False)
    issued_at: float
    refresh_at: float
    expires_at: float
    claims: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at


# A token is never sent this close to its real expiry: clocks drift and the request takes time.
HARD_EXPIRY_SKEW = 5.0


def read_claims(token: str) -> dict[str, Any]:
    """The JWT's claims, unverified (API Gateway verifies; the sidecar only needs exp and friends)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


@dataclass(frozen=True)
class TokenSet:
    """The tokens of one answer, by kind; usable while every one of them is."""

    tokens: Mapping[str, Token]

    def __getitem__(self, kind: str) -> Token:
        return self.tokens[kind]

    # Read on every request: computed once.
    @cached_property
    def refresh_at(self) -> float:
        return min(token.refresh_at for token in self.tokens.values())

    @cached_property
    def expires_at(self) -> float:
        return min(token.expires_at for token in self.tokens.values())

    @cached_property
    def issued_at(self) -> float:
        return max(token.issued_at for token in self.tokens.values())

    def holds(self, token: Token) -> bool:
        return any(mine is token for mine in self.tokens.values())


def make_token_set(response: TokenResponse, *, kinds: frozenset[str], margin: float, now: float) -> TokenSet:
    """The ``kinds`` of token the routes need, from one answer; ``TokenUnusableError`` if one is missing."""
    return TokenSet({kind: make_token(response, kind=kind, margin=margin, now=now) for kind in sorted(kinds)})


def make_token(response: TokenResponse, *, kind: str, margin: float, now: float) -> Token:
    """Turn a token response into the ``Token`` to inject, timed by the JWT's own ``exp`` claim."""
    value = response.id_token if kind == "id_token" else response.access_token
    if not value:
        present = [name for name in TOKEN_KINDS if getattr(response, name)]
        raise TokenUnusableError(
            f"the token endpoint answered without an {kind} (it sent: {', '.join(present) or 'no token'}). "
            + (
                "A client_credentials or access-only flow has no id token: set SIDECAR_TOKEN=access_token."
                if kind == "id_token"
                else "Check the app client's settings."
            )
        )
    try:
        claims = read_claims(value)
    except jwt.PyJWTError:
        claims = {}
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        expires = float(exp)
    elif response.expires_in:
        expires = now + response.expires_in
    else:
        raise TokenUnusableError(
            f"the {kind} has no exp claim and the answer no expires_in, so the sidecar cannot tell when it expires"
        )
    iat = claims.get("iat")
    issued = float(iat) if isinstance(iat, int | float) and iat <= now + 60 else now
    life = max(expires - issued, 0.0)
    # At most half the token's life, so short-lived test tokens are still used for a while.
    effective_margin = min(margin, life / 2)
    skew = min(HARD_EXPIRY_SKEW, life / 10)
    if not value.isascii():
        raise TokenUnusableError(f"the {kind} contains non-ASCII characters and cannot be sent in a header")
    return Token(
        kind=kind,
        value=value,
        issued_at=issued,
        refresh_at=expires - effective_margin,
        expires_at=expires - skew,
        claims=claims,
    )


def _excerpt(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    if len(text) > BODY_EXCERPT_CHARS:
        text = text[:BODY_EXCERPT_CHARS] + "..."
    return text


class TokenEndpoint:
    """Client of one app client at one token endpoint. Holds no refresh token itself."""

    def __init__(self, client: httpx2.AsyncClient, *, token_url: str, client_id: str, timeout: float) -> None:
        self._client = client
        self.token_url = token_url
        self.client_id = client_id
        self._timeout = timeout
        self.requests = 0

    def __repr__(self) -> str:
        return f"TokenEndpoint(token_url={self.token_url!r}, client_id={self.client_id!r})"

    async def refresh(self, refresh_token: str, client_secret: str | None) -> TokenResponse:
        """The refresh_token grant."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.client_id}
        return await self.request("refresh", form, client_secret, secrets=(refresh_token,))

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
        self, flow: str, form: dict[str, str], client_secret: str | None, *, secrets: tuple[str, ...] = ()
    ) -> TokenResponse:
        """POST ``form`` with client authentication; classify every failure."""
        secrets = (*secrets, client_secret or "")
        # A public client authenticates with client_id in the body alone: no Authorization header at all.
        auth = httpx2.BasicAuth(self.client_id, client_secret) if client_secret else httpx2.USE_CLIENT_DEFAULT
        self.requests += 1
        try:
            response = await self._client.post(
                self.token_url,
                data=form,
                auth=auth,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx2.TimeoutException as exc:
            raise TransientTokenError(
                flow=flow,
                status=None,
                error=None,
                body="",
                summary=f"The token endpoint {self.token_url} did not answer within {self._timeout:g} s "
                f"({type(exc).__name__}).",
                fix="check network access to the Cognito domain; the sidecar keeps retrying.",
            ) from None
        except httpx2.HTTPError as exc:
            raise TransientTokenError(
                flow=flow,
                status=None,
                error=None,
                body="",
                summary=f"Could not reach the token endpoint {self.token_url} ({type(exc).__name__}: "
                f"{_excerpt(str(exc), secrets) or 'no detail'}).",
                fix="check DNS, proxy and firewall settings for the Cognito domain; the sidecar keeps retrying.",
            ) from None
        if response.status_code == 200:
            return self._parse_success(flow, response)
        raise self._classify(flow, response, secrets)

    def _parse_success(self, flow: str, response: httpx2.Response) -> TokenResponse:
        # A 200 body holds tokens: it is never quoted, only described.
        try:
            data = json.loads(response.content)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not (data.get("access_token") or data.get("id_token")):
            shape = (
                f"keys {sorted(data)}"
                if isinstance(data, dict)
                else f"{len(response.content)} bytes, not a JSON object"
            )
            raise TransientTokenError(
                flow=flow,
                status=200,
                error=None,
                body=f"(body withheld: {shape})",
                summary="The token endpoint answered 200 without tokens.",
                causes=("a proxy or captive portal answered instead of Cognito", "the endpoint is overloaded"),
                fix="check SIDECAR_TOKEN_URL; the sidecar keeps retrying.",
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

    def _classify(self, flow: str, response: httpx2.Response, secrets: tuple[str, ...]) -> TokenEndpointError:
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
                summary=f"{self.token_url} is not a token endpoint (HTTP {status}).",
                causes=("SIDECAR_COGNITO_DOMAIN or SIDECAR_TOKEN_URL names the wrong host or path",),
                fix="use the user pool domain from Cognito (App integration > Domain); the token URL is it plus "
                "/oauth2/token.",
            )
        if status == 429 or (status == 400 and error is None):
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
            fix="the sidecar retries with backoff; if it persists, check the token endpoint's health.",
        )
