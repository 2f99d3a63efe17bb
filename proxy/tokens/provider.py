"""The token cache: one credential's current token set, and the refresher that keeps it fresh.

State is one ``TokenSet`` (every kind of token one answer gives, so routes that send different kinds of the
same credential share it) and the refresher's schedule. Requests read the set:

- while it is valid it is sent, whatever the refresher is doing: past its ``refresh_at`` the refresher is
  nudged, but the request does not wait. A valid token is never dropped, only replaced.
- only a request with no valid token waits: for the attempt in flight or one that may start now, at most
  ``wait_limit`` seconds. When backoff has put the next attempt later, it gets the last failure at once.

The refresher is one task and the only caller of the token endpoint, so there is one token request at a
time by construction, however many requests wait. With a shared token store (``proxy.tokens.fleet``) an attempt
first looks at the store, and the store's lease makes that one request at a time across every sidecar sharing
the credential. The refresher sleeps on the injected ``Clock`` until the next attempt is due:

- at a random point 90-100% into the token's usable life (sidecars sharing a credential drift apart; 98-100%
  with a shared store), or at once when there is no valid token, when API Gateway refused the token, or when
  secret files changed;
- never sooner than ``min_interval`` after the previous token request, whatever happens;
- after failures, later: exponential backoff with jitter across the whole outage, up to ``max_wait``;
  at least what the endpoint asked for in ``Retry-After``; at least ``permanent_hold`` after a refusal
  that a person must fix (new secrets on disk lift the hold).

Why not stamina, which the previous refresh used: its loop sleeps on real time and starts its backoff
afresh at every call, while this schedule spans a whole outage, is shared with the token's own life and
must be driven by the same clock as the checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.errors import TokenEndpointError, TokenError, TransientTokenError
from proxy.logs import event
from proxy.stats import Histogram
from proxy.tokens.fleet import SharedRefresh
from proxy.tokens.grants import Grant
from proxy.tokens.sealed import Record
from proxy.tokens.token import Token, TokenResponse, TokenSet, make_token_set

log = logging.getLogger("proxy.cache")

# The first wait after a failed token request; each further failure in a row doubles it. A single bad answer
# (a blip, an empty 200) is then behind the sidecar a tenth of a second later.
FIRST_RETRY_WAIT = 0.1
# The longest wait between token requests in an outage: a one-hour outage then costs about 25 requests per
# sidecar (0.1, 0.2 ... 205 s, then every 225-300 s), and recovery takes at most this long once it ends.
MAX_RETRY_WAIT = 300.0
# Two token requests for one credential are never closer than this, whatever asks for them (clock skew, a
# flood of 401s, an endpoint that answers nonsense at once): at most 10 a second from one sidecar, however
# wrong everything else goes, while a single blip is still retried within FIRST_RETRY_WAIT.
MIN_TOKEN_REQUEST_INTERVAL = 0.1
# After a refusal a person must fix (invalid_grant, invalid_client ...): asking again sooner cannot help.
PERMANENT_HOLD = 60.0
# Cognito's token quota is counted per second across the account: a throttled sidecar backs off for at
# least a few seconds so that a fleet sharing the quota can drain it.
THROTTLED_MIN_WAIT = 5.0
# A Retry-After longer than this is not believed (a misconfigured proxy must not stop refreshes for a day).
RETRY_AFTER_MAX = 3600.0
# API Gateway's 401s come from whatever token a caller's request carried; a caller must not be able to make
# the sidecar buy tokens (client_credentials is billed per request). One refresh per this many seconds
# answers a real key rotation within a request or two.
SUSPECT_REFRESH_INTERVAL = 30.0
# The refresher renews a token unasked at a random point in this fraction of its usable life (the life less
# the margin): requests never wait for it while the token is valid, so it can come late; the margin is the
# time left for retries; the jitter keeps sidecars sharing a credential from refreshing in step. With 60-minute
# tokens and the 5-minute margin: every 49.5-55 minutes.
BACKGROUND_WINDOW = (0.9, 1.0)
# With a shared token store the lease already keeps sidecars from refreshing together, and the fleet refreshes at
# the earliest of its sidecars' points: a window as wide as the one above would make it refresh up to 10% sooner
# than one sidecar alone. This narrow one only spreads the sidecars' looks at the store.
SHARED_BACKGROUND_WINDOW = (0.98, 1.0)
# Backoff waits are multiplied by a random factor in this range: a fleet that failed together retries apart,
# and the waits still add up at the cap's pace.
JITTER = (0.75, 1.0)


@dataclass(frozen=True)
class RefreshPolicy:
    """When the refresher may ask the token endpoint; every field has the named default above."""

    first_wait: float = FIRST_RETRY_WAIT
    max_wait: float = MAX_RETRY_WAIT
    min_interval: float = MIN_TOKEN_REQUEST_INTERVAL
    permanent_hold: float = PERMANENT_HOLD
    throttled_wait: float = THROTTLED_MIN_WAIT
    suspect_interval: float = SUSPECT_REFRESH_INTERVAL

    def backoff(self, failures: int, error: TokenError, rng: random.Random) -> float:
        """Seconds to wait after the ``failures``-th failure in a row, ``error`` being the latest."""
        wait: float = min(self.max_wait, self.first_wait * 2.0 ** min(failures - 1, 32)) * rng.uniform(*JITTER)
        if error.permanent:
            wait = max(wait, self.permanent_hold)
        if isinstance(error, TransientTokenError):
            if error.throttled:
                wait = max(wait, self.throttled_wait)
            if error.retry_after is not None:
                wait = max(wait, min(error.retry_after, RETRY_AFTER_MAX))
        if error.retry_within is not None:
            wait = min(wait, error.retry_within)
        return wait


class TokenProvider:
    """Yields a valid ``TokenSet`` for the forwarders of one credential; owns the refresher."""

    def __init__(
        self,
        grant: Grant,
        *,
        kinds: Iterable[str],
        margin: float,
        wait_limit: float,
        policy: RefreshPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        shared: SharedRefresh | None = None,
    ) -> None:
        self.grant = grant
        # Sidecars sharing the credential through a store: one of them refreshes, the others take its tokens.
        self.shared = shared
        self.kinds = frozenset(kinds)
        self._margin = margin
        # A request with no valid token waits at most this long; a token request is bounded by twice it
        # (the grant may re-read its files and ask once more).
        self._wait_limit = wait_limit
        self._policy = policy or RefreshPolicy()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.current: TokenSet | None = None
        self.last_error: TokenError | None = None
        self._background_at = 0.0  # when the refresher renews ``current`` unasked
        self.failures_in_row = 0
        self._not_before = 0.0  # backoff or hold after failures
        self._last_request_at = -math.inf
        self._last_suspect_at = -math.inf
        self._asked = False  # someone wants an attempt as soon as the rules allow
        self._attempting = False
        self._outcome: asyncio.Future[TokenSet] | None = None  # what waiters await: the next attempt's result
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Refreshes by outcome ("success" or ``failure_kind``) and their durations in real seconds, for /-/metrics.
        self.outcomes: Counter[str] = Counter()
        self.durations = Histogram()
        # Requests that waited for a token request because no valid token was held; flat at steady state.
        self.waits = 0

    def __repr__(self) -> str:
        return f"TokenProvider(grant={self.grant!r}, kinds={sorted(self.kinds)!r})"

    def view(self, kind: str) -> TokenView:
        """A source of ``kind`` tokens for one forwarder; every view shares this provider's tokens."""
        if kind not in self.kinds:
            raise ValueError(f"this provider does not fetch {kind}")
        return TokenView(self, kind)

    # Reading ----------------------------------------------------------------------------------------

    def usable(self) -> TokenSet | None:
        """The current tokens if they may still be sent, without waiting or asking for anything."""
        tokens = self.current
        return tokens if tokens is not None and self._clock.monotonic() < tokens.expires_at else None

    async def get(self) -> TokenSet:
        """Tokens that may be sent now; waits only when none are valid. Raises ``TokenError``."""
        tokens = self.current
        if tokens is not None:
            now = self._clock.monotonic()
            if now < tokens.expires_at:
                if now >= tokens.refresh_at:
                    self._ask()
                return tokens
        return await self._wait_for_tokens()

    def state(self) -> tuple[str, str]:
        """``(code, reason)`` for readiness, from state alone: ``("ready", ...)`` while a valid token is held."""
        tokens = self.usable()
        if tokens is not None:
            return "ready", f"token valid for {tokens.expires_at - self._clock.monotonic():.0f} s"
        if self.last_error is not None:
            return self.last_error.code, str(self.last_error)
        return "token_pending", "no token yet: the first token request is in progress"

    async def _wait_for_tokens(self) -> TokenSet:
        # Wait for an attempt in flight, or one that may start now; never for one that backoff put later:
        # in an outage, requests get the last failure at once instead of piling up.
        deadline = asyncio.get_running_loop().time() + self._wait_limit
        waited = False
        while True:
            tokens = self.usable()
            if tokens is not None:
                return tokens
            if not self._attempting:
                if self.last_error is not None and self._not_before > self._clock.monotonic():
                    raise self.last_error
                self._ask()
            if not waited:
                waited = True
                self.waits += 1
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(self._next_outcome())
            except TimeoutError:
                raise self.last_error or self._no_token_error() from None
            except TokenError:
                pass  # look again: the next attempt may be due at once (a secret file changed meanwhile)

    def _no_token_error(self) -> TransientTokenError:
        return TransientTokenError.unanswered(
            flow=self.grant.flow,
            summary=f"The token endpoint did not answer within {self._wait_limit:g} s; no valid token is held "
            "(a token request is still in progress).",
            fix="check the token endpoint's health and network access; the sidecar keeps trying.",
        )

    def _next_outcome(self) -> asyncio.Future[TokenSet]:
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        return self._outcome

    # What callers and signals ask ---------------------------------------------------------------------

    def _ask(self) -> None:
        # An attempt in flight answers whoever asks meanwhile: its outcome is as new as one asked for now.
        if not self._asked and not self._attempting:
            self._asked = True
            self._wake.set()

    def refused(self, token: Token) -> bool:
        """API Gateway refused ``token``: refresh once, unless one was asked for this way in the last
        ``suspect_interval`` seconds. The token in hand stays until a new one has arrived. True if asked now."""
        tokens = self.current
        if tokens is None or not tokens.holds(token):
            return False  # already replaced
        now = self._clock.monotonic()
        if now - self._last_suspect_at < self._policy.suspect_interval:
            return False
        self._last_suspect_at = now
        log.warning("API Gateway refused the current token; asking for a new one", extra=event("token_refused"))
        self._ask()
        return True

    async def replacement(self, token: Token) -> Token | None:
        """A valid token of ``token``'s kind other than ``token`` (API Gateway refused it), waiting for the
        refresh that ``refused`` asks for; ``None`` if there is none."""
        if self.refused(token) or self._attempting:
            with contextlib.suppress(TokenError, TimeoutError):
                async with asyncio.timeout(self._wait_limit):
                    await asyncio.shield(self._next_outcome())
        tokens = self.usable()
        if tokens is None or tokens.holds(token):
            return None
        return tokens[token.kind]

    def reload_credentials(self) -> bool:
        """Re-read secret files (SIGHUP, a changed file); a change lifts any hold and retries at once if no valid
        token is held."""
        changed = self.grant.reload()
        if changed:
            if self.shared is not None:
                self.shared.credentials_changed()
            self._not_before = 0.0
            self.failures_in_row = 0
            if self.usable() is None:
                self._ask()
            self._wake.set()
        return changed

    # The refresher ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresher; call from a running loop (the app's lifespan). It asks for a token at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="token-refresher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TokenProvider]:
        """The provider with its refresher running, for one-shot users (``token``, ``check``)."""
        self.start()
        try:
            yield self
        finally:
            await self.aclose()

    def _next_attempt_at(self) -> float:
        tokens = self.current
        now = self._clock.monotonic()
        planned = now if self._asked or tokens is None or now >= tokens.expires_at else self._background_at
        return max(planned, self._not_before, self._last_request_at + self._policy.min_interval)

    async def _run(self) -> None:
        while True:
            delay = self._next_attempt_at() - self._clock.monotonic()
            if delay > 0:
                await self._sleep(delay)
                continue
            await self._attempt()

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the clock until ``seconds`` pass or someone asks; the loop then plans again."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _attempt(self) -> None:
        self._asked = False
        self._attempting = True
        self._last_request_at = self._clock.monotonic()
        began = time.perf_counter()  # real time, whatever the clock: how long the endpoint took
        try:
            tokens = await self._fetch()
        except TokenError as exc:
            self._failed(exc, time.perf_counter() - began)
        else:
            self._succeeded(tokens, time.perf_counter() - began)
        finally:
            self._attempting = False

    async def _fetch(self) -> TokenSet:
        limit = 2 * self._wait_limit
        try:
            async with asyncio.timeout(limit):
                if self.shared is not None:
                    return await self.shared.fetch(self)
                # The grant stores a rotated refresh token before this returns.
                response: TokenResponse = await self.grant.fetch()
        except TimeoutError:
            raise TransientTokenError.unanswered(
                flow=self.grant.flow,
                summary=f"The token endpoint did not finish answering within {limit:g} s"
                + (" (or the token store's refresh lease stayed held)." if self.shared is not None else "."),
                fix="check the token endpoint's health and network access; the sidecar keeps trying.",
            ) from None
        return self.token_set(response)

    # What the shared refresh asks of its consumer (proxy.tokens.fleet.Consumer) ---------------------------------

    def token_set(self, response: TokenResponse, *, age: float = 0.0) -> TokenSet:
        """The tokens of an answer that arrived ``age`` seconds ago."""
        return make_token_set(
            response,
            kinds=self.kinds,
            margin=self._margin,
            received_at=self._clock.monotonic() - age,
            wall_now=self._clock.time(),
            flow=self.grant.flow,
        )

    def adoptable(self, record: Record) -> TokenSet | None:
        """The store's tokens, if they are not the ones held and not due for a refresh yet."""
        try:
            tokens = self.token_set(record.response, age=max(0.0, self._clock.time() - record.received))
        except TokenError:
            return None
        held = self.current
        if held is not None and all(held[kind].value == tokens[kind].value for kind in self.kinds):
            return None
        return tokens if self._clock.monotonic() < tokens.refresh_at else None

    def hold_for(self, error: TokenError, failures: int) -> float:
        return self._policy.backoff(max(failures, self.failures_in_row + 1), error, self._rng)

    def _succeeded(self, tokens: TokenSet, seconds: float) -> None:
        self.current = tokens
        usable = tokens.refresh_at - tokens.received_at
        window = SHARED_BACKGROUND_WINDOW if self.shared is not None else BACKGROUND_WINDOW
        self._background_at = tokens.received_at + usable * self._rng.uniform(*window)
        self.outcomes["success"] += 1
        self.durations.observe(seconds)
        self.last_error = None
        self.failures_in_row = 0
        self._not_before = 0.0
        now = self._clock.monotonic()
        kinds = "+".join(sorted(self.kinds))
        valid, next_refresh = round(tokens.expires_at - now), round(self._background_at - now)
        log.info(
            "token refreshed in %.0f ms: %s valid for %d s (background refresh in %d s)",
            seconds * 1000,
            kinds,
            valid,
            next_refresh,
            extra=event(
                "token_refreshed",
                kinds=kinds,
                duration_ms=round(seconds * 1000, 1),
                expires_in_s=valid,
                next_refresh_in_s=next_refresh,
            ),
        )
        outcome, self._outcome = self._outcome, None
        if outcome is not None and not outcome.done():
            outcome.set_result(tokens)

    def _failed(self, error: TokenError, seconds: float) -> None:
        self.failures_in_row += 1
        self.outcomes[error.failure_kind] += 1
        self.durations.observe(seconds)
        self.last_error = error
        wait = self._policy.backoff(self.failures_in_row, error, self._rng)
        self._not_before = self._clock.monotonic() + wait
        held = self.usable()
        valid = round(held.expires_at - self._clock.monotonic()) if held else 0
        endpoint = error if isinstance(error, TokenEndpointError) else None
        log.error(
            "token request failed (%d in a row; next in %.1f s; %s): %s",
            self.failures_in_row,
            wait,
            f"still sending the current token for {valid} s" if held else "no valid token: requests get 503",
            error,
            extra=event(
                "token_refresh_failed",
                outcome=error.failure_kind,
                code=error.code,
                # What Cognito said, when it said something: invalid_grant, invalid_client ...
                cognito_error=endpoint.error if endpoint else None,
                http_status=endpoint.status if endpoint else None,
                attempt=self.failures_in_row,
                retry_in_s=round(wait, 1),
                duration_ms=round(seconds * 1000, 1),
                token_valid_for_s=valid,
            ),
        )
        outcome, self._outcome = self._outcome, None
        if outcome is not None and not outcome.done():
            outcome.set_exception(error)
            outcome.exception()  # retrieved: waiters that gave up must not leave an unretrieved-exception warning


class TokenView:
    """One kind of token from a shared ``TokenProvider``: what a forwarder is handed."""

    def __init__(self, provider: TokenProvider, kind: str) -> None:
        self._provider = provider
        self._clock = provider._clock
        self.kind = kind

    def __repr__(self) -> str:
        return f"TokenView(kind={self.kind!r})"

    async def get(self) -> Token:
        tokens = self._provider.current
        # The per-request check: a fresh set is used with one clock read.
        if tokens is None or self._clock.monotonic() >= tokens.refresh_at:
            tokens = await self._provider.get()
        return tokens[self.kind]

    async def replacement(self, token: Token) -> Token | None:
        return await self._provider.replacement(token)

    def refused(self, token: Token) -> None:
        self._provider.refused(token)
