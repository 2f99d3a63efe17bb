"""What every shared token store does, and the lease it hands out.

A store keeps, per credential key, one sealed blob (the current token set and refresh token, see
``proxy.tokens.sealed``) and a lease lock:

- ``acquire`` takes the lease if nobody holds it and hands out a fencing value that grows with every lease;
  it says whether the previous lease ended without a release (its holder died or hung: a takeover);
- ``renew`` extends the lease while the refresh runs, ``save`` writes the blob and ``release`` drops the lease,
  each only if the caller's fencing value still holds it (compare-and-set, compare-and-delete);
- ``hold_off`` leaves a note after a failed refresh, so that the others back off with the one that asked
  instead of each asking the token endpoint in turn.

Every store raises ``StoreError`` when it cannot be reached or read.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

# How long one shared-store refresh lease lasts unless renewed (it is renewed every third of this while the refresh
# runs): a sidecar killed mid-refresh holds the others up at most this long.
DEFAULT_STORE_LEASE = 5.0

# A store operation that takes longer than this has failed: the refresher must be able to fall back or report
# while the token in hand is still valid.
STORE_TIMEOUT = 2.0
# How long a member's offer of a record only it holds is kept (it renews it every second while it waits):
# whoever seeds a store that lost its data takes the newest offered.
OFFER_KEPT = 60.0


@dataclass(frozen=True)
class Lease:
    """A held lease. ``fence`` grows with every lease taken; ``takeover`` says that the previous one ended
    without a release; ``forced`` that a lock no sidecar sets (no expiry, or longer than two leases) was in the
    way and was removed: someone who can write to the store without the key tried to stop every refresh."""

    fence: int
    owner: str
    takeover: bool
    handle: Any = field(default=None, repr=False, compare=False)
    forced: bool = False

    @property
    def value(self) -> str:
        return f"{self.fence} {self.owner}"


def owner_name() -> str:
    """Who holds a lease, for a person reading the store: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Store(Protocol):
    """What the shared refresh needs of a store; ``key`` is a credential's key (``Sealer.key``)."""

    name: str

    async def load(self, key: str) -> tuple[bytes | None, bytes | None]:
        """The sealed token set and the hold-off note (each None when absent)."""

    async def hold_off(self, key: str, note: bytes) -> None:
        """Leave ``note`` (it says until when it holds): the last refresh failed. A saved token set removes it."""

    async def acquire(self, key: str, lease_seconds: float) -> Lease | None: ...

    async def renew(self, key: str, lease: Lease, lease_seconds: float) -> bool: ...

    async def save(self, key: str, lease: Lease, blob: bytes) -> bool: ...

    async def release(self, key: str, lease: Lease) -> None: ...

    async def holder(self, key: str) -> str | None: ...

    async def offer(self, key: str, blob: bytes) -> None:
        """Offer ``blob`` (a record only this member holds) to whoever seeds ``key`` next; kept ``OFFER_KEPT``."""

    async def offers(self, key: str) -> list[bytes]:
        """The records members offered for ``key`` and that have not expired."""

    async def check_in(self, name: str, value: str, now: float, window: float) -> dict[str, float]:
        """Record ``value`` as seen at ``now`` (wall clock) under ``name``; every value seen there within ``window``
        seconds, with when it was last seen."""

    async def aclose(self) -> None: ...
