"""A local stand-in for API Gateway with a Cognito authorizer, answering as shared/docs/cognito.md says.

Requests outside ``/<stage>`` get 403 ``Missing Authentication Token``; a missing or invalid token gets
401 ``Unauthorized``, an expired one 401 ``The incoming token has expired``, with API Gateway's headers.
A request that passes is echoed as JSON: method, path, query, headers (the token header shown only as
a fingerprint), body size and digest, and the token's verified claims, never the token itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.types import Receive, Scope, Send


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe to print and compare."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class ApiGatewayEmulator:
    """ASGI app: one REST API stage behind a ``COGNITO_USER_POOLS`` authorizer."""

    def __init__(
        self,
        *,
        issuer: str,
        public_key: Callable[[], rsa.RSAPublicKey],
        audiences: Iterable[str],
        stage: str = "prod",
        header: str = "Authorization",
        api_key: str | None = None,
        api_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self._key = public_key
        self.audiences = set(audiences)
        self.stage = stage
        self._header = header.lower().encode()
        self._api_key = api_key
        # A private API behind an interface VPC endpoint: requests to the endpoint's own DNS name must say which API
        # they are for (x-apigw-api-id, or a Host of the API's own name), or get 403 Forbidden.
        self.api_id = api_id
        self._clock = clock
        self.requests = 0
        self.authorized = 0
        # Requests refused because their token had expired: a sidecar must keep this at 0.
        self.expired = 0
        self.cut_off = 0  # requests whose body the client (the sidecar) aborted
        self.completed = 0  # requests that arrived whole, with a valid token, and were answered 200
        self.seen = asyncio.Event()  # set by every request: tests wait on it instead of polling
        self.last_claims: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"ApiGatewayEmulator(stage={self.stage!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.requests += 1
        self.seen.set()
        if self.api_id is not None and not self._names_api(scope["headers"]):
            await _drain(receive)
            await _answer(send, 403, {"message": "Forbidden"}, "ForbiddenException")
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        prefix = f"/{self.stage}".encode()
        if not (raw_path == prefix or raw_path.startswith(prefix + b"/")):
            await _drain(receive)
            await _answer(send, 403, {"message": "Missing Authentication Token"}, "MissingAuthenticationTokenException")
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self._api_key is not None:
            given = next((v for k, v in headers if k == b"x-api-key"), b"").decode("latin-1")
            if not secrets.compare_digest(given, self._api_key):
                await _drain(receive)
                await _answer(send, 403, {"message": "Forbidden"}, "ForbiddenException")
                return
        values = [v for k, v in headers if k == self._header]
        if len(values) != 1:
            await _drain(receive)
            await _answer(send, 401, {"message": "Unauthorized"}, "UnauthorizedException")
            return
        token = values[0].decode("latin-1")
        if token.startswith("Bearer "):  # reported to work, though undocumented
            token = token[len("Bearer ") :]
        claims, problem = self._verify(token)
        if claims is None:
            if problem == "The incoming token has expired":
                self.expired += 1
            await _drain(receive)
            await _answer(send, 401, {"message": problem}, "UnauthorizedException")
            return
        self.authorized += 1
        self.last_claims = claims
        size = 0
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.cut_off += 1  # the body never arrived whole: the client aborted the request
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            digest.update(chunk)
            if not message.get("more_body", False):
                break
        # Secrets are shown by fingerprint only: the token, and the API key.
        shown = [
            [
                k.decode("latin-1"),
                f"[token {fingerprint(token)}]"
                if k == self._header
                else f"[api key {fingerprint(v.decode('latin-1'))}]"
                if k == b"x-api-key"
                else v.decode("latin-1"),
            ]
            for k, v in headers
        ]
        self.completed += 1
        echo = {
            "method": scope["method"],
            "path": raw_path[len(prefix) :].decode("latin-1") or "/",
            "raw_path": raw_path.decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": shown,
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "token_sha256": fingerprint(token),
            "claims": claims,
        }
        await _answer(send, 200, echo, None)

    def _names_api(self, headers: list[tuple[bytes, bytes]]) -> bool:
        api_id = (self.api_id or "").encode()
        for name, value in headers:
            if (name == b"x-apigw-api-id" and value == api_id) or (
                name == b"host" and value.startswith(api_id + b".execute-api.")
            ):
                return True
        return False

    def _verify(self, token: str) -> tuple[dict[str, Any] | None, str]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key(),
                algorithms=["RS256"],
                issuer=self.issuer,
                # Time checks use the emulator's own clock, below, so tests can move it.
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["exp", "iss", "token_use"],
                },
            )
        except jwt.PyJWTError:
            return None, "Unauthorized"
        if claims.get("nbf", 0) > self._clock() + 60:
            return None, "Unauthorized"
        if claims.get("exp", 0) <= self._clock():
            return None, "The incoming token has expired"
        audience = claims.get("aud") if claims.get("token_use") == "id" else claims.get("client_id")
        if audience not in self.audiences:
            return None, "Unauthorized"
        return claims, ""


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _answer(send: Send, status: int, body: dict[str, Any], error_type: str | None) -> None:
    raw = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
        (b"x-amzn-requestid", str(uuid.uuid4()).encode()),
        (b"x-amz-apigw-id", secrets.token_urlsafe(12).encode()),
    ]
    if error_type is not None:
        headers.append((b"x-amzn-errortype", error_type.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
