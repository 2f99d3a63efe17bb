"""Tokens as the sidecar holds them: one token endpoint answer (``TokenResponse``), a token with its expiry
(``Token``), and every kind one answer gives (``TokenSet``), so routes that send different kinds share a refresh.

Expiry is measured on the monotonic clock from the moment the answer arrived; a JWT's ``exp`` claim can only
shorten it. Imports nothing from the package."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from proxy.errors import (
    TokenClockSkewError,
    TokenUnusableError,
)

TOKEN_KINDS = ("id_token", "access_token")


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

    Times are on the sidecar's monotonic clock, counted from the moment the answer arrived: the token
    endpoint's clock never decides how long a token is used. ``refresh_at`` is when a refresh is due
    (expiry minus the safety margin); ``expires_at`` is when it must never be sent again (the real expiry,
    less a little for the request's own travel).
    """

    kind: str
    value: str = field(repr=False)
    received_at: float
    refresh_at: float
    expires_at: float
    claims: Mapping[str, Any] = field(repr=False, compare=False)


# A token is never sent this close to its real expiry: the request itself takes time to reach the authorizer.
HARD_EXPIRY_SKEW = 5.0
# exp and iat are whole seconds (the issuer truncates its clock): read against this machine's clock, a token
# may look up to this much shorter-lived than it is. The clock-skew check allows for it.
EXP_RESOLUTION = 1.0

# What a header may carry as a token: a JWT's three base64url parts (the signature may be empty). Anything
# else (a line break, an HTML page, a quoted string) would break the request or smuggle a header.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def read_claims(token: str) -> dict[str, Any]:
    """The JWT's claims, unverified (API Gateway verifies; the sidecar only needs exp and friends): the JSON object
    in its second base64url part (RFC 7519). Decoded here rather than by PyJWT, whose import loads
    ``cryptography`` (about 10 MiB) into every serving process that only reads claims. Raises ``ValueError``."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWS compact serialisation")
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(claims, dict):
        raise ValueError("the claims are not a JSON object")
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
    def received_at(self) -> float:
        return min(token.received_at for token in self.tokens.values())

    def holds(self, token: Token) -> bool:
        return any(mine is token for mine in self.tokens.values())


def make_token_set(
    response: TokenResponse,
    *,
    kinds: frozenset[str],
    margin: float,
    received_at: float,
    wall_now: float,
    flow: str,
    age: float = 0.0,
) -> TokenSet:
    """The ``kinds`` of token the routes need, from one answer that arrived ``age`` seconds before ``wall_now``;
    ``TokenError`` if one cannot be used."""
    return TokenSet(
        {
            kind: make_token(
                response, kind=kind, margin=margin, received_at=received_at, wall_now=wall_now, flow=flow, age=age
            )
            for kind in sorted(kinds)
        }
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def make_token(
    response: TokenResponse,
    *,
    kind: str,
    margin: float,
    received_at: float,
    wall_now: float,
    flow: str = "refresh",
    age: float = 0.0,
) -> Token:
    """Turn a token response into the ``Token`` to inject.

    Its life is what the endpoint announced (``expires_in``, or the JWT's own ``exp - iat`` when shorter: id
    and access tokens may live differently), counted from ``received_at`` on the monotonic clock, and bounded by
    ``exp`` read against this machine's wall clock ``wall_now``, which is ``age`` seconds after ``received_at``
    (a set adopted from the token store arrived earlier: its age counts once). A token with no more life left
    than the margin when it arrived is refused with ``TokenClockSkewError`` (transient): it would be refreshed
    at once, again and again.
    """
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
    if not _JWT_SHAPE.fullmatch(value):
        raise TokenUnusableError(
            f"the token endpoint's {kind} is not a JWT (three base64url parts separated by dots), so it cannot be "
            "sent in a header. Check that SIDECAR_TOKEN_URL is a Cognito token endpoint."
        )
    try:
        claims = read_claims(value)
    except ValueError:
        claims = {}
    exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
    announced = [float(life) for life in (response.expires_in,) if life]
    if exp is not None and iat is not None and exp > iat:
        announced.append(exp - iat)
    by_clock = exp - wall_now + age if exp is not None else None  # life from receipt, by the wall clock
    if not announced and by_clock is None:
        raise TokenUnusableError(
            f"the {kind} has no exp claim and the answer no expires_in, so the sidecar cannot tell when it expires"
        )
    lifetime = min(announced) if announced else max(by_clock or 0.0, 0.0)
    left = lifetime if by_clock is None else min(lifetime, by_clock)
    # At most half the token's life, so short-lived test tokens are still used for a while.
    effective_margin = min(margin, lifetime / 2)
    guard = min(HARD_EXPIRY_SKEW, lifetime / 10)
    if left + EXP_RESOLUTION - guard <= effective_margin:
        raise TokenClockSkewError(flow=flow, kind=kind, remaining=left, lifetime=lifetime, margin=effective_margin)
    return Token(
        kind=kind,
        value=value,
        received_at=received_at,
        refresh_at=received_at + left - effective_margin,
        expires_at=received_at + left - guard,
        claims=claims,
    )
