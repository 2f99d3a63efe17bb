"""When the refresher asks the token endpoint: a pure schedule over monotonic times, with no event loop, no I/O
and no tokens of its own, so every rule is tested with plain numbers (tests/unit/test_schedule.py).

- at a random point 90-100% into the token's usable life (sidecars sharing a credential drift apart; 98-100%
  with a shared store), or at once when there is no valid token, when API Gateway refused the token, or when
  secret files changed;
- never sooner than ``min_interval`` after the previous token request, whatever happens;
- after failures, later: exponential backoff with jitter across the whole outage, up to ``max_wait``;
  at least what the endpoint asked for in ``Retry-After``; at least ``permanent_hold`` after a refusal
  that a person must fix (new secrets on disk lift the hold);
- a refused token (API Gateway's 401) asks for a refresh at most once per ``suspect_interval``;
- while requests arrive with no valid token to send, an early probe may cut a transient failure's backoff
  short: ``probe_gap`` after the previous token request, out of a budget of ``probe_burst`` probes that
  refills at one per ``probe_refill`` seconds. Cognito's recovery from an outage of up to about a minute is
  then seen within ``probe_gap``, a longer one's within a minute, for at most ``probe_burst`` token requests
  and one a minute more than the backoff alone.

Why not stamina, which the previous refresh used: its loop sleeps on real time and starts its backoff
afresh at every call, while this schedule spans a whole outage, is shared with the token's own life and
must be driven by the same clock as the checks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from proxy.errors import TokenError, TransientTokenError
from proxy.tokens.token import TokenSet

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
# Early probes while requests wait with no valid token (see the module's docstring): recovery within this long of
# Cognito's...
PROBE_GAP = 5.0
# ...for a minute's worth of probes at once, then one a minute: an hour's outage with requests waiting throughout
# costs at most 12 + 60 token requests more than the backoff's 25.
PROBE_BURST = 12.0
PROBE_REFILL = 60.0
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
    probe_gap: float = PROBE_GAP
    probe_burst: float = PROBE_BURST
    probe_refill: float = PROBE_REFILL

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


class RefreshSchedule:
    """One credential's refresh schedule. Times are the refresher's monotonic clock, passed in as ``now``."""

    def __init__(self, policy: RefreshPolicy, rng: random.Random, *, shared: bool = False) -> None:
        self.policy = policy
        self._rng = rng
        self._window = SHARED_BACKGROUND_WINDOW if shared else BACKGROUND_WINDOW
        self.background_at = 0.0  # when the refresher renews the current tokens unasked
        self.failures_in_row = 0
        self.not_before = 0.0  # backoff or hold after failures
        self.last_request_at = -math.inf
        self.last_suspect_at = -math.inf
        self.asked = False  # someone wants an attempt as soon as the rules allow
        self.probes = 0  # early probes made
        self._probe_budget = policy.probe_burst
        self._budget_at = -math.inf
        self._probe_ok = False  # the last failure's backoff may be cut short by a probe
        self._wanted_at = -math.inf  # when a request last found no valid token

    def next_attempt_at(self, now: float, tokens: TokenSet | None) -> float:
        """When the next token request may go: at once if asked or no valid token is held, else at the
        background point; never inside a backoff (unless an early probe is due) or closer than ``min_interval``
        to the previous request."""
        planned = now if self.asked or tokens is None or now >= tokens.expires_at else self.background_at
        return max(planned, self._not_before(now), self.last_request_at + self.policy.min_interval)

    def held_off(self, now: float) -> bool:
        """A failure's backoff or hold still runs, and no early probe is due: a request without a token gets the
        failure at once."""
        return self._not_before(now) > now

    def wanted(self, now: float) -> bool:
        """A request found no valid token to send: early probes may go while this lasts. True for the first such
        request since the last token request (the plan may have changed)."""
        first = self._wanted_at < self.last_request_at
        self._wanted_at = now
        return first

    def _not_before(self, now: float) -> float:
        probe_at = self.last_request_at + self.policy.probe_gap
        probing = probe_at < self.not_before and self._probe_ok and self._wanted_at >= self.last_request_at
        return probe_at if probing and self._budget(max(now, probe_at)) >= 1.0 else self.not_before

    def _budget(self, now: float) -> float:
        """Early probes available at ``now`` (the budget refills with time)."""
        refilled = (now - self._budget_at) / self.policy.probe_refill if self._budget_at > -math.inf else 0.0
        return min(self.policy.probe_burst, self._probe_budget + refilled)

    def started(self, now: float) -> None:
        """A token request goes now: it answers whoever asked."""
        if now < self.not_before:  # inside a backoff: an early probe
            self._probe_budget, self._budget_at = self._budget(now) - 1.0, now
            self.probes += 1
        self.asked = False
        self.last_request_at = now

    def succeeded(self, tokens: TokenSet) -> None:
        """New tokens: the next request at a random point of their usable life, failures forgotten."""
        usable = tokens.refresh_at - tokens.received_at
        self.background_at = tokens.received_at + usable * self._rng.uniform(*self._window)
        self.failures_in_row = 0
        self.not_before = 0.0

    def failed(self, now: float, error: TokenError) -> float:
        """A failed attempt: the wait before the next one, which is also returned. One that asked no token
        endpoint (a look at an unreachable store) waits its own ``retry_within`` and leaves the count of failures
        in a row, and so the backoff, where it was."""
        if not error.asked_endpoint:
            wait = error.retry_within if error.retry_within is not None else self.policy.first_wait
            self.not_before = now + wait
            return wait
        self.failures_in_row += 1
        wait = self.policy.backoff(self.failures_in_row, error, self._rng)
        # Only a plain outage may be probed early: not a refusal, throttling or the endpoint's own Retry-After.
        self._probe_ok = isinstance(error, TransientTokenError) and not error.throttled and error.retry_after is None
        self.not_before = max(self.not_before, now + wait)  # a failed early probe leaves the backoff as it was
        return wait

    def hold_for(self, error: TokenError, failures: int) -> float:
        """The wait a fleet's hold-off note asks for: the fleet's count of failures in a row, or this one's."""
        return self.policy.backoff(max(failures, self.failures_in_row + 1), error, self._rng)

    def suspect(self, now: float) -> bool:
        """API Gateway refused the current token: True (and remembered) unless a refresh was asked for this way
        in the last ``suspect_interval`` seconds."""
        if now - self.last_suspect_at < self.policy.suspect_interval:
            return False
        self.last_suspect_at = now
        return True

    def credentials_changed(self) -> None:
        """New secrets on disk: any hold is lifted."""
        self.not_before = 0.0
        self.failures_in_row = 0


__all__ = ["MAX_RETRY_WAIT", "THROTTLED_MIN_WAIT", "RefreshPolicy", "RefreshSchedule"]
