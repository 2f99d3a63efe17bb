"""The fault matrix: one line per token-endpoint fault, with what it cost and what the clients saw.

    python bench/faults.py [--clients 20] [--hours 1] [--only NAME] [--rotations 30]

Each fault runs the emulator and the sidecar in this process on ephemeral loopback ports, with the real
refresh policy, on a clock this script moves (an hour of fault takes seconds): every 10 s of that clock,
``--clients`` concurrent requests go through the sidecar. It prints, per fault: the answers the clients got,
the token requests made, requests that had to wait for a token, the slowest request (real milliseconds),
and the expired tokens the emulated API Gateway saw (it rejects them; the sidecar must send none). It is a
benchmark, not a test: CI does not run it; docs/lab/notebook.md keeps dated runs of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.tokens.schedule import RefreshPolicy
from tests.conftest import FakeClock, Stack, run_sidecar, run_stack

STEP = 10.0


@dataclass
class Fault:
    name: str
    # Applied to the running stack once the sidecar holds its first token (or before start, with ``at_start``).
    inject: Callable[[Stack], None]
    at_start: bool = False
    token_lifetime: int = 3600
    token_timeout: float = 10.0


def _skew(seconds: float) -> Callable[[Stack], None]:
    def inject(stack: Stack) -> None:
        stack.emulator.cognito.skew = seconds

    return inject


def _fail(status: int, body: str, *, times: int = 1_000_000, **options: object) -> Callable[[Stack], None]:
    def inject(stack: Stack) -> None:
        stack.emulator.cognito.fail_next(status, body, times=times, **options)  # type: ignore[arg-type]

    return inject


def _hang(stack: Stack) -> None:
    stack.emulator.cognito.latency = 24 * 3600


def _revoke(stack: Stack) -> None:
    stack.emulator.cognito.revoke_all()


def _refuse_all_tokens(stack: Stack) -> None:
    stack.emulator.apigw.audiences.clear()


FAULTS = [
    Fault("none", lambda stack: None),
    Fault("clock 40 s behind, 30 s tokens", _skew(-40), at_start=True, token_lifetime=30),
    Fault("clock 20 s behind, 30 s tokens", _skew(-20), at_start=True, token_lifetime=30),
    Fault("token endpoint hangs", _hang, token_timeout=0.5),
    Fault("HTTP 500 throughout", _fail(500, "Internal Server Error")),
    Fault("429 Retry-After: 30", _fail(429, '{"message":"Rate exceeded"}', headers={"Retry-After": "30"})),
    Fault("TooManyRequestsException (HTML)", _fail(400, "<html>TooManyRequestsException</html>")),
    Fault("one empty 200", _fail(200, "", times=1)),
    Fault("one garbage 200", _fail(200, "<html>captive portal</html>", times=1)),
    Fault("refresh token revoked", _revoke),
    Fault("authorizer refuses every token", _refuse_all_tokens),
]


async def run_fault(fault: Fault, *, clients: int, hours: float) -> str:
    clock = FakeClock()
    answers: Counter[int] = Counter()
    slowest = 0.0
    async with run_stack(token_lifetime=fault.token_lifetime) as stack:
        stack.use_clock(clock)
        if fault.at_start:
            fault.inject(stack)
        settings = stack.settings(token_timeout=fault.token_timeout)
        async with (
            run_sidecar(settings, clock=clock, policy=RefreshPolicy()) as sidecar,
            httpx2.AsyncClient(trust_env=False, timeout=60, limits=httpx2.Limits(max_connections=clients)) as client,
        ):

            async def one(i: int) -> None:
                nonlocal slowest
                started = time.perf_counter()
                response = await client.get(f"{sidecar.url}/fault/{i}")
                slowest = max(slowest, time.perf_counter() - started)
                answers[response.status_code] += 1

            await one(0)  # the first token, before the fault
            if not fault.at_start:
                fault.inject(stack)
            before = stack.token_requests if not fault.at_start else 0
            waits_before = sidecar.tokens.waits
            for _ in range(int(hours * 3600 / STEP)):
                await asyncio.gather(*(one(i) for i in range(clients)))
                await clock.settle(STEP)
            token_requests = stack.token_requests - before
            waited = sidecar.tokens.waits - waits_before
    shown = " ".join(f"{status}x{count}" for status, count in sorted(answers.items()))
    return (
        f"{fault.name:<34} {token_requests:>6} {waited:>7} {slowest * 1000:>9.1f} "
        f"{stack.emulator.apigw.expired:>8}  {shown}"
    )


async def rotation_window(rotations: int = 30) -> str:
    """How long a rotated refresh token lives only in memory: from the answer's arrival to the durable file."""
    clock = FakeClock()
    windows: list[float] = []
    async with run_stack(rotate_refresh_tokens=True) as stack:
        stack.use_clock(clock)
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
            token_file = Path(folder) / "refresh-token"
            token_file.write_text(stack.emulator.refresh_token + "\n")
            token_file.chmod(0o600)
            async with (
                run_sidecar(stack.settings(refresh_token_file=token_file), clock=clock) as sidecar,
                httpx2.AsyncClient(trust_env=False) as client,
            ):
                for _ in range(rotations):
                    await clock.settle(3600)  # the token has expired: the next request waits for a rotation
                    assert (await client.get(f"{sidecar.url}/rotate")).status_code == 200
                    windows.append((sidecar.grant.last_persist_window or 0.0) * 1000)
    return (
        f"rotation: answer -> new refresh token durably in its file, {rotations} rotations in {Path.cwd()}: "
        f"median {statistics.median(windows):.2f} ms, max {max(windows):.2f} ms"
    )


async def main(clients: int, hours: float, only: str | None, rotations: int) -> None:
    print(f"{hours:g} h of each fault, {clients} concurrent requests every {STEP:g} s of the moved clock")
    print(f"{'fault':<34} {'tokens':>6} {'waited':>7} {'max ms':>9} {'expired':>8}  answers (status x count)")
    for fault in FAULTS:
        if only and only not in fault.name:
            continue
        print(await run_fault(fault, clients=clients, hours=hours), flush=True)
    print(await rotation_window(rotations))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--only", help="run only the faults whose name contains this")
    parser.add_argument("--rotations", type=int, default=30, help="rotations timed for the rotation window")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the sidecar logs every failed token request; the table says enough
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.clients, args.hours, args.only, args.rotations))
