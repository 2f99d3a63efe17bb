"""The token provider: one credential's current token set, and the refresher that keeps it fresh.

State is one ``TokenSet`` (every kind of token one answer gives, so routes that send different kinds of the
same credential share it) and the refresher's ``RefreshSchedule``. Requests read the set:

- while it is valid it is sent, whatever the refresher is doing: past its ``refresh_at`` the refresher is
  nudged, but the request does not wait. A valid token is never dropped, only replaced.
- only a request with no valid token waits: for the attempt in flight or one that may start now, at most
  ``wait_limit`` seconds. When backoff has put the next attempt later, it gets the last failure at once.

The refresher is one task and the only caller of the token endpoint, so there is one token request at a
time by construction, however many requests wait. With a shared token store (``proxy.tokens.fleet``) an attempt
first looks at the store, and the store's lease makes that one request at a time across every sidecar sharing
the credential. The refresher sleeps on the injected ``Clock`` until the schedule (``proxy.tokens.schedule``)
says the next attempt is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.errors import TokenEndpointError, TokenError, TransientTokenError
from proxy.logs import event
from proxy.stats import Histogram
from proxy.tokens.fleet import SharedRefresh
from proxy.tokens.grants import Grant, NewSecrets
from proxy.tokens.refresher import NextOutcome, Refresher
from proxy.tokens.schedule import RefreshPolicy, RefreshSchedule
from proxy.tokens.spec import TokenSpec
from proxy.tokens.token import Token, TokenResponse, TokenSet

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from proxy.tracing import Tracing

log = logging.getLogger("proxy.cache")


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
        self.shared = shared  # sidecars sharing the credential: one refreshes, the others take its tokens
        self.spec = TokenSpec(frozenset(kinds), margin, grant.flow, clock)
        # A request with no valid token waits at most this long; a token request at most twice it.
        self._wait_limit = wait_limit
        self._clock = clock
        jitter = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.schedule = RefreshSchedule(policy or RefreshPolicy(), jitter, shared=shared is not None)
        self.current: TokenSet | None = None
        self.last_error: TokenError | None = None
        self._attempting = False
        self.new_secrets = NewSecrets(grant)
        self._outcome = NextOutcome()  # what waiters await: the next attempt's result
        self.refresher = Refresher(self.schedule, clock, lambda: self.current, self._attempt)
        # For /-/metrics: refreshes by outcome ("success" or ``failure_kind``) and their real durations, requests
        # that waited for a token (flat at steady state), new secret values refused.
        self.outcomes: Counter[str] = Counter()
        self.durations = Histogram()
        self.waits = 0
        # OpenTelemetry, when on: each attempt's span, which the requests that waited on it link to.
        self.tracing: Tracing | None = None
        self.last_attempt: SpanContext | None = None

    def __repr__(self) -> str:
        return f"TokenProvider(grant={self.grant!r}, kinds={sorted(self.spec.kinds)!r})"

    def warnings(self) -> list[str]:
        """What readiness reports while a token is held: a rotated refresh token that could not be written, another
        process serving with the same file, the token store's trouble, a new secret value refused."""
        store = self.shared.problem if self.shared else None
        key = self.shared.key_check.problem if self.shared else None
        found = (self.grant.persist_error, self.grant.shared_warning, store, key, self.new_secrets.warning)
        return [warning for warning in found if warning]

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
            now = self._clock.monotonic()
            first = self.schedule.wanted(now)
            if not self._attempting:
                held_off = self.last_error if self.schedule.held_off(now) else None
                if first or held_off is None:
                    self.refresher.wake()  # to plan again: an attempt may go now, or an early probe be due
                if held_off is not None:
                    raise held_off
                self.schedule.asked = True
            if not waited:
                waited = True
                self.waits += 1
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(self._outcome.next())
            except TimeoutError:
                raise self.last_error or _unanswered(self.grant.flow, self._wait_limit, waiting=True) from None
            except TokenError:
                pass  # look again: the next attempt may be due at once (a secret file changed meanwhile)
            finally:
                if self.tracing is not None and self.last_attempt is not None:
                    self.tracing.link_current(self.last_attempt)  # the request's span, to the refresh it waited on

    def _ask(self) -> None:
        # An attempt in flight answers whoever asks meanwhile: its outcome is as new as one asked for now.
        if not self.schedule.asked and not self._attempting:
            self.schedule.asked = True
            self.refresher.wake()

    def refused(self, token: Token) -> bool:
        """API Gateway refused ``token``: refresh once, unless one was asked for this way in the last
        ``suspect_interval`` seconds. The token in hand stays until a new one has arrived. True if asked now."""
        tokens = self.current
        if tokens is None or not tokens.holds(token) or not self.schedule.suspect(self._clock.monotonic()):
            return False  # already replaced, or asked for this way lately
        log.warning("API Gateway refused the current token; asking for a new one", extra=event("token_refused"))
        self._ask()
        return True

    async def replacement(self, token: Token) -> Token | None:
        """A valid token of ``token``'s kind other than ``token`` (API Gateway refused it), waiting for the
        refresh that ``refused`` asks for; ``None`` if there is none."""
        if self.refused(token) or self._attempting:
            with contextlib.suppress(TokenError, TimeoutError):
                async with asyncio.timeout(self._wait_limit):
                    await asyncio.shield(self._outcome.next())
        tokens = self.usable()
        if tokens is None or tokens.holds(token):
            return None
        return tokens[token.kind]

    def reload_credentials(self) -> bool:
        """Re-read secret files (SIGHUP, a changed file); a change lifts any hold and is tried at once with a token
        request (within the usual minimum interval): a wrong new value shows now, not at the next refresh."""
        changed = self.grant.reload()
        if changed:
            if self.shared is not None:
                self.shared.credentials_changed()
            self.schedule.credentials_changed()
            self.new_secrets.changed()
            self._ask()
            self.refresher.wake()
        return changed

    def start(self) -> None:
        """Start the refresher (in a running loop); it asks for a token at once."""
        self.refresher.start()

    async def aclose(self) -> None:
        await self.refresher.aclose()
        if self.shared is not None:
            await self.shared.aclose()

    async def _attempt(self) -> None:
        if self.tracing is None:
            await self._attempt_untraced()
            return
        with self.tracing.refresh(self.spec.kinds) as span:
            self.last_attempt = span.get_span_context()
            self.tracing.outcome(span, await self._attempt_untraced())

    async def _attempt_untraced(self) -> str:
        """One attempt; its outcome: ``success`` or the failure's kind."""
        self.schedule.started(self._clock.monotonic())
        self._attempting = True
        began = time.perf_counter()  # real time, whatever the clock: how long the endpoint took
        trying = self.new_secrets.trying()
        try:
            tokens = await self._fetch()
        except TokenError as exc:
            # Refused while the previous values still hold a valid token: those stay, and the failure is theirs.
            if trying and exc.permanent and self.usable() is not None and self.new_secrets.refused(exc):
                self._count(exc.failure_kind, time.perf_counter() - began)
                self._outcome.fail(exc)
            else:
                self._failed(exc, time.perf_counter() - began)
            return exc.failure_kind
        else:
            if trying:
                self.new_secrets.worked()
            self._succeeded(tokens, time.perf_counter() - began)
            return "success"
        finally:
            self._attempting = False

    async def _fetch(self) -> TokenSet:
        limit = 2 * self._wait_limit
        try:
            async with asyncio.timeout(limit):
                if self.shared is not None:
                    return await self.shared.fetch(self.spec, self.schedule, self.current)
                # The grant stores a rotated refresh token before this returns.
                response: TokenResponse = await self.grant.fetch()
        except TimeoutError:
            raise _unanswered(self.grant.flow, limit, store=self.shared is not None) from None
        return self.spec.token_set(response)

    def _succeeded(self, tokens: TokenSet, seconds: float) -> None:
        self.current = tokens
        self.schedule.succeeded(tokens)
        self._count("success", seconds)
        self.last_error = None
        now = self._clock.monotonic()
        _log_refreshed(
            self.spec.kinds, seconds, round(tokens.expires_at - now), round(self.schedule.background_at - now)
        )
        self._outcome.resolve(tokens)

    def _count(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.durations.observe(seconds)

    def _failed(self, error: TokenError, seconds: float) -> None:
        wait = self.schedule.failed(self._clock.monotonic(), error)
        self._count(error.failure_kind, seconds)
        self.last_error = error
        held = self.usable()
        valid = round(held.expires_at - self._clock.monotonic()) if held else None
        _log_failed(error, self.schedule.failures_in_row, wait, seconds, valid)
        self._outcome.fail(error)


def _unanswered(flow: str, seconds: float, *, waiting: bool = False, store: bool = False) -> TransientTokenError:
    """No tokens within ``seconds``: for a request ``waiting`` on the attempt in flight, or for the attempt itself
    (with a ``store``, its lease may be what stayed held)."""
    if waiting:
        summary = (
            f"The token endpoint did not answer within {seconds:g} s; no valid token is held "
            "(a token request is still in progress)."
        )
    else:
        summary = f"The token endpoint did not finish answering within {seconds:g} s" + (
            " (or the token store's refresh lease stayed held)." if store else "."
        )
    fix = "check the token endpoint's health and network access"
    return TransientTokenError.unanswered(flow=flow, summary=summary, fix=fix)


def _log_refreshed(kinds: frozenset[str], seconds: float, valid: int, next_refresh: int) -> None:
    shown = "+".join(sorted(kinds))
    log.info(
        "token refreshed in %.0f ms: %s valid for %d s (background refresh in %d s)",
        seconds * 1000,
        shown,
        valid,
        next_refresh,
        extra=event(
            "token_refreshed",
            kinds=shown,
            duration_ms=round(seconds * 1000, 1),
            expires_in_s=valid,
            next_refresh_in_s=next_refresh,
        ),
    )


def _log_failed(error: TokenError, failures: int, wait: float, seconds: float, valid: int | None) -> None:
    """``valid``: how long the token in hand still serves; ``None`` when no valid token is held."""
    endpoint = error if isinstance(error, TokenEndpointError) else None
    log.error(
        "token request failed (%d in a row; next in %.1f s; %s): %s",
        failures,
        wait,
        f"still sending the current token for {valid} s" if valid is not None else "no valid token: requests get 503",
        error,
        extra=event(
            "token_refresh_failed",
            outcome=error.failure_kind,
            code=error.code,
            # What Cognito said, when it said something: invalid_grant, invalid_client ...
            cognito_error=endpoint.error if endpoint else None,
            http_status=endpoint.status if endpoint else None,
            attempt=failures,
            retry_in_s=round(wait, 1),
            duration_ms=round(seconds * 1000, 1),
            token_valid_for_s=valid or 0,
        ),
    )


class TokenView:
    """One kind of token from a shared ``TokenProvider``: what a forwarder is handed. Every view of a provider
    shares its tokens."""

    def __init__(self, provider: TokenProvider, kind: str) -> None:
        if kind not in provider.spec.kinds:
            raise ValueError(f"this provider does not fetch {kind}")
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
