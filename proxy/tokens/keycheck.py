"""Members of one credential that seal with different keys, told about each other.

A credential's records live under a key name derived from the key material (see ``proxy.tokens.sealed``), so
members configured with different keys (another ``SIDECAR_TOKEN_STORE_KEY``, or none) never see each other's
records: they form two stores in one, each refreshing on its own, and with rotation one side retires the
other's refresh token. Every member therefore checks in, under a name that does not depend on the key, with a
keyed check value (``Sealer.check_value``): a second value seen there recently means a second key.
"""

from __future__ import annotations

import logging

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.logs import event
from proxy.store.base import Store
from proxy.tokens.sealed import Sealer

log = logging.getLogger("proxy.shared")

# How often a member checks in (at most), and how long a check-in counts: two token lifetimes of the default
# hour, so that a member that only looks at the store when its token is due is still seen.
CHECK_INTERVAL = 60.0
CHECK_WINDOW = 2 * 3600.0


class KeyCheck:
    """One member's check-ins; ``problem`` says what is wrong while another key is in use."""

    def __init__(self, store: Store, sealer: Sealer, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.sealer = sealer
        self._clock = clock
        self._next = 0.0
        self.problem: str | None = None

    async def look(self) -> None:
        """Check in, unless done within the last ``CHECK_INTERVAL``. Raises ``StoreError``."""
        now = self._clock.time()
        if now < self._next:
            return
        self._next = now + CHECK_INTERVAL
        seen = await self.store.check_in(self.sealer.check_key, self.sealer.check_value, now, CHECK_WINDOW)
        others = [at for value, at in seen.items() if value != self.sealer.check_value]
        if not others:
            if self.problem is not None:
                log.info("no other store key has been seen for this credential since", extra=event("store_key_ok"))
            self.problem = None
            return
        problem = (
            f"another sidecar sharing this credential through {self.store.name} seals with a different key (seen "
            f"{(now - max(others)) / 60:.0f} min ago): the two sides never see each other's tokens, each refreshes "
            "on its own, and with rotation one retires the other's refresh token. Give every member the same "
            "SIDECAR_TOKEN_STORE_KEY (or none, and the same client secret)"
        )
        if self.problem is None:
            log.error("%s", problem, extra=event("store_key_mismatch", store=self.store.name))
        self.problem = problem
