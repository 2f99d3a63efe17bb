"""The refresher's machinery: the one task that asks for tokens when the schedule says (``Refresher``), and the
next attempt's result, which every waiting request awaits (``NextOutcome``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from proxy.clock import Clock
from proxy.errors import TokenError
from proxy.tokens.schedule import RefreshSchedule
from proxy.tokens.token import TokenSet


class NextOutcome:
    """The next attempt's result, which every waiter awaits: one future per attempt, made when someone waits."""

    def __init__(self) -> None:
        self._future: asyncio.Future[TokenSet] | None = None

    def next(self) -> asyncio.Future[TokenSet]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def resolve(self, tokens: TokenSet) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(tokens)

    def fail(self, error: TokenError) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: waiters that gave up must not leave an unretrieved-exception warning


class Refresher:
    """The one task that asks for tokens: it sleeps on the clock until ``schedule`` says an attempt is due for the
    tokens ``current`` returns, or until ``wake()``, then runs ``attempt``."""

    def __init__(
        self,
        schedule: RefreshSchedule,
        clock: Clock,
        current: Callable[[], TokenSet | None],
        attempt: Callable[[], Awaitable[None]],
    ) -> None:
        self._schedule = schedule
        self._clock = clock
        self._current = current
        self._attempt = attempt
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="token-refresher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            now = self._clock.monotonic()
            delay = self._schedule.next_attempt_at(now, self._current()) - now
            if delay > 0:
                await self._sleep(delay)
                continue
            await self._attempt()

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the clock until ``seconds`` pass or someone wakes it; the loop then plans again."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()


__all__ = ["NextOutcome", "Refresher"]
