"""What one credential's tokens must be: the kinds its routes send and the margin before expiry, and which
stored token sets are worth adopting. A value the provider and the fleet's refresh both read."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.clock import Clock
from proxy.errors import TokenError
from proxy.tokens.sealed import Record
from proxy.tokens.token import TokenResponse, TokenSet, make_token_set


@dataclass(frozen=True)
class TokenSpec:
    """``kinds`` (``id_token``, ``access_token``) with ``margin`` seconds before expiry, for ``flow``'s answers,
    timed on ``clock``."""

    kinds: frozenset[str]
    margin: float
    flow: str
    clock: Clock

    def token_set(self, response: TokenResponse, *, age: float = 0.0) -> TokenSet:
        """The tokens of an answer that arrived ``age`` seconds ago; ``TokenError`` if they cannot be used."""
        return make_token_set(
            response,
            kinds=self.kinds,
            margin=self.margin,
            received_at=self.clock.monotonic() - age,
            wall_now=self.clock.time(),
            flow=self.flow,
            age=age,
        )

    def adoptable(self, record: Record, held: TokenSet | None) -> TokenSet | None:
        """The stored tokens, if they are not the ones ``held`` and not due for a refresh yet."""
        tokens = self._stored(record)
        if tokens is None or (held is not None and all(held[k].value == tokens[k].value for k in self.kinds)):
            return None
        return tokens if self.clock.monotonic() < tokens.refresh_at else None

    def servable(self, record: Record, held: TokenSet | None) -> TokenSet | None:
        """The stored tokens while another member refreshes them: still valid (due or not), when nothing valid is
        ``held``. A member that starts during the fleet's refresh serves them as a single sidecar serves the
        token in hand, instead of waiting for the refresh."""
        if held is not None and self.clock.monotonic() < held.expires_at:
            return None
        tokens = self._stored(record)
        return tokens if tokens is not None and self.clock.monotonic() < tokens.expires_at else None

    def _stored(self, record: Record) -> TokenSet | None:
        try:
            return self.token_set(record.response, age=max(0.0, self.clock.time() - record.received))
        except TokenError:
            return None


__all__ = ["TokenSpec"]
