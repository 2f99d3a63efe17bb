"""What the workers of one ``SIDECAR_WORKERS`` sidecar tell each other: each answers on a Unix socket of its own,
in a directory (0700) the parent made, with a snapshot of its counts; the one a scraper reached gathers the
others' and answers for the whole sidecar.

A worker that does not answer within ``PEER_TIMEOUT`` (restarting, or stuck) is left out of that scrape: the
scrape says how many answered rather than waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("proxy.workers")

# How long a scrape waits for each other worker's snapshot, seconds.
PEER_TIMEOUT = 1.0
# The largest snapshot read from a peer, bytes (a few hundred samples are a few tens of kilobytes).
MAX_SNAPSHOT = 4 << 20


@dataclass
class WorkerPeers:
    """Worker ``number`` of ``count``, whose sockets are in ``directory``."""

    directory: Path
    number: int
    count: int
    # This worker's counts now (``proxy.metrics.snapshot``): what ``start`` was given, or a reload's since.
    snapshot: Callable[[], bytes] = field(default=lambda: b"[]", repr=False)
    _server: asyncio.AbstractServer | None = field(default=None, init=False, repr=False)

    def _socket(self, number: int) -> str:
        return str(self.directory / f"worker-{number}.sock")

    async def start(self, snapshot: Callable[[], bytes]) -> None:
        """Answer every connection to this worker's socket with ``snapshot()`` (``self.snapshot`` from now on), then
        close it."""
        self.snapshot = snapshot

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(self.snapshot())
                await writer.drain()
            except OSError:
                pass  # the asking worker gave up (its timeout): nothing to tell anyone
            finally:
                writer.close()

        path = self._socket(self.number)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # this worker's predecessor, which died without removing it
        self._server = await asyncio.start_unix_server(answer, path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self._socket(self.number))

    async def gather(self) -> dict[int, bytes]:
        """The other workers' snapshots that arrived within ``PEER_TIMEOUT``, by worker number."""
        others = [number for number in range(self.count) if number != self.number]
        answers = await asyncio.gather(*(self._ask(number) for number in others))
        return {number: answer for number, answer in zip(others, answers, strict=True) if answer is not None}

    async def _ask(self, number: int) -> bytes | None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._socket(number))
                try:
                    chunks, size = [], 0
                    while chunk := await reader.read(1 << 16):
                        size += len(chunk)
                        if size > MAX_SNAPSHOT:
                            raise OSError("snapshot too large")
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.debug("worker %d gave no metrics to this scrape (%s)", number, type(exc).__name__)
            return None


__all__ = ["PEER_TIMEOUT", "WorkerPeers"]
