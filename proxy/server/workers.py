"""``SIDECAR_WORKERS=N``: N serving processes on one host, on one listening socket, sharing one credential.

The parent binds the sockets, forks the workers (each runs the whole sidecar on the inherited sockets; the kernel
hands each new connection to one of them) and supervises them: SIGTERM, SIGINT and SIGHUP are passed on, and a
worker that dies is started again. The workers share the credential through the configured token store; with
the default ``memory`` store they get a file store in a private directory (0700) of the parent's, removed when
it exits, so that N workers still make one token request per token lifetime with no configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from proxy.errors import EXIT_CONFIG, ConfigError, SidecarError
from proxy.logs import event

log = logging.getLogger("proxy.workers")

# A worker that dies sooner than this after its start counts as failing to start; this many such deaths in a row
# stop the sidecar (a broken configuration must not turn into a fork loop).
QUICK_DEATH = 5.0
MAX_QUICK_DEATHS = 5
# Linux's prctl option that sends the child a signal when its parent dies (a SIGKILLed supervisor leaves no
# orphans serving with the credential).
_PR_SET_PDEATHSIG = 1

# Serves as worker number N in its own process (on the sockets the parent bound); returns its exit status.
ServeOne = Callable[[int], int]


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request above took effect
        os._exit(0)


class Supervisor:
    """Forks and watches the workers."""

    def __init__(self, count: int, serve_one: ServeOne, *, sharing: str) -> None:
        self._count = count
        self._sharing = sharing
        self._serve_one = serve_one
        self._children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started at)
        self._stopping = False

    def _spawn(self, number: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent(parent)
                code = self._serve_one(number)
            except ConfigError as exc:
                print(f"cognito-sidecar: {exc}", file=sys.stderr)
                code = EXIT_CONFIG
            except SidecarError as exc:
                print(f"cognito-sidecar: worker {number}: {exc}", file=sys.stderr)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(code)
        self._children[pid] = (number, time.monotonic())

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        for number in range(self._count):
            self._spawn(number)
        log.info(
            "%d workers serving (pids %s), sharing tokens through %s",
            len(self._children),
            " ".join(str(pid) for pid in self._children),
            self._sharing,
            extra=event("workers_started", workers=len(self._children)),
        )
        quick_deaths = 0
        status = 0
        while self._children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if pid not in self._children:
                continue
            number, started = self._children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code == EXIT_CONFIG and not self._stopping:
                log.error("worker %d refused the configuration; stopping", number)
                self._forward(signal.SIGTERM, None)
                status = EXIT_CONFIG
                continue
            if self._stopping:
                status = status or (code if code > 0 else 0)
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH else 0
            if quick_deaths >= MAX_QUICK_DEATHS:
                log.error("workers keep dying at start (exit status %d); stopping", code)
                self._forward(signal.SIGTERM, None)
                status = 1
                continue
            self._spawn(number)
            log.error(
                "worker %d (pid %d) ended with status %d; started it again",
                number,
                pid,
                code,
                extra=event("worker_restarted", worker=number, exit_status=code),
            )
        return status


def run_workers(count: int, serve_one: ServeOne, *, sharing: str) -> int:
    """Serve with ``count`` processes, each running ``serve_one`` (``sharing`` names the token store they share, for
    the log); returns the exit status once they have all ended."""
    return Supervisor(count, serve_one, sharing=sharing).run()
