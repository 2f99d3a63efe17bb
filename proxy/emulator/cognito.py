"""A local stand-in for Amazon Cognito's OAuth2 endpoints, faithful to shared/docs/cognito.md.

``/oauth2/token`` (the three grants; client_secret_basic, client_secret_post and public clients; every
error body and status), ``/oauth2/authorize`` (logs the configured test user in without a browser),
``/oauth2/revoke`` and the JWKS. Tokens are RS256 JWTs with Cognito's claims. Lifetimes go down to
seconds, refresh token rotation has a grace period, ``fail_next`` makes it answer any error (with any
headers, e.g. ``Retry-After``, and any delay), ``latency`` slows or hangs every request before Cognito acts on it
(a client that leaves meanwhile is never served, as a request lost on the way), ``answer_latency`` delays the
answer after it acted (a rotation is done, the answer still on its way), and ``skew`` sets its clock off from the
sidecar's.
It counts the token requests it served and how refreshes ended, for tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

JSON_TYPE = "application/json;charset=UTF-8"
GRANTS = ("authorization_code", "refresh_token", "client_credentials")


@dataclass
class AppClient:
    """An app client: its secret (None for a public client), enabled grants, callback URLs and scopes."""

    client_id: str
    secret: str | None = field(default=None, repr=False)
    grants: frozenset[str] = frozenset({"authorization_code", "refresh_token"})
    redirect_uris: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    rotate_refresh_tokens: bool = False
    grace_period: float = 0.0


@dataclass
class _RefreshRecord:
    client_id: str
    username: str
    sub: str
    scope: str
    auth_time: int
    expires_at: float
    retired_at: float | None = None


@dataclass
class _CodeRecord:
    client_id: str
    redirect_uri: str
    challenge: str | None
    scope: str
    username: str
    expires_at: float


@dataclass
class Fault:
    """An answer to give instead of the real one: a status, a raw body, extra headers and an optional delay."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class CognitoEmulator:
    """One user pool with its app clients, users and keys. ``app`` is its ASGI application."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        pool_id: str = "us-east-1_Emu1ator",
        token_lifetime: int = 3600,
        refresh_lifetime: int = 30 * 86400,
        code_lifetime: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.region = region
        self.pool_id = pool_id
        self.issuer = f"https://cognito-idp.{region}.amazonaws.com/{pool_id}"
        self.token_lifetime = token_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.code_lifetime = code_lifetime
        self.clock = clock
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "emulator-" + secrets.token_hex(4)
        self.clients: dict[str, AppClient] = {}
        self.users: dict[str, str] = {}
        self.login_user = "machine-user"
        self._refresh: dict[str, _RefreshRecord] = {}
        self._codes: dict[str, _CodeRecord] = {}
        self.faults: deque[Fault] = deque()
        # Seconds every token request waits before it is acted on, to widen the window in which requests pile up
        # (or, large, a hang); and seconds its answer waits after it (a rotation has happened, the answer not arrived).
        self.latency = 0.0
        self.answer_latency = 0.0
        # Refresh grants by result: "ok", or the error code; "abandoned": the client left before Cognito acted.
        self.refresh_outcomes: Counter[str] = Counter()
        # Seconds this pool's clock is off from ``clock`` (negative: behind): tokens carry iat/exp from it.
        self.skew = 0.0
        self.token_requests = 0
        self.seen = asyncio.Event()  # set by every token request: tests wait on it instead of polling
        self.grant_counts: Counter[str] = Counter()
        self.app = Starlette(
            routes=[
                Route("/oauth2/token", self._token, methods=["POST"]),
                Route("/oauth2/authorize", self._authorize, methods=["GET"]),
                Route("/oauth2/revoke", self._revoke, methods=["POST"]),
                Route("/.well-known/jwks.json", self._jwks, methods=["GET"]),
                Route(f"/{pool_id}/.well-known/jwks.json", self._jwks, methods=["GET"]),
            ]
        )

    def __repr__(self) -> str:
        return f"CognitoEmulator(pool_id={self.pool_id!r}, clients={sorted(self.clients)})"

    # Setup -----------------------------------------------------------------------------------------

    def add_client(self, client: AppClient) -> AppClient:
        if "client_credentials" in client.grants and (client.secret is None or "authorization_code" in client.grants):
            raise ValueError("a client_credentials app client needs a secret and cannot also have the code grant")
        self.clients[client.client_id] = client
        return client

    def add_user(self, username: str) -> str:
        return self.users.setdefault(username, str(uuid.uuid4()))

    def issue_refresh_token(
        self, client_id: str, username: str = "machine-user", scope: str = "openid", *, value: str | None = None
    ) -> str:
        """A refresh token as a sign-in now would give (what ``login`` obtains in real life).

        ``value`` fixes the token's text, for dev stacks whose config files name it.
        """
        return self._new_refresh(client_id, username, scope, auth_time=int(self.now()), value=value)

    def revoke_all(self) -> None:
        self._refresh.clear()

    def fail_next(
        self,
        status: int,
        body: bytes | str,
        *,
        times: int = 1,
        content_type: str = JSON_TYPE,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` token requests with this instead of the real answer (``headers`` e.g.
        ``{"Retry-After": "30"}``)."""
        raw = body.encode() if isinstance(body, str) else body
        self.faults.extend(Fault(status, raw, content_type, delay, dict(headers or {})) for _ in range(times))

    def now(self) -> float:
        """This pool's clock: ``clock`` plus ``skew``."""
        return self.clock() + self.skew

    def public_jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        return {"keys": [jwk]}

    def public_key(self) -> rsa.RSAPublicKey:
        return self._key.public_key()

    def rotate_key(self) -> None:
        """Sign with a new key from now on; tokens signed with the old one stop verifying."""
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "emulator-" + secrets.token_hex(4)

    # Tokens ----------------------------------------------------------------------------------------

    def _new_refresh(
        self, client_id: str, username: str, scope: str, *, auth_time: int, value: str | None = None
    ) -> str:
        sub = self.add_user(username)
        token = value or secrets.token_urlsafe(48)
        self._refresh[token] = _RefreshRecord(
            client_id, username, sub, scope, auth_time, expires_at=auth_time + self.refresh_lifetime
        )
        return token

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def _user_tokens(self, client_id: str, username: str, sub: str, scope: str, auth_time: int) -> dict[str, Any]:
        now = int(self.now())
        exp = now + self.token_lifetime
        common = {"sub": sub, "iss": self.issuer, "auth_time": auth_time, "iat": now, "exp": exp}
        id_token = self._sign(
            {
                **common,
                "aud": client_id,
                "token_use": "id",
                "cognito:username": username,
                "jti": str(uuid.uuid4()),
                "origin_jti": str(uuid.uuid4()),
                "event_id": str(uuid.uuid4()),
            }
        )
        access_token = self._sign(
            {
                **common,
                "client_id": client_id,
                "token_use": "access",
                "scope": scope,
                "username": username,
                "jti": str(uuid.uuid4()),
                "version": 2,
            }
        )
        return {
            "id_token": id_token,
            "access_token": access_token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }

    # Endpoints -------------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        self.token_requests += 1
        self.seen.set()
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.faults:
            fault = self.faults.popleft()
            if fault.delay:
                await asyncio.sleep(fault.delay)
            return Response(fault.body, status_code=fault.status, media_type=fault.content_type, headers=fault.headers)
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return _error("invalid_request")
        try:
            form = await _form(request)
        except ClientDisconnect:
            self.refresh_outcomes["abandoned"] += 1
            return Response(status_code=499)  # nobody to answer
        response = self._answer(request, form)
        if self.answer_latency:
            await asyncio.sleep(self.answer_latency)
        return response

    def _answer(self, request: Request, form: dict[str, str]) -> Response:
        client, problem = self._authenticate(request, form)
        if client is None:
            return _error(problem)
        grant = form.get("grant_type")
        if not grant:
            return _error("invalid_request")
        if grant not in GRANTS:
            return _error("unsupported_grant_type")
        self.grant_counts[grant] += 1
        if grant not in client.grants:
            return _error("unauthorized_client")
        if grant == "refresh_token":
            return self._grant_refresh(client, form)
        if grant == "client_credentials":
            return self._grant_client_credentials(client, form)
        return self._grant_code(client, form)

    def _authenticate(self, request: Request, form: dict[str, str]) -> tuple[AppClient | None, str]:
        header = request.headers.get("authorization")
        body_id = form.get("client_id")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return None, "invalid_client"
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None, "invalid_client"
            client_id, colon, secret = decoded.partition(":")
            if not colon:  # e.g. base64 encoded twice
                return None, "invalid_client"
            client = self.clients.get(client_id)
            if client is None or client.secret is None or not secrets.compare_digest(client.secret, secret):
                return None, "invalid_client"
            if body_id is not None and body_id != client_id:
                return None, "invalid_client"
            return client, ""
        if not body_id:
            return None, "invalid_request"
        client = self.clients.get(body_id)
        if client is None:
            return None, "invalid_client"
        body_secret = form.get("client_secret")
        if client.secret is None:
            return (client, "") if body_secret is None else (None, "invalid_client")
        if body_secret is None or not secrets.compare_digest(client.secret, body_secret):
            return None, "invalid_client"
        return client, ""

    def _grant_refresh(self, client: AppClient, form: dict[str, str]) -> Response:
        token = form.get("refresh_token")
        if not token:
            return _error("invalid_request")
        record = self._refresh.get(token)
        now = self.now()
        if (
            record is None
            or record.client_id != client.client_id
            or now >= record.expires_at
            or (record.retired_at is not None and now >= record.retired_at + client.grace_period)
        ):
            self.refresh_outcomes["invalid_grant"] += 1
            return _error("invalid_grant")
        self.refresh_outcomes["ok"] += 1
        body = self._user_tokens(client.client_id, record.username, record.sub, record.scope, record.auth_time)
        if client.rotate_refresh_tokens:
            if record.retired_at is None:
                record.retired_at = now
            # The new token keeps the ORIGINAL sign-in time: rotation never extends the credential's life.
            new = secrets.token_urlsafe(48)
            self._refresh[new] = _RefreshRecord(
                client.client_id, record.username, record.sub, record.scope, record.auth_time, record.expires_at
            )
            body["refresh_token"] = new
        return JSONResponse(body, media_type=JSON_TYPE)

    def _grant_client_credentials(self, client: AppClient, form: dict[str, str]) -> Response:
        requested = form.get("scope", "").split()
        granted = [scope for scope in requested if scope in client.scopes] if requested else list(client.scopes)
        if requested and not granted:
            return _error("invalid_scope")
        now = int(self.now())
        access = self._sign(
            {
                "sub": client.client_id,
                "token_use": "access",
                "scope": " ".join(granted),
                "auth_time": now,
                "iss": self.issuer,
                "exp": now + self.token_lifetime,
                "iat": now,
                "version": 2,
                "jti": str(uuid.uuid4()),
                "client_id": client.client_id,
            }
        )
        return JSONResponse(
            {"access_token": access, "expires_in": self.token_lifetime, "token_type": "Bearer"}, media_type=JSON_TYPE
        )

    def _grant_code(self, client: AppClient, form: dict[str, str]) -> Response:
        code = form.get("code")
        redirect_uri = form.get("redirect_uri")
        if not code or not redirect_uri:
            return _error("invalid_request")
        record = self._codes.pop(code, None)  # single use, whatever happens next
        if record is None or record.client_id != client.client_id or self.now() >= record.expires_at:
            return _error("invalid_grant")
        if redirect_uri != record.redirect_uri:
            return _error("invalid_grant")
        if record.challenge is not None:
            verifier = form.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not verifier or not secrets.compare_digest(digest, record.challenge):
                return _error("invalid_grant")
        auth_time = int(self.now())
        sub = self.add_user(record.username)
        body = self._user_tokens(client.client_id, record.username, sub, record.scope, auth_time)
        body["refresh_token"] = self._new_refresh(client.client_id, record.username, record.scope, auth_time=auth_time)
        return JSONResponse(body, media_type=JSON_TYPE)

    async def _authorize(self, request: Request) -> Response:
        """Hosted UI stand-in: signs ``login_user`` in at once and redirects with a code."""
        params = request.query_params
        client = self.clients.get(params.get("client_id", ""))
        redirect_uri = params.get("redirect_uri", "")
        if client is None or redirect_uri not in client.redirect_uris:
            return JSONResponse({"error": "unauthorized_client", "error_description": "invalid_redirect"}, 400)
        target = redirect_uri + ("&" if "?" in redirect_uri else "?")
        state = params.get("state")
        extra = {"state": state} if state is not None else {}
        if params.get("response_type") != "code":
            return RedirectResponse(target + urlencode({"error": "unsupported_response_type", **extra}), 302)
        if "authorization_code" not in client.grants:
            return RedirectResponse(target + urlencode({"error": "unauthorized_client", **extra}), 302)
        method = params.get("code_challenge_method")
        challenge = params.get("code_challenge")
        if challenge is not None and method != "S256":
            return RedirectResponse(
                target
                + urlencode(
                    {"error": "invalid_request", "error_description": "unsupported code_challenge_method", **extra}
                ),
                302,
            )
        scope = params.get("scope") or "openid"
        code = str(uuid.uuid4())
        self._codes[code] = _CodeRecord(
            client.client_id, redirect_uri, challenge, scope, self.login_user, self.now() + self.code_lifetime
        )
        return RedirectResponse(target + urlencode({"code": code, **extra}), 302)

    async def _revoke(self, request: Request) -> Response:
        form = await _form(request)
        client, problem = self._authenticate(request, form)
        if client is None:
            return _error(problem, 401 if problem == "invalid_client" else 400)
        token = form.get("token")
        if not token:
            return _error("invalid_request")
        record = self._refresh.get(token)
        if record is not None and record.client_id == client.client_id:
            del self._refresh[token]
        return Response(b"", status_code=200)

    async def _jwks(self, request: Request) -> Response:
        return JSONResponse(self.public_jwks())


async def _form(request: Request) -> dict[str, str]:
    # Cognito takes application/x-www-form-urlencoded only; the last of repeated fields wins.
    return dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))


def _error(code: str, status: int = 400) -> Response:
    return JSONResponse({"error": code}, status_code=status, media_type=JSON_TYPE)
