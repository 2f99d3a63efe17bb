"""The fleet: sidecar processes sharing one credential through a token store, measured from outside.

    python bench/fleet.py [--sidecars 10] [--requests 500] [--kills 10] [--only redis|workers] [--no-baseline]
                          [--scenarios cold,sustained,kills,answer-lost,emptied,outage,lost-rotation,
                                       store-then-500,key-mismatch,late-join]

The emulated Cognito and API Gateway run in this process on ephemeral loopback ports (they count the token
requests and how every refresh ended); a redis-server of this script's own runs on an ephemeral port; every
sidecar is a ``cognito-sidecar serve`` process. Two forms: ``redis``, --sidecars processes sharing a Redis, and
``workers``, one sidecar with SIDECAR_WORKERS=2 (its workers share the automatic file store). For each it prints:

- cold: the sidecars just started, --requests concurrent requests spread over them: the token requests made;
- sustained: traffic through 3 token lifetimes (20 s tokens, 2 s margin): the token requests, next to the same
  traffic through as many sidecars each on its own (the memory store), measured in the same run;
- kills: refresh tokens rotate with grace 0; each time a refresh is on its way to Cognito (the emulator holds it
  for 1 s before acting), the lease holder is SIGKILLed and a new sidecar started in its place (the supervisor
  restarts a worker itself): the refreshes Cognito refused (a lost credential), the takeovers, failed requests;
- answer lost: the same, killed after Cognito rotated the token (its answer held 1 s on the way back), grace 10 s;
- emptied: the store loses everything while the fleet runs, rotation on (Redis restarted without persistence,
  the file store's files deleted): the refreshes Cognito refused, the answers;
- outage (redis only): Redis stopped for longer than a token's life, rotation on, then started again empty:
  the answers during the outage, the time until every sidecar serves again, the refreshes Cognito refused.

Recovery paths (redis only):

- lost-rotation: Redis dies the instant Cognito rotated during a refresh (grace 0), and is back empty 5 s
  later: the refreshes Cognito refused (a member seeding the store with a superseded token), the answers;
- store-then-500: Redis down 10 s (every sidecar looks every second), back, then one HTTP 500 from Cognito:
  the seconds until every sidecar serves again (the store's looks must not have grown the backoff);
- key-mismatch: one member without the others' SIDECAR_TOKEN_STORE_KEY, rotation on: the members whose
  readiness warns, the refreshes Cognito refused;
- late-join: a member starts while the fleet's refresh hangs 3 s at Cognito: its first request's latency.

Not a test: CI does not run it; docs/lab/notebook.md keeps dated runs of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.emulator.cognito import CognitoEmulator
from proxy.settings import load_settings
from proxy.sidecar import build_sidecar
from proxy.store.file import FileStore
from proxy.store.redis import RedisStore
from tests.conftest import Stack, run_stack, stack_env
from tests.redis_server import RedisServer, redis_server

SUSTAINED = {"lifetime": 20, "margin": 2, "lifetimes": 3}
# Kills: the next refresh must be done (lease expiry 1.5 s + the emulator's 1 s) before the token expires.
KILLS = {"lifetime": 12, "margin": 5, "lease": 1.5}
OUTAGE = {"lifetime": 12, "margin": 5, "seconds": 20}
LIMIT = 60.0


@dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    url: str
    said: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    drain: asyncio.Task[None] | None = None


async def start_sidecar(env: dict[str, str]) -> Sidecar:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    said: deque[str] = deque(maxlen=400)
    async with asyncio.timeout(LIMIT):
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise RuntimeError("a sidecar exited at start:\n" + "".join(said))
            said.append(line)
            if "listening on " in line:
                break
    sidecar = Sidecar(process, line.split("listening on ")[1].split(",")[0], said)

    async def drain() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            said.append(line.decode())

    sidecar.drain = asyncio.create_task(drain())
    return sidecar


async def stop_sidecar(sidecar: Sidecar, sig: int = signal.SIGTERM) -> None:
    if sidecar.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            sidecar.process.send_signal(sig)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sidecar.process.wait(), 30)
    if sidecar.drain is not None:
        sidecar.drain.cancel()


class Load:
    """``concurrency`` loops sending GETs round-robin over the fleet's current addresses, counting answers."""

    def __init__(self, fleet: Fleet, concurrency: int) -> None:
        self.fleet = fleet
        self.answers: Counter[str] = Counter()
        self._concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, client: httpx2.AsyncClient, offset: int) -> None:
        index = offset
        while True:
            urls = self.fleet.urls
            url = urls[index % len(urls)]
            index += 1
            try:
                answer = await client.get(f"{url}/load/{index}")
                self.answers[str(answer.status_code)] += 1
                if answer.status_code != 200:
                    self.answers[answer.headers.get("x-sidecar-error", "?")] += 1
            except httpx2.HTTPError:
                self.answers["connection error"] += 1
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            self._tasks = [asyncio.create_task(self._loop(client, i)) for i in range(self._concurrency)]
            try:
                yield self
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def summary(self) -> str:
        shown = ", ".join(f"{key} x{count}" for key, count in sorted(self.answers.items(), key=lambda kv: -kv[1]))
        return shown or "none"


class Fleet:
    """Sidecars sharing one credential; ``urls`` is where traffic goes now."""

    name = ""
    urls: list[str]

    def __init__(self, stack: Stack, env: dict[str, str]) -> None:
        self.stack = stack
        self.env = env
        self.sidecars: list[Sidecar] = []
        self.killed: list[Sidecar] = []  # what they said still counts

    async def start(self) -> None:
        raise NotImplementedError

    async def holder(self) -> int | None:
        raise NotImplementedError

    async def kill_holder(self) -> bool:
        raise NotImplementedError

    async def stop(self) -> None:
        await asyncio.gather(*(stop_sidecar(each) for each in self.sidecars))

    def said(self) -> str:
        return "".join(line for each in [*self.sidecars, *self.killed] for line in each.said)


async def _store_key(env: dict[str, str]) -> str:
    sidecar = build_sidecar(load_settings(env))
    try:
        shared = sidecar.providers[0].shared
        assert shared is not None
        return shared.sealer.key
    finally:
        await sidecar.http.aclose()
        if sidecar.store is not None:
            await sidecar.store.aclose()


def _pid(holder: str | None) -> int | None:
    if not holder:
        return None
    match = re.search(r":(\d+)$", holder.strip())
    return int(match.group(1)) if match else None


class ProcessFleet(Fleet):
    """``count`` serve processes (the Redis store, or each on its own with the memory store)."""

    def __init__(self, stack: Stack, env: dict[str, str], count: int, redis: RedisServer | None) -> None:
        super().__init__(stack, env)
        self.count = count
        self.redis = redis
        self.name = "redis" if redis else "memory"
        self.urls = []

    async def start(self) -> None:
        self.sidecars = list(await asyncio.gather(*(start_sidecar(self.env) for _ in range(self.count))))
        self.urls = [each.url for each in self.sidecars]
        if self.redis is not None:
            self._key = await _store_key(self.env)
            self._store = RedisStore(self.redis.url)

    async def holder(self) -> int | None:
        return _pid(await self._store.holder(self._key))

    async def kill_holder(self) -> bool:
        pid = await self.holder()
        victim = next((each for each in self.sidecars if each.process.pid == pid), None)
        if victim is None:
            return False
        self.urls = [url for url in self.urls if url != victim.url]
        await stop_sidecar(victim, signal.SIGKILL)
        self.sidecars.remove(victim)
        self.killed.append(victim)
        fresh = await start_sidecar(self.env)
        self.sidecars.append(fresh)
        self.urls = [*self.urls, fresh.url]
        return True

    async def stop(self) -> None:
        await super().stop()
        if self.redis is not None:
            await self._store.aclose()


class WorkersFleet(Fleet):
    """One sidecar with SIDECAR_WORKERS=2 and the automatic file store."""

    name = "workers"

    async def start(self) -> None:
        sidecar = await start_sidecar({**self.env, "SIDECAR_WORKERS": "2"})
        self.sidecars = [sidecar]
        self.urls = [sidecar.url]
        async with asyncio.timeout(LIMIT):
            while not any("workers serving" in line for line in sidecar.said):
                await asyncio.sleep(0.05)
        line = next(line for line in sidecar.said if "workers serving" in line)
        directory = line.split("through file:")[1].split()[0]
        self.directory = Path(directory)
        self._store = FileStore(self.directory)
        self._key = await _store_key({**self.env, "SIDECAR_TOKEN_STORE": f"file:{directory}"})

    async def holder(self) -> int | None:
        return _pid(await self._store.holder(self._key))

    async def kill_holder(self) -> bool:
        pid = await self.holder()
        if pid is None or pid == self.sidecars[0].process.pid:
            return False
        restarted = sum("started it again" in line for line in self.sidecars[0].said)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(LIMIT):
            while sum("started it again" in line for line in self.sidecars[0].said) == restarted:
                await asyncio.sleep(0.05)
        return True


def done(cognito: CognitoEmulator) -> int:
    """Refreshes Cognito acted on (answered, well or not)."""
    return cognito.refresh_outcomes["ok"] + cognito.refresh_outcomes["invalid_grant"]


def fleet_env(stack: Stack, *, lifetime: dict[str, float], redis: RedisServer | None) -> dict[str, str]:
    extra = {
        "SIDECAR_REFRESH_TOKEN": stack.emulator.refresh_token,
        "SIDECAR_ACCESS_LOG": "0",
        "SIDECAR_REFRESH_MARGIN": str(lifetime["margin"]),
    }
    if "lease" in lifetime:
        extra["SIDECAR_TOKEN_STORE_LEASE"] = str(lifetime["lease"])
    if redis is not None:
        extra["SIDECAR_TOKEN_STORE"] = redis.url
    return stack_env(stack, **extra)


@contextlib.asynccontextmanager
async def fleet_of(
    form: str, stack: Stack, env: dict[str, str], count: int, redis: RedisServer | None
) -> AsyncIterator[Fleet]:
    fleet: Fleet = WorkersFleet(stack, env) if form == "workers" else ProcessFleet(stack, env, count, redis)
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


async def cold(form: str, count: int, requests: int, redis: RedisServer | None) -> str:
    async with run_stack() as stack:
        env = fleet_env(stack, lifetime=SUSTAINED, redis=redis)
        async with (
            fleet_of(form, stack, env, count, redis) as fleet,
            httpx2.AsyncClient(trust_env=False, timeout=30, limits=httpx2.Limits(max_connections=requests)) as client,
        ):
            urls = fleet.urls
            answers = await asyncio.gather(
                *(client.get(f"{urls[i % len(urls)]}/cold/{i}") for i in range(requests)), return_exceptions=True
            )
            ok = sum(1 for each in answers if isinstance(each, httpx2.Response) and each.status_code == 200)
    return (
        f"cold       {len(fleet.sidecars) if form != 'workers' else 2:>2} {form:8} {requests} concurrent requests: "
        f"{ok} answered 200, {stack.token_requests} token request(s)"
    )


async def sustained(form: str, count: int, redis: RedisServer | None) -> tuple[str, int]:
    """Token requests made while traffic flows for 3 token lifetimes (the first token, fetched at start, apart)."""
    lifetime = int(SUSTAINED["lifetime"])
    window = lifetime * SUSTAINED["lifetimes"]
    async with run_stack(token_lifetime=lifetime) as stack:
        env = fleet_env(stack, lifetime=SUSTAINED, redis=redis)
        async with (
            fleet_of(form, stack, env, count, redis) as fleet,
            httpx2.AsyncClient(trust_env=False, timeout=30) as client,
        ):
            for url in fleet.urls:  # every sidecar holds its first token before the window opens
                (await client.get(f"{url}/warm-up")).raise_for_status()
            load = Load(fleet, concurrency=20)
            async with load.running():
                at_start = stack.token_requests
                await asyncio.sleep(window)
                during = stack.token_requests - at_start
    sidecars = 2 if form == "workers" else count
    line = (
        f"sustained  {sidecars:>2} {fleet.name:8} {window:g} s of traffic, {int(SUSTAINED['lifetimes'])} token "
        f"lifetimes of {lifetime} s (refresh margin {SUSTAINED['margin']:g} s): {during} token requests during it, "
        f"{at_start} at start (answers: {load.summary()})"
    )
    return line, during


async def kills(form: str, count: int, rounds: int, redis: RedisServer | None, *, answer_lost: bool) -> str:
    grace = 10.0 if answer_lost else 0.0
    async with run_stack(
        token_lifetime=int(KILLS["lifetime"]), rotate_refresh_tokens=True, grace_period=grace
    ) as stack:
        cognito = stack.emulator.cognito
        if answer_lost:
            cognito.answer_latency = 1.0
        else:
            cognito.latency = 1.0
        env = fleet_env(stack, lifetime=KILLS, redis=redis)
        async with fleet_of(form, stack, env, count, redis) as fleet:
            load = Load(fleet, concurrency=10)
            killed = missed = 0
            async with load.running():
                while killed < rounds and missed < rounds:
                    ended = cognito.refresh_outcomes["ok"] + cognito.refresh_outcomes["invalid_grant"]
                    cognito.seen.clear()
                    async with asyncio.timeout(LIMIT):
                        await cognito.seen.wait()  # a refresh is on its way: its sender holds the lease
                        # Answer lost: the kill comes once Cognito has acted (rotated), while its answer travels.
                        while answer_lost and done(cognito) == ended:
                            await asyncio.sleep(0.01)
                    if not await fleet.kill_holder():
                        missed += 1
                        continue
                    killed += 1
                    async with asyncio.timeout(LIMIT):  # the next refresh (the takeover's) has ended, well or not
                        while done(cognito) < ended + (2 if answer_lost else 1):
                            await asyncio.sleep(0.05)
                await asyncio.sleep(KILLS["lifetime"])  # one more lifetime: the fleet still refreshes
            takeovers = fleet.said().count("took over the refresh lease")
    outcomes = cognito.refresh_outcomes
    label = "answer lost" if answer_lost else "kills     "
    return (
        f"{label} {2 if form == 'workers' else count:>2} {form:8} grace {grace:g} s: {killed} holders SIGKILLed "
        f"({'after Cognito rotated' if answer_lost else 'before Cognito acted'}), {takeovers} takeovers; "
        f"refreshes: {outcomes['ok']} ok, {outcomes['invalid_grant']} refused (credentials lost), "
        f"{outcomes['abandoned']} abandoned; answers: {load.summary()}"
    )


async def outage(count: int, redis: RedisServer) -> str:
    async with run_stack(token_lifetime=int(OUTAGE["lifetime"]), rotate_refresh_tokens=True) as stack:
        env = fleet_env(stack, lifetime=OUTAGE, redis=redis)
        async with fleet_of("redis", stack, env, count, redis) as fleet:
            load = Load(fleet, concurrency=10)
            async with load.running(), httpx2.AsyncClient(trust_env=False, timeout=10) as client:
                await asyncio.sleep(2)
                before = stack.token_requests
                redis.stop()
                await asyncio.sleep(OUTAGE["seconds"])
                during = Counter(load.answers)
                asked = stack.token_requests - before
                ready = [(await client.get(f"{url}/-/readyz")).status_code for url in fleet.urls]
                redis.start()  # empty: nothing was saved
                restarted = time.monotonic()
                async with asyncio.timeout(LIMIT):
                    while True:
                        statuses = [(await client.get(f"{url}/-/readyz")).status_code for url in fleet.urls]
                        if statuses == [200] * len(statuses):
                            break
                        await asyncio.sleep(0.05)
                recovered = time.monotonic() - restarted
                await asyncio.sleep(OUTAGE["lifetime"])
    outcomes = stack.emulator.cognito.refresh_outcomes
    shown = ", ".join(f"{key} x{count}" for key, count in sorted(during.items(), key=lambda kv: -kv[1]))
    return (
        f"outage     {count:>2} redis    Redis down {OUTAGE['seconds']:g} s (tokens live {OUTAGE['lifetime']:g} s), "
        f"rotation on: {asked} token requests during it, readiness at its end {Counter(ready)}; answers during: "
        f"{shown}. Restarted empty: every sidecar ready again after {recovered:.1f} s; refreshes: {outcomes['ok']} "
        f"ok, {outcomes['invalid_grant']} refused (credentials lost); answers in all: {load.summary()}"
    )


async def emptied(form: str, count: int, redis: RedisServer | None) -> str:
    """The store loses everything while the fleet runs (rotation on): the next refresh seeds it again."""
    lifetime = int(OUTAGE["lifetime"])
    async with run_stack(token_lifetime=lifetime, rotate_refresh_tokens=True) as stack:
        env = fleet_env(stack, lifetime=OUTAGE, redis=redis)
        async with fleet_of(form, stack, env, count, redis) as fleet:
            load = Load(fleet, concurrency=10)
            async with load.running():
                await asyncio.sleep(2)
                if redis is not None:
                    redis.stop()  # and at once back, empty: a restart without persistence
                    redis.start()
                else:
                    assert isinstance(fleet, WorkersFleet)
                    for path in [*fleet.directory.glob("*.state"), *fleet.directory.glob("*.hold")]:
                        path.unlink()  # the data; the lock file stays (a lock file replaced under a holder is no lock)
                await asyncio.sleep(2 * lifetime)
    outcomes = stack.emulator.cognito.refresh_outcomes
    return (
        f"emptied    {2 if form == 'workers' else count:>2} {form:8} the store emptied under a rotating credential, "
        f"then 2 token lifetimes of {lifetime} s: refreshes {outcomes['ok']} ok, {outcomes['invalid_grant']} refused "
        f"(credentials lost); answers: {load.summary()}"
    )


async def lost_rotation(count: int, redis: RedisServer) -> str:
    lifetime = int(OUTAGE["lifetime"])
    async with run_stack(token_lifetime=lifetime, rotate_refresh_tokens=True, grace_period=0) as stack:
        cognito = stack.emulator.cognito
        env = fleet_env(stack, lifetime=OUTAGE, redis=redis)
        async with (
            fleet_of("redis", stack, env, count, redis) as fleet,
            httpx2.AsyncClient(trust_env=False, timeout=30) as client,
        ):
            for url in fleet.urls:  # the first token (and rotation) is behind every member
                (await client.get(f"{url}/warm-up")).raise_for_status()
            load = Load(fleet, concurrency=10)
            async with load.running():
                cognito.answer_latency = 1.0  # the rotation is done while its answer travels: Redis dies then
                ended = done(cognito)
                cognito.seen.clear()
                async with asyncio.timeout(LIMIT):
                    await cognito.seen.wait()
                    while done(cognito) == ended:
                        await asyncio.sleep(0.005)
                redis.stop()
                cognito.answer_latency = 0.0
                await asyncio.sleep(5)
                redis.start()  # empty
                before = Counter(load.answers)
                await asyncio.sleep(2 * lifetime)
                after = load.answers - before
    outcomes = cognito.refresh_outcomes
    shown = ", ".join(f"{key} x{n}" for key, n in sorted(after.items(), key=lambda kv: -kv[1]))
    return (
        f"lost-rot.  {count:>2} redis    Redis killed as Cognito rotated (grace 0), back empty 5 s later: refreshes "
        f"{outcomes['ok']} ok, {outcomes['invalid_grant']} refused (credentials lost); answers after: {shown}"
    )


async def store_then_500(count: int, redis: RedisServer) -> str:
    lifetime = int(OUTAGE["lifetime"])
    async with run_stack(token_lifetime=lifetime) as stack:
        cognito = stack.emulator.cognito
        env = fleet_env(stack, lifetime=OUTAGE, redis=redis)
        async with fleet_of("redis", stack, env, count, redis) as fleet:
            load = Load(fleet, concurrency=10)
            async with load.running():
                await asyncio.sleep(1)
                redis.stop()
                await asyncio.sleep(10)
                redis.start()
                cognito.fail_next(500, "Internal Server Error")
                await asyncio.sleep(lifetime)
    backoffs = re.findall(r"token request failed \((\d+) in a row; next in ([0-9.]+) s", fleet.said())
    shown = ", ".join(f"{n} in a row -> next in {wait} s" for n, wait in backoffs) or "no failure logged"
    return (
        f"store-500  {count:>2} redis    Redis down 10 s (looks every second), then one HTTP 500 from Cognito: "
        f"{shown}; answers: {load.summary()}"
    )


async def key_mismatch(count: int, redis: RedisServer) -> str:
    lifetime = int(OUTAGE["lifetime"])
    async with run_stack(token_lifetime=lifetime, rotate_refresh_tokens=True, grace_period=0) as stack:
        env = {**fleet_env(stack, lifetime=OUTAGE, redis=redis), "SIDECAR_TOKEN_STORE_KEY": "k" * 32}
        odd = {key: value for key, value in env.items() if key != "SIDECAR_TOKEN_STORE_KEY"}
        async with (
            fleet_of("redis", stack, env, count - 1, redis) as fleet,
            httpx2.AsyncClient(trust_env=False, timeout=10) as client,
        ):
            other = await start_sidecar(odd)
            try:
                fleet.urls = [*fleet.urls, other.url]
                load = Load(fleet, concurrency=10)
                async with load.running():
                    await asyncio.sleep(2 * lifetime)
                warned = 0
                for url in fleet.urls:
                    ready = (await client.get(f"{url}/-/readyz")).json()
                    warned += "seals with a different key" in ready.get("warning", "")
            finally:
                await stop_sidecar(other)
    outcomes = stack.emulator.cognito.refresh_outcomes
    return (
        f"key-mism.  {count:>2} redis    one member without the store key, rotation on, 2 lifetimes: {warned} of "
        f"{count} warn in readiness; refreshes {outcomes['ok']} ok, {outcomes['invalid_grant']} refused; answers: "
        f"{load.summary()}"
    )


async def late_join(count: int, redis: RedisServer) -> str:
    lifetime = int(OUTAGE["lifetime"])
    async with run_stack(token_lifetime=lifetime) as stack:
        cognito = stack.emulator.cognito
        env = fleet_env(stack, lifetime=OUTAGE, redis=redis)
        async with (
            fleet_of("redis", stack, env, count, redis) as fleet,
            httpx2.AsyncClient(trust_env=False, timeout=30) as client,
        ):
            for url in fleet.urls:
                (await client.get(f"{url}/warm-up")).raise_for_status()
            cognito.latency = 3.0
            cognito.seen.clear()
            load = Load(fleet, concurrency=5)
            async with load.running():
                async with asyncio.timeout(LIMIT):
                    await cognito.seen.wait()  # the fleet's refresh hangs at Cognito, under the lease
                late = await start_sidecar(env)
                try:
                    started = time.monotonic()
                    first = await client.get(f"{late.url}/first")
                    took = time.monotonic() - started
                finally:
                    await stop_sidecar(late)
            cognito.latency = 0.0
    return (
        f"late-join  {count:>2} redis    a member starts while the fleet's refresh hangs 3 s: its first request "
        f"{first.status_code} in {took * 1000:.0f} ms"
    )


SCENARIOS = (
    "cold",
    "sustained",
    "kills",
    "answer-lost",
    "emptied",
    "outage",
    "lost-rotation",
    "store-then-500",
    "key-mismatch",
    "late-join",
)
RECOVERY = {"lost-rotation": lost_rotation, "store-then-500": store_then_500, "key-mismatch": key_mismatch}


async def main(args: argparse.Namespace) -> None:
    forms = [args.only] if args.only else ["redis", "workers"]
    chosen = args.scenarios.split(",") if args.scenarios else SCENARIOS
    with redis_server() as redis:
        for form in forms:
            store = redis if form == "redis" else None
            if "cold" in chosen:
                print(await cold(form, args.sidecars, args.requests, store), flush=True)
            if "sustained" in chosen:
                line, _ = await sustained(form, args.sidecars, store)
                print(line, flush=True)
                if form == "redis" and args.baseline:
                    line, alone = await sustained("memory", args.sidecars, None)
                    print(line + f"; {alone / args.sidecars:.1f} per sidecar on its own", flush=True)
            if "kills" in chosen:
                print(await kills(form, args.sidecars, args.kills, store, answer_lost=False), flush=True)
            if "answer-lost" in chosen:
                print(await kills(form, args.sidecars, args.kills, store, answer_lost=True), flush=True)
            if "emptied" in chosen:
                print(await emptied(form, args.sidecars, store), flush=True)
            if "outage" in chosen and form == "redis":
                print(await outage(args.sidecars, redis), flush=True)
            if form == "redis":
                for name, scenario in RECOVERY.items():
                    if name in chosen:
                        print(await scenario(args.sidecars, redis), flush=True)
                if "late-join" in chosen:
                    print(await late_join(args.sidecars, redis), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecars", type=int, default=10)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--only", choices=("redis", "workers"), default=None)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--scenarios", default="", help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)")
    asyncio.run(main(parser.parse_args()))
