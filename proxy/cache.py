"""The token cache: one credential's tokens in memory, refreshed once however many requests wait.

The cache holds a ``TokenSet``: every kind of token one answer gives (id and access), so routes that
send different kinds of the same credential share one refresh. ``TokenProvider.get()`` answers from
the cache while the tokens are fresh. Past its ``refresh_at`` (expiry
minus the safety margin) or when absent, exactly one refresh runs (single flight: every waiter shares
one future) and covers the whole exchange, including replacing a rotated refresh token. A background
task refreshes at 75-80% of the usable life, so at steady state no request waits for Cognito.

When the token endpoint fails, a still-valid token keeps being served until its real expiry, never
after; transient failures are retried with backoff (stamina) within a deadline; after a failure, new
refreshes are held off for a while so an outage is not hammered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import stamina
from cachetools import TLRUCache

from proxy.credentials import Grant
from proxy.errors import PermanentTokenError, TokenError, TransientTokenError
from proxy.tokens import Token, TokenSet, make_token_set

log = logging.getLogger("proxy.cache")

# After a permanent refusal (invalid_grant, ...) try again only this often: a person must act first.
PERMANENT_HOLD = 60.0
# After transient failures that outlasted their retries, wait this long before the next attempt.
TRANSIENT_HOLD = 2.0
# Even a token about to expire gets this long for its refresh, retries included.
MIN_RETRY_WINDOW = 1.0
# Background refresh at a random point in this fraction of the usable life: early enough to retry,
# jittered so that many sidecars sharing a credential do not refresh in step.
BACKGROUND_WINDOW = (0.75, 0.8)


@dataclass(frozen=True)
class RetryPolicy:
    """How a refresh retries transient failures. ``deadline`` bounds the whole refresh, retries included."""

    attempts: int = 5
    wait_initial: float = 0.2
    wait_max: float = 5.0
    wait_jitter: float = 0.5
    deadline: float = 30.0


class TokenProvider:
    """Yields a valid ``Token`` for the forwarder; owns caching, single flight and background refresh."""

    _KEY = "token"

    def __init__(
        self,
        grant: Grant,
        *,
        kinds: Iterable[str],
        margin: float,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.grant = grant
        self.kinds = frozenset(kinds)
        self._default_kind = min(self.kinds)
        self._margin = margin
        self._retry = retry or RetryPolicy()
        self._clock = clock
        # Entries vanish at their hard expiry: an expired token can never be handed out.
        self._cache: TLRUCache[str, TokenSet] = TLRUCache(
            maxsize=1, ttu=lambda _k, tokens, _now: tokens.expires_at, timer=clock
        )
        # The cache's entry while it is fresh, for the per-request check: cachetools' expiry bookkeeping costs
        # ~2 us a lookup. Always older than the entry's hard expiry (refresh_at comes before expires_at).
        self._hot: TokenSet | None = None
        self._inflight: asyncio.Future[TokenSet] | None = None
        self._hold_until = 0.0
        self._background: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.last_error: TokenError | None = None
        self.refreshes = 0
        self.failures = 0
        # Requests that had to wait for a refresh; at steady state, with background refresh, it stays put.
        self.waits = 0

    def __repr__(self) -> str:
        return f"TokenProvider(grant={self.grant!r}, kinds={sorted(self.kinds)!r})"

    def cached(self, kind: str | None = None) -> Token | None:
        """The cached token of ``kind`` (default: the first kind) if it may still be sent, without refreshing."""
        tokens = self._cache.get(self._KEY)
        return tokens[kind or self._default_kind] if tokens is not None else None

    def view(self, kind: str) -> TokenView:
        """A source of ``kind`` tokens for one forwarder; every view shares this provider's cache and refreshes."""
        if kind not in self.kinds:
            raise ValueError(f"this provider does not fetch {kind}")
        return TokenView(self, kind)

    async def get(self, kind: str | None = None) -> Token:
        """A token of ``kind`` (default: the first kind) that may be sent now. Raises ``TokenError``."""
        return (await self.get_set())[kind or self._default_kind]

    def fresh(self) -> TokenSet | None:
        """The cached tokens if no refresh is due yet, without waiting; ``None`` means ``get_set`` must run."""
        hot = self._hot
        return hot if hot is not None and self._clock() < hot.refresh_at else None

    async def get_set(self) -> TokenSet:
        """Tokens that may be sent now; refreshes (once, shared) when needed. Raises ``TokenError``."""
        tokens = self._cache.get(self._KEY)
        if tokens is not None and self._clock() < tokens.refresh_at:
            return tokens
        if self._inflight is None and self._clock() < self._hold_until:
            # A recent refresh failed: serve the old token while it lasts, else the same error at once.
            if tokens is not None:
                return tokens
            if self.last_error is not None:
                raise self.last_error
        self.waits += 1
        try:
            return await self._join_refresh()
        except TokenError:
            if tokens is not None and self._cache.get(self._KEY) is tokens:
                log.warning("token refresh failed; still sending the cached token until it expires")
                return tokens
            raise

    def invalidate(self, token: Token) -> None:
        """Drop ``token`` (API Gateway refused it) so the next ``get`` refreshes."""
        current = self._cache.get(self._KEY)
        if current is not None and current.holds(token):
            del self._cache[self._KEY]
            self._hot = None
            self._hold_until = 0.0

    def _join_refresh(self) -> asyncio.Future[TokenSet]:
        if self._inflight is None:
            future = asyncio.ensure_future(self._refresh())
            future.add_done_callback(self._flight_done)
            self._inflight = future
        return asyncio.shield(self._inflight)

    def _flight_done(self, future: asyncio.Future[TokenSet]) -> None:
        self._inflight = None
        if not future.cancelled():
            future.exception()  # mark retrieved: a flight nobody awaits any more must not warn

    async def _refresh(self) -> TokenSet:
        policy = self._retry
        deadline = policy.deadline
        current = self._cache.get(self._KEY)
        if current is not None:
            # Retrying past the current token's expiry would only delay the 503s that must follow it.
            deadline = min(deadline, max(current.expires_at - self._clock(), MIN_RETRY_WINDOW))
        try:
            async with asyncio.timeout(deadline):
                async for attempt in stamina.retry_context(
                    on=TransientTokenError,
                    attempts=policy.attempts,
                    timeout=deadline,
                    wait_initial=policy.wait_initial,
                    wait_max=policy.wait_max,
                    wait_jitter=policy.wait_jitter,
                ):
                    with attempt:
                        # The grant stores a rotated refresh token before this returns.
                        response = await self.grant.fetch()
        except TimeoutError:
            error: TokenError = TransientTokenError(
                flow=self.grant.flow,
                status=None,
                error=None,
                body="",
                summary=f"No token could be had within {deadline:g} s of retrying.",
                fix="check the token endpoint's health and network access; the sidecar keeps retrying.",
            )
            self._failed(error)
            raise error from None
        except TokenError as exc:
            self._failed(exc)
            raise
        try:
            tokens = make_token_set(response, kinds=self.kinds, margin=self._margin, now=self._clock())
        except TokenError as exc:
            self._failed(exc)
            raise
        self._cache[self._KEY] = tokens
        self._hot = tokens
        self.refreshes += 1
        self.last_error = None
        self._hold_until = 0.0
        self._wake.set()
        log.info(
            "token refreshed: %s valid for %.0f s (refresh due in %.0f s)",
            "+".join(sorted(self.kinds)),
            tokens.expires_at - self._clock(),
            tokens.refresh_at - self._clock(),
        )
        return tokens

    def _failed(self, error: TokenError) -> None:
        self.failures += 1
        self.last_error = error
        hold = PERMANENT_HOLD if isinstance(error, PermanentTokenError) else TRANSIENT_HOLD
        self._hold_until = self._clock() + hold
        log.error("token refresh failed: %s", error)

    # Background refresh -------------------------------------------------------------------------

    def reload_credentials(self) -> bool:
        """Re-read secret files (SIGHUP); a change lifts any hold and refreshes now if no good token is held."""
        changed = self.grant.reload()
        if changed:
            self._hold_until = 0.0
            self._wake.set()
        return changed

    def start(self) -> None:
        """Start the background refresher; call from a running loop (the app's lifespan)."""
        if self._background is None:
            self._background = asyncio.create_task(self._run_background(), name="token-background-refresh")

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None

    def _next_background_at(self) -> float | None:
        token = self._cache.get(self._KEY)
        if token is None:
            return None
        usable = token.refresh_at - token.issued_at
        return token.issued_at + usable * random.uniform(*BACKGROUND_WINDOW)  # noqa: S311 - jitter, not crypto

    async def _run_background(self) -> None:
        while True:
            due = self._next_background_at()
            # No token yet: fetch one now (readiness turns green without waiting for a request),
            # unless a failure holds refreshes off for a while.
            due = max(self._clock() if due is None else due, self._hold_until)
            delay = due - self._clock()
            if delay > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                    continue  # a refresh happened meanwhile (a request, a 401): plan again from it
                except TimeoutError:
                    pass
            with contextlib.suppress(TokenError):
                await self._join_refresh()


class TokenView:
    """One kind of token from a shared ``TokenProvider``: what a forwarder is handed."""

    def __init__(self, provider: TokenProvider, kind: str) -> None:
        self._provider = provider
        self.kind = kind

    def __repr__(self) -> str:
        return f"TokenView(kind={self.kind!r})"

    async def get(self) -> Token:
        tokens = self._provider.fresh()
        if tokens is None:
            tokens = await self._provider.get_set()
        return tokens[self.kind]

    def invalidate(self, token: Token) -> None:
        self._provider.invalidate(token)
