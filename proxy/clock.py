"""Time, as the token cache sees it. Imports nothing from the package.

A token's life is measured on a monotonic clock from the moment it arrived; the wall clock is only read to
check the token's ``exp``; the refresher sleeps on the same monotonic clock. Tests inject one object that
provides all three, so a single hand-moved clock drives the token checks and the refresher alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; token life is measured on it."""
        ...

    def time(self) -> float:
        """Seconds since the epoch, to read a JWT's ``exp`` against."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the monotonic clock."""
        ...


class SystemClock:
    """The real clocks. The event loop's own timer runs on ``time.monotonic`` too."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
