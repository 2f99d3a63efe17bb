"""Secret files re-read when they change, without a signal.

Kubernetes never sends SIGHUP: it updates a mounted Secret by writing a new directory and swapping the
``..data`` symlink to it, so the file's path stays and what it resolves to changes. Every
``SECRET_POLL_INTERVAL`` the watcher compares each file's identity (where the path resolves, inode, size,
modification time) with the last one seen, and calls ``on_change`` once when any differs. Polling a handful
of files costs a few ``stat`` calls; inotify would miss the swap of a symlink's parent directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

log = logging.getLogger("proxy.watch")

# Within "a few seconds" of a change, at the cost of a few stat calls.
SECRET_POLL_INTERVAL = 2.0

Identity = tuple[str, int, int, int] | None


def identity(path: Path) -> Identity:
    """What changes when the file's content is replaced in any way (None: it cannot be read now)."""
    try:
        info = os.stat(path)
        return (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        return None


async def watch_files(
    paths: Sequence[Path],
    on_change: Callable[[], object],
    *,
    interval: float = SECRET_POLL_INTERVAL,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Call ``on_change`` whenever one of ``paths`` has changed since the last look; runs until cancelled."""
    seen = {path: identity(path) for path in paths}
    while True:
        await sleep(interval)
        now = {path: identity(path) for path in paths}
        changed = [path for path in paths if now[path] is not None and now[path] != seen[path]]
        seen.update((path, now[path]) for path in changed)
        if changed:
            log.info("secret file(s) changed: %s; re-reading", ", ".join(str(path) for path in changed))
            on_change()


__all__ = ["SECRET_POLL_INTERVAL", "identity", "watch_files"]
