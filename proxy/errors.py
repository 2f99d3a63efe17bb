"""The sidecar's exceptions.

Every error carries data (fields), not only text, and its ``str`` is written for a person: what
happened, the likely causes, and what to do. None of them ever holds a secret or a token.

    SidecarError
    ├── ConfigError(ValueError)          settings are missing or invalid; lists every problem
    ├── StoreError(OSError)              the shared token store cannot be reached or read
    ├── ListenError(OSError)             a listener cannot be bound (proxy.server.serving)
    ├── LoginError                       the sign-in of `login` failed (proxy.commands.login)
    ├── Refusal                          the sidecar's own answer instead of the upstream's: status, code,
    │                                    detail, headers; the guard returns one, path, connection and
    │                                    forwarding checks raise one, and every writer takes one
    └── TokenError                       no token could be had
        ├── TokenEndpointError           the token endpoint answered, or could not be reached
        │   ├── PermanentTokenError      invalid_grant, invalid_client, ...: a person must act
        │   └── TransientTokenError      network, 5xx, 429, malformed answers: worth retrying
        │       ├── TokenClockSkewError  a token arrived (nearly) expired by this machine's clock
        │       ├── StoreUnavailableError  the store is out of reach and the refresh token rotates
        │       ├── HeldOffError         another sidecar sharing the store just failed: wait with it
        │       └── EgressError          the egress proxy or TLS failed before the endpoint could answer
        └── TokenUnusableError           the answer lacked the configured token kind, or it is not a JWT

Outside the tree, on purpose: ``ClientGone`` (proxy.forward: the client left; nothing to answer),
``UnreadableRecord`` (proxy.tokens.sealed: a ``ValueError`` the fleet turns into a ``StoreError``) and ``Invalid``
(proxy.settings.schema: a ``ValueError`` listing problems by place, which ``load_settings`` turns into a
``ConfigError``).

``failure_kind`` names each kind of failure in metrics (the ``outcome`` of ``sidecar_token_requests_total`` and
``sidecar_token_refreshes_total``; a throttled ``TransientTokenError`` is ``throttled``).
"""

from __future__ import annotations

import json
from typing import Any

# The command's exit statuses: a failure, and a configuration that cannot be used (a worker exiting with it
# is not restarted).
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose.

    ``code`` is a short machine-readable name, used as the ``error`` field of the sidecar's JSON
    error bodies and in its ``X-Sidecar-Error`` header.
    """

    code: str = "sidecar_error"

    def __init__(self, message: str = "") -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


# A refusal that also ends the connection.
CLOSE = ((b"connection", b"close"),)


class Refusal(SidecarError):
    """The sidecar's own answer instead of the upstream's: ``status``, ``code`` (sent as ``X-Sidecar-Error`` and in
    the body), ``detail`` (for a person) and extra response ``headers`` (``CLOSE`` ends the connection)."""

    def __init__(self, status: int, code: str, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r})"


class ConfigError(SidecarError, ValueError):
    """The configuration cannot be used. ``problems`` holds one line per problem, each naming its variable."""

    code = "bad_config"

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"the configuration has {count} problem{'s' if count != 1 else ''}:"
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"{head}\n{lines}\nFix these settings (environment, *_FILE files or SIDECAR_CONFIG) and start again."


class TokenError(SidecarError):
    """No valid token is available for the upstream request."""

    code = "token_unavailable"
    permanent = False
    failure_kind = "unavailable"
    # Seconds after which trying again costs the token endpoint nothing (the failure was elsewhere, e.g. the token
    # store): the refresher then looks again at least this often, whatever the backoff says. None: back off.
    retry_within: float | None = None
    # Whether a token request went out: a failure that cost the token endpoint nothing (the store was out of reach)
    # does not count toward the backoff or the fleet's hold-off.
    asked_endpoint = True


class TokenEndpointError(TokenError):
    """The token endpoint refused, failed or could not be reached.

    ``flow`` names the exchange in progress (``refresh``, ``login``, ``client_credentials``), ``status`` the
    HTTP status (``None`` when no answer came), ``error`` the OAuth error code when the body had one, and
    ``body`` an excerpt of the raw answer (error bodies carry no tokens; success bodies are never kept).
    """

    code = "token_endpoint_error"
    permanent = False
    failure_kind = "transient"

    def __init__(
        self,
        *,
        flow: str,
        status: int | None,
        error: str | None,
        body: str,
        summary: str,
        causes: tuple[str, ...] = (),
        fix: str = "",
    ) -> None:
        self.flow = flow
        self.status = status
        self.error = error
        self.body = body
        self.summary = summary
        self.causes = causes
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        """One line, for logs and error bodies: a serving sidecar tries again by itself unless a person must act."""
        parts = [self.summary]
        if self.causes:
            parts.append("Likely causes: " + "; ".join(self.causes) + ".")
        if self.fix:
            fix = self.fix.rstrip(".")
            parts.append("What to do: " + fix + ("." if self.permanent else "; the sidecar keeps retrying."))
        if self.status is not None:
            parts.append(f"Token endpoint answered HTTP {self.status}: {self.body or '(empty body)'}")
        return " ".join(parts)

    def terminal(self) -> str:
        """For a person at a terminal (the one-shot commands, which try once): the headline, then the causes and
        what to do on lines of their own."""
        lines = [self.summary]
        if self.causes:
            lines.append("Likely causes:")
            lines.extend(f"  - {cause}" for cause in self.causes)
        if self.fix:
            lines.append("What to do: " + self.fix.rstrip(".") + ".")
        if self.status is not None:
            lines.append(f"Token endpoint answered HTTP {self.status}: {self.body or '(empty body)'}")
        return "\n".join(lines)


class PermanentTokenError(TokenEndpointError):
    """Retrying will not help until a person fixes the credential or the app client."""

    code = "token_rejected"
    permanent = True
    failure_kind = "permanent"


class TransientTokenError(TokenEndpointError):
    """The token endpoint is unreachable, overloaded or answered nonsense; retrying may help.

    ``retry_after`` is the wait in seconds the endpoint asked for (``Retry-After``), ``throttled`` whether it
    said it is throttling (HTTP 429 or Cognito's ``TooManyRequestsException``).
    """

    code = "token_endpoint_unavailable"

    def __init__(self, *, retry_after: float | None = None, throttled: bool = False, **fields: Any) -> None:
        self.retry_after = retry_after
        self.throttled = throttled
        if throttled:
            self.failure_kind = "throttled"
        super().__init__(**fields)

    @classmethod
    def unanswered(
        cls, *, flow: str, summary: str, fix: str, error: str | None = None, retry_after: float | None = None
    ) -> TransientTokenError:
        """No answer came from the token endpoint (a timeout, the network, a wait for another's refresh)."""
        return cls(flow=flow, status=None, error=error, body="", summary=summary, fix=fix, retry_after=retry_after)


class TokenClockSkewError(TransientTokenError):
    """A token arrived with less life left, by this machine's clock, than the refresh margin (or none at all).

    ``remaining`` is the life left by this machine's clock, ``lifetime`` the life the endpoint announced, and
    ``skew`` their difference: roughly how far the endpoint's clock is behind this machine's.
    """

    code = "token_clock_skew"
    failure_kind = "clock_skew"

    def __init__(self, *, flow: str, kind: str, remaining: float, lifetime: float, margin: float) -> None:
        self.kind = kind
        self.remaining = remaining
        self.lifetime = lifetime
        self.skew = lifetime - remaining
        super().__init__(
            flow=flow,
            status=200,
            error=None,
            body="(body withheld: it holds tokens)",
            summary=f"The token endpoint's {kind} arrived with {remaining:.0f} s of life left by this machine's clock, "
            f"no more than the {margin:.0f} s refresh margin, although it was issued for {lifetime:.0f} s: the "
            f"token endpoint's clock and this machine's differ by about {self.skew:.0f} s. Such a token is never sent.",
            causes=("this machine's clock is ahead (check NTP or chrony)", "the token endpoint's clock is behind"),
            fix="synchronise this machine's clock",
        )


class TokenUnusableError(TokenError):
    """The token endpoint answered 200 but without the token kind the sidecar is configured to send, or with a
    value that is not a JWT."""

    code = "token_unusable"
    failure_kind = "unusable"


class StoreError(SidecarError, OSError):
    """The token store could not be reached, or answered something unreadable. ``store`` names it (no password)."""

    code = "store_unavailable"

    def __init__(self, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        SidecarError.__init__(self, f"the token store {store} is unavailable: {reason}")


# While the store is out of reach, a rotating credential's refresher looks again at least this often: a look costs
# the token endpoint nothing, and the fleet is back within this long of the store.
STORE_RETRY = 1.0


class StoreUnavailableError(TransientTokenError):
    """The token store is unreachable and the credential rotates: refreshing without the lease could lose it."""

    code = "store_unavailable"
    failure_kind = "store_unavailable"
    retry_within = STORE_RETRY
    asked_endpoint = False

    def __init__(self, error: StoreError, flow: str) -> None:
        self.store_error = error
        super().__init__(
            flow=flow,
            status=None,
            error=None,
            body="",
            summary=f"{error}. This credential's refresh token rotates, so it is never refreshed without the "
            "store's lease (another sidecar could be refreshing it).",
            fix="bring the token store back (a restarted Redis that lost its data is seeded again from this "
            "sidecar's refresh token)",
        )


class HeldOffError(TransientTokenError):
    """Another sidecar sharing the token store just failed to refresh, and left a note: this one waits
    ``retry_after`` seconds with it instead of asking too. ``code`` and ``failure_kind`` are the failure the
    note names, so requests, readiness and metrics say what actually went wrong."""

    def __init__(
        self, *, flow: str, error: str | None, summary: str, fix: str, retry_after: float, code: str, kind: str
    ) -> None:
        super().__init__(
            flow=flow, status=None, error=error, body="", summary=summary, fix=fix, retry_after=retry_after
        )
        self.code = code
        self.failure_kind = kind


class EgressError(TransientTokenError):
    """The way to the token endpoint failed before it could answer: the egress proxy refused or cannot be reached, or
    a certificate did not verify (``proxy.egress.failures.describe_failure``). ``code`` names which, as the
    forwarder's own answers do for the upstream (``egress_proxy_refused``, ``token_endpoint_tls_untrusted``, ...)."""

    def __init__(self, *, code: str, **fields: Any) -> None:
        self.code = code
        super().__init__(**fields)


def error_body(code: str, detail: str, request_id: str = "", *, warning: str = "") -> bytes:
    """The sidecar's own JSON error body, distinct from anything the upstream sends (``request_id`` when the
    answer is to a request the app saw: the id in its log lines; ``warning``: readiness's warnings)."""
    body = {"error": code, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    if warning:
        body["warning"] = warning
    return json.dumps(body).encode()
