"""Sidecars sharing one credential through a token store: a real ``redis-server`` of the tests' own (started on an
ephemeral port, stopped and restarted empty by the tests), the file store in a temporary directory, and
``SIDECAR_WORKERS``. Every sidecar is a real server; the token requests are counted by the emulated Cognito."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest
import redis

from proxy.app import create_app
from proxy.settings import SecretStr
from proxy.store.redis import RedisStore
from proxy.tokens.build import identity_of
from proxy.tokens.sealed import HoldOff, Record, Sealer
from proxy.tokens.token import TokenResponse
from tests.conftest import (
    FakeClock,
    RunningSidecar,
    SidecarProcess,
    Stack,
    assert_hidden,
    awaiting,
    metric,
    run_cli,
    run_sidecar,
    run_stack,
    sidecar_process,
    stack_env,
)
from tests.redis_server import RedisServer, redis_cluster, redis_sentinels, redis_server

HOUR = 3600


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def stored_values(server: RedisServer, password: str | None = None) -> dict[bytes, bytes]:
    """Every key in ``server`` with what it holds (a hash's fields and values joined)."""
    with redis.Redis(port=server.port, password=password) as client:
        return {key: _value(client, key) for key in client.keys("*")}


def _value(client: redis.Redis, key: bytes) -> bytes:
    if client.type(key) == b"hash":
        return b" ".join(b"%s=%s" % item for item in client.hgetall(key).items())
    return client.get(key) or b""


async def get_all(client: httpx2.AsyncClient, urls: list[str]) -> list[int]:
    answers = await asyncio.gather(*(client.get(url) for url in urls))
    return [answer.status_code for answer in answers]


@contextlib.asynccontextmanager
async def fleet(
    stack: Stack, count: int, clock: FakeClock | None = None, **settings: object
) -> AsyncIterator[list[RunningSidecar]]:
    async with contextlib.AsyncExitStack() as stacked:
        yield [
            await stacked.enter_async_context(run_sidecar(stack.settings(**settings), clock=clock))
            for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def rotating_fleet(
    server: RedisServer, client: httpx2.AsyncClient
) -> AsyncIterator[tuple[Stack, FakeClock, list[RunningSidecar]]]:
    """Two sidecars on ``server``, refresh tokens rotating with grace 0, on one hand-moved clock; both have
    answered once, with one token request between them."""
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        async with fleet(stack, 2, clock, token_store=server.url) as sidecars:
            assert await get_all(client, [f"{s.url}/a" for s in sidecars]) == [200, 200]
            assert stack.token_requests == 1
            yield stack, clock, sidecars


async def test_sidecars_sharing_redis_make_one_token_request_and_store_nothing_readable(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with run_stack() as stack, fleet(stack, 3, token_store=redis_srv.url) as sidecars:
        statuses = await get_all(client, [f"{sidecars[i % 3].url}/items/{i}" for i in range(90)])
        assert statuses == [200] * 90
        assert stack.token_requests == 1
        shared = [s.tokens.shared for s in sidecars]
        assert all(each is not None for each in shared)
        assert sum(each.adopted for each in shared if each) == 2
        text = (await client.get(f"{sidecars[0].url}/-/metrics")).text
        assert metric(text, "sidecar_token_store_errors_total") == 0
        held = sidecars[0].tokens.usable()
        assert held is not None
        values = stored_values(redis_srv)
        assert any(key.endswith(b":state") for key in values)
        blob = b" ".join(key + b" " + value for key, value in values.items()).decode("latin-1")
        secret = stack.emulator.client.secret or ""
        assert_hidden(
            blob, stack.emulator.refresh_token, held["id_token"].value, secret, stack.emulator.client.client_id
        )


async def test_rotation_with_grace_zero_loses_no_credential_across_sidecars(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        for lifetime in range(3):
            await clock.settle(HOUR - 250)  # both refreshers reach their background point
            await clock.settle(60)
            assert await get_all(client, [f"{s.url}/b" for s in sidecars]) == [200, 200]
            assert stack.token_requests == 2 + lifetime
        outcomes = [s.tokens.outcomes for s in sidecars]
        assert all(each["permanent"] == 0 for each in outcomes)
        assert sum(s.grant.rotations for s in sidecars) == 4  # each rotation seen once, by its holder
        assert stack.emulator.cognito.grant_counts["refresh_token"] == 4
        for sidecar in sidecars:  # the store keeps the rotated token: nothing to warn about
            assert "warning" not in (await client.get(f"{sidecar.url}/-/readyz")).json()


async def test_a_lease_whose_holder_died_is_taken_over(redis_srv: RedisServer, client: httpx2.AsyncClient) -> None:
    async with run_stack() as stack:
        settings = stack.settings(token_store=redis_srv.url, token_store_lease=0.5)
        shared = create_app(settings).sidecar.providers[0].shared
        assert shared is not None
        # Another sidecar took the lease and was killed before it released it (or wrote anything).
        dead = RedisStore(redis_srv.url)
        lease = await dead.acquire(shared.sealer.key, 0.5)
        await dead.aclose()
        assert lease is not None and not lease.takeover
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/x")).status_code == 200
            shared = sidecar.tokens.shared
            assert shared is not None and shared.takeovers == 1 and shared.lock_waits == 1
            text = (await client.get(f"{sidecar.url}/-/metrics")).text
            assert metric(text, "sidecar_token_store_takeovers_total") == 1
            assert metric(text, "sidecar_token_store_lock_waits_total") == 1
        assert stack.token_requests == 1


async def test_a_lock_no_sidecar_sets_cannot_stop_every_refresh(
    redis_srv: RedisServer, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_stack() as stack:
        settings = stack.settings(token_store=redis_srv.url, token_store_lease=0.5)
        shared = create_app(settings).sidecar.providers[0].shared
        assert shared is not None
        # Someone who can write to Redis without the key: a lock with no expiry.
        with redis.Redis.from_url(redis_srv.url) as writer:
            writer.set(f"{shared.sealer.key}:lock", "1 someone-else")
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/x")).status_code == 200
            text = (await client.get(f"{sidecar.url}/-/metrics")).text
            assert metric(text, "sidecar_token_store_errors_total") == 1
        assert stack.token_requests == 1
    assert "which no sidecar sets, was in the way and was removed" in caplog.text


async def test_unreachable_redis_without_rotation_refreshes_locally_and_says_so(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    clock = FakeClock()
    async with run_stack(token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(token_store=redis_srv.url), clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            redis_srv.stop()
            await clock.settle(HOUR)  # past the real expiry: a refresh is needed and Redis is gone
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            ready = await client.get(f"{sidecar.url}/-/readyz")
            assert ready.status_code == 200
            assert "token store" in ready.json()["warning"]
            text = (await client.get(f"{sidecar.url}/-/metrics")).text
            assert metric(text, "sidecar_token_store_fallbacks_total") >= 1
            assert metric(text, "sidecar_token_store_trouble") == 1
            redis_srv.start()  # back, empty
            await clock.settle(HOUR)
            assert (await client.get(f"{sidecar.url}/c")).status_code == 200
            assert any(key.endswith(b":state") for key in stored_values(redis_srv))  # seeded again
            text = (await client.get(f"{sidecar.url}/-/metrics")).text
            assert metric(text, "sidecar_token_store_trouble") == 0


async def test_unreachable_redis_with_rotation_never_refreshes_without_the_lease(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        redis_srv.stop()
        await clock.settle(HOUR - 250)  # refresh due, store gone: the token in hand is still sent
        assert await get_all(client, [f"{s.url}/b" for s in sidecars]) == [200, 200]
        await clock.settle(250)  # past the real expiry
        for sidecar in sidecars:
            answer = await client.get(f"{sidecar.url}/c")
            assert answer.status_code == 503
            assert answer.json()["error"] == "store_unavailable"
            ready = await client.get(f"{sidecar.url}/-/readyz")
            assert (ready.status_code, ready.json()["error"]) == (503, "store_unavailable")
        assert stack.token_requests == 1  # nobody refreshed without the lease
        redis_srv.start()  # restarted without its data: seeded again from the newest refresh token held
        await clock.settle(5)
        await clock.settle(5)
        assert await get_all(client, [f"{s.url}/d" for s in sidecars]) == [200, 200]
        assert stack.token_requests == 2
        assert all(s.tokens.outcomes["permanent"] == 0 for s in sidecars)


async def test_a_store_that_lost_its_latest_writes_does_not_lose_the_credential(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        # The records (not the key check-ins, a hash): they hold the first rotated refresh token.
        before = {key: value for key, value in stored_values(redis_srv).items() if b":check:" not in key}
        await clock.settle(HOUR - 250)
        await clock.settle(60)
        assert stack.emulator.cognito.refresh_outcomes["ok"] == 2  # rotated again: the stored one is retired
        with redis.Redis(port=redis_srv.port) as raw:
            raw.mset(before)  # as a Redis restarted from a snapshot older than its last write
        await clock.settle(HOUR - 250)
        await clock.settle(60)
        assert await get_all(client, [f"{s.url}/b" for s in sidecars]) == [200, 200]
        assert stack.emulator.cognito.refresh_outcomes == {"ok": 3}  # nothing refused: nothing lost
        said = [s.tokens.shared for s in sidecars]
        assert all(each is not None for each in said)


async def test_a_refused_refresh_holds_the_whole_fleet_off(redis_srv: RedisServer, client: httpx2.AsyncClient) -> None:
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.revoke_all()  # every refresh is refused with invalid_grant
        async with fleet(stack, 3, clock, token_store=redis_srv.url) as sidecars:
            for sidecar in sidecars:
                answer = await client.get(f"{sidecar.url}/a")
                assert (answer.status_code, answer.json()["error"]) == (503, "token_rejected")
            assert stack.token_requests == 1  # one asked; the others took its refusal from the store
            held = [s for s in sidecars if s.grant.endpoint.outcomes["permanent"] == 0]
            assert len(held) == 2
            ready = await client.get(f"{held[0].url}/-/readyz")
            assert "Another sidecar sharing this credential was refused" in ready.json()["detail"]
            for _ in range(3):  # each round: the hold lapses, one sidecar asks again, the others follow it
                await clock.settle(61)
            assert stack.token_requests == 4


async def test_an_unusable_answer_holds_the_fleet_off_too(redis_srv: RedisServer, client: httpx2.AsyncClient) -> None:
    clock = FakeClock()
    async with run_stack(token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.skew = -(HOUR - 100)  # tokens arrive with 100 s left: inside the refresh margin
        async with fleet(stack, 3, clock, token_store=redis_srv.url) as sidecars:
            for sidecar in sidecars:
                answer = await client.get(f"{sidecar.url}/a")
                assert (answer.status_code, answer.json()["error"]) == (503, "token_clock_skew")
            assert stack.token_requests == 1  # the others took the failure from the store


async def test_new_secrets_on_disk_look_past_the_fleets_hold_off(
    redis_srv: RedisServer, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    async with run_stack() as stack:
        stack.emulator.cognito.revoke_all()
        files = [tmp_path / f"refresh_token_{i}" for i in range(2)]
        for each in files:
            each.write_text(stack.emulator.refresh_token + "\n")
        async with contextlib.AsyncExitStack() as stacked:
            sidecars = [
                await stacked.enter_async_context(
                    run_sidecar(stack.settings(token_store=redis_srv.url, refresh_token_file=each))
                )
                for each in files
            ]
            for sidecar in sidecars:
                assert (await client.get(f"{sidecar.url}/a")).status_code == 503  # refused, then held off
            assert stack.token_requests == 1
            fresh = stack.emulator.cognito.issue_refresh_token(stack.emulator.client.client_id)
            for each in files:  # a person logged in again and updated every replica's Secret
                each.write_text(fresh + "\n")
            for sidecar in sidecars:
                async with asyncio.timeout(10):
                    await sidecar.parts.secrets_changed.wait()
                assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            assert stack.token_requests == 2  # the first to look refreshed; the other took its tokens


async def test_redis_auth_and_a_wrong_password_said_plainly_without_the_password(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    password = "s3cret-redis-password"
    with redis_server(password=password) as server:
        async with run_stack() as stack:
            url = f"redis://:{password}@127.0.0.1:{server.port}/0"
            async with run_sidecar(stack.settings(token_store=url)) as sidecar:
                assert (await client.get(f"{sidecar.url}/a")).status_code == 200
                assert stack.token_requests == 1
                assert any(key.endswith(b":state") for key in stored_values(server, password))
            wrong = stack.settings(token_store=server.url, token_store_password=SecretStr("wrong-password"))
            async with run_sidecar(wrong) as sidecar:
                assert (await client.get(f"{sidecar.url}/b")).status_code == 200  # not rotating: refreshed locally
                warning = (await client.get(f"{sidecar.url}/-/readyz")).json()["warning"]
                assert f"the token store redis://127.0.0.1:{server.port}/0 is unavailable" in warning
    assert_hidden(caplog.text + warning, password, "wrong-password")


async def test_redis_over_tls_with_a_private_ca(client: httpx2.AsyncClient) -> None:
    with redis_server(tls=True) as server:
        async with run_stack() as stack, fleet(stack, 2, token_store=server.url) as sidecars:
            assert await get_all(client, [f"{s.url}/a" for s in sidecars]) == [200, 200]
            assert stack.token_requests == 1
            assert all(s.tokens.shared and s.tokens.shared.problem is None for s in sidecars)
        # Without the CA, the server's certificate is refused, and said so.
        untrusted = server.url.split("?")[0]
        async with run_stack() as stack, run_sidecar(stack.settings(token_store=untrusted)) as sidecar:
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200  # not rotating: refreshed locally
            warning = (await client.get(f"{sidecar.url}/-/readyz")).json()["warning"]
            assert "certificate verify failed" in warning
        # SIDECAR_CA_FILE is trusted by rediss:// too.
        settings = {"token_store": untrusted, "ca_file": Path(server.ca_file)}
        async with run_stack() as stack, run_sidecar(stack.settings(**settings)) as sidecar:
            assert (await client.get(f"{sidecar.url}/c")).status_code == 200
            assert sidecar.tokens.shared and sidecar.tokens.shared.problem is None
            assert "warning" not in (await client.get(f"{sidecar.url}/-/readyz")).json()


async def test_file_store_shares_one_token_in_a_private_directory(tmp_path: Path, client: httpx2.AsyncClient) -> None:
    directory = tmp_path / "store"
    async with run_stack() as stack, fleet(stack, 2, token_store=f"file:{directory}") as sidecars:
        statuses = await get_all(client, [f"{sidecars[i % 2].url}/i/{i}" for i in range(40)])
        assert statuses == [200] * 40
        assert stack.token_requests == 1
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        states = list(directory.glob("*.state"))
        assert len(states) == 1 and stat.S_IMODE(states[0].stat().st_mode) == 0o600
        assert_hidden(states[0].read_bytes().decode("latin-1"), stack.emulator.refresh_token)


async def test_a_new_login_replaces_the_stored_credential_and_old_seeds_follow_it(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        settings = stack.settings(token_store=redis_srv.url)
        async with run_sidecar(settings, clock=clock) as first:
            assert (await client.get(f"{first.url}/a")).status_code == 200
        # A person signed the credential out everywhere and logged in again: a new refresh token in the config.
        stack.emulator.cognito.revoke_all()
        fresh = stack.emulator.cognito.issue_refresh_token(stack.emulator.client.client_id)
        relogged = stack.settings(token_store=redis_srv.url, refresh_token=SecretStr(fresh))
        async with run_sidecar(relogged, clock=clock) as new:
            assert (await client.get(f"{new.url}/b")).status_code == 200  # the stored set, still valid
            assert stack.token_requests == 1
            await clock.settle(HOUR)
            assert (await client.get(f"{new.url}/c")).status_code == 200
            assert new.tokens.outcomes["permanent"] == 0
        assert stack.token_requests == 2
        # A replica that still reads the old Secret: its seed is one the store has seen, so it follows the store.
        async with run_sidecar(settings, clock=clock) as stale:
            await clock.settle(HOUR)
            assert (await client.get(f"{stale.url}/d")).status_code == 200
            assert stale.tokens.outcomes["permanent"] == 0
        assert stack.token_requests == 3


@pytest.mark.slow
async def test_token_and_check_go_through_the_store(redis_srv: RedisServer, client: httpx2.AsyncClient) -> None:
    async with run_stack(rotate_refresh_tokens=True, grace_period=0) as stack:
        async with run_sidecar(stack.settings(token_store=redis_srv.url)) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200  # rotated: the seed is retired
            env = stack_env(
                stack, SIDECAR_TOKEN_STORE=redis_srv.url, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token
            )
            code, out, said = await run_cli("token", env=env)
            assert code == 0, said
            held = sidecar.tokens.usable()
            assert held is not None and out.strip() == held["id_token"].value  # the fleet's token, not a new one
            code, out, said = await run_cli("check", env=env)
            assert code == 0, out + said
            assert f"PASS  the token store {redis_srv.url} answers" in out
            assert "the token store keeps the newest" in out
        assert stack.token_requests == 1  # neither command asked Cognito, nor used the retired seed
        assert stack.emulator.cognito.refresh_outcomes == {"ok": 1}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "said_first"),
    [
        # A store directory that cannot be made (under a file), with one process and with workers.
        ({"SIDECAR_TOKEN_STORE": "file:/etc/hostname/store"}, "SIDECAR_TOKEN_STORE: cannot create the directory"),
        (
            {"SIDECAR_TOKEN_STORE": "file:/etc/hostname/store", "SIDECAR_WORKERS": "2"},
            "SIDECAR_TOKEN_STORE: cannot create the directory",
        ),
        # Workers with no writable place for their private store (a read-only root filesystem).
        ({"SIDECAR_WORKERS": "2", "XDG_RUNTIME_DIR": "/etc/hostname"}, "SIDECAR_WORKERS: the workers share"),
    ],
)
async def test_a_store_that_cannot_be_used_stops_the_sidecar_with_a_plain_message(
    extra: dict[str, str], said_first: str
) -> None:
    async with run_stack() as stack:
        env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, **extra)
        code, _, said = await run_cli("serve", env=env)
    assert code == 2
    assert said_first in said
    assert "Traceback" not in said


def _children(pid: int) -> list[int]:
    return [int(each) for each in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
async def test_workers_share_one_token_and_are_restarted(client: httpx2.AsyncClient) -> None:
    async with run_stack() as stack:
        env = stack_env(stack, SIDECAR_WORKERS="2", SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
        async with sidecar_process(env) as process:
            if "workers serving" not in "".join(process.lines):
                await process.read_until("workers serving")
            workers = _children(process.process.pid)
            assert len(workers) == 2
            statuses = await get_all(client, [f"{process.url}/w/{i}" for i in range(60)])
            assert statuses == [200] * 60
            assert stack.token_requests == 1
            os.kill(workers[0], signal.SIGKILL)
            await process.read_until("started it again")
            assert len(_children(process.process.pid)) == 2
            statuses = await get_all(client, [f"{process.url}/v/{i}" for i in range(20)])
            assert statuses == [200] * 20
            assert stack.token_requests == 1  # the restarted worker took the stored token
            code, said = await process.stop()
            assert code == 0
            assert_hidden(said, stack.emulator.refresh_token, stack.emulator.client.secret or "")


@contextlib.asynccontextmanager
async def _two_workers(stack: Stack) -> AsyncIterator[SidecarProcess]:
    """A sidecar with SIDECAR_WORKERS=2 on ``stack``, once both workers serve."""
    env = stack_env(stack, SIDECAR_WORKERS="2", SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
    async with sidecar_process(env) as process:
        while sum("Application startup complete" in line for line in process.lines) < 2:
            await process.read_until("Application startup complete")
        yield process


@pytest.mark.slow
async def test_connections_opened_at_once_are_shared_between_the_workers() -> None:
    # On one shared listening socket the first worker awake accepted every connection waiting (64 opened at once
    # went 60 to 4, 62 to 2, or all to one): a client pool opened in a burst was served by one core. Each worker now
    # has a queue of its own (SO_REUSEPORT) and the kernel hands connections out by a hash of their ports: an even
    # split to within chance. With 64, a worker with fewer than 16 is 4 standard deviations out (1 run in 15,000).
    async with run_stack() as stack, _two_workers(stack) as process:
        host, port = process.url.removeprefix("http://").rsplit(":", 1)
        streams = await asyncio.gather(*(asyncio.open_connection(host, int(port)) for _ in range(64)))

        async def worker_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
            writer.write(f"GET /burst HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 ")
            request_id = answer.split(b"\r\nx-request-id: ")[1][:32].decode()
            return request_id[:16]  # the process's prefix: which worker answered

        workers = await asyncio.gather(*(worker_of(reader, writer) for reader, writer in streams))
        code, said = await process.stop()
        assert code == 0
    shares = sorted(Counter(workers).values())
    assert len(shares) == 2 and shares[0] >= 16, shares
    assert "Traceback" not in said


@pytest.mark.slow
async def test_one_scrape_of_a_two_worker_sidecar_counts_every_workers_requests() -> None:
    async with run_stack() as stack, _two_workers(stack) as process:
        # A new connection per request: the kernel hands them to both workers.
        fresh = httpx2.Limits(max_keepalive_connections=0)
        async with httpx2.AsyncClient(trust_env=False, timeout=30, limits=fresh) as client:
            answers = [await client.get(f"{process.url}/n/{i}") for i in range(40)]
            assert [answer.status_code for answer in answers] == [200] * 40
            scrapes = [(await client.get(f"{process.url}/-/metrics")).text for _ in range(8)]
        code, said = await process.stop()
        assert code == 0
    assert all(
        metric(text, "sidecar_requests_total", method="GET", route="/", status_class="2xx") == 40 for text in scrapes
    )
    assert all(metric(text, "sidecar_workers_reporting") == 2 for text in scrapes)
    for worker in ("0", "1"):  # a gauge is told per worker; the counts above are summed
        assert metric(scrapes[0], "sidecar_draining", worker=worker) == 0
    own = [
        metric(text, "sidecar_requests_total", method="GET", route="/-/", status_class="2xx") for text in scrapes[1:]
    ]
    assert sum(own) == sum(range(1, 8))  # each scrape counts the ones before it, whichever worker answers
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert len(set(ids)) == 40  # each worker makes ids of its own
    assert "Traceback" not in said


async def test_a_member_starting_late_in_the_fleets_token_life_adopts_its_set(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    clock = FakeClock()
    async with run_stack(token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        settings = stack.settings(token_store=redis_srv.url)
        async with run_sidecar(settings, clock=clock) as first:
            assert (await client.get(f"{first.url}/a")).status_code == 200
            clock.advance(40 * 60)  # the stored set is 40 minutes old: 20 left, 15 before its refresh point
            async with run_sidecar(settings, clock=clock) as late:
                assert (await client.get(f"{late.url}/b")).status_code == 200
                held = late.tokens.usable()
                assert held is not None
                # Its age counted once: it expires when the first member's does, not 40 minutes sooner.
                assert abs(held.expires_at - clock.monotonic() - 20 * 60) < 10
        assert stack.token_requests == 1


async def test_a_public_clients_file_store_is_sealed_and_a_planted_set_is_refused(
    tmp_path: Path, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "store"
    async with run_stack(public_client=True) as stack:
        settings = stack.settings(token_store=f"file:{directory}")
        assert settings.client_secret is None and settings.token_store_key is None
        # A record an older sidecar wrote in clear, before the store had a key: sealed in place, then used.
        answer = await client.post(
            stack.token_url,
            data={
                "grant_type": "refresh_token",
                "client_id": settings.client_id,
                "refresh_token": stack.emulator.refresh_token,
            },
        )
        assert answer.status_code == 200
        issued = answer.json()
        plain = Sealer(identity_of(settings), None)
        legacy = Record(
            received=time.time(),
            response=TokenResponse(issued["id_token"], issued["access_token"], None, issued["expires_in"], "Bearer"),
            refresh_token=stack.emulator.refresh_token,
            rotates=False,
            origins=(plain.fingerprint(stack.emulator.refresh_token),),
        )
        directory.mkdir(mode=0o700)
        state = directory / f"{plain.key}.state"
        state.write_bytes(plain.seal_record(legacy))
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            assert stack.token_requests == 1  # the one above: the old record was adopted
        assert not state.read_bytes().startswith(b"p1:")
        assert_hidden(state.read_bytes().decode("latin-1"), stack.emulator.refresh_token, issued["id_token"])
        # Now the store has a key: a set planted in clear is not trusted, and the sidecar buys its own.
        state.write_bytes(plain.seal_record(dataclasses.replace(legacy, received=time.time())))
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            assert stack.token_requests == 2
            held = sidecar.tokens.usable()
            assert held is not None and held["id_token"].value != issued["id_token"]
        assert "is in plaintext but this sidecar seals: it is not trusted" in caplog.text


async def test_members_sealing_with_different_keys_are_told_on_both_sides(
    redis_srv: RedisServer, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    async with run_stack(token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        right = stack.settings(token_store=redis_srv.url, token_store_key=SecretStr("k" * 32))
        async with run_sidecar(right, clock=clock) as first:
            assert (await client.get(f"{first.url}/a")).status_code == 200
            assert "warning" not in (await client.get(f"{first.url}/-/readyz")).json()
            # A member without the store key (sealing with the client secret): a second store in the same Redis.
            async with run_sidecar(stack.settings(token_store=redis_srv.url), clock=clock) as other:
                assert (await client.get(f"{other.url}/a")).status_code == 200
                told = (await client.get(f"{other.url}/-/readyz")).json()["warning"]
                assert "seals with a different key" in told and "SIDECAR_TOKEN_STORE_KEY" in told
                # The first hears of it at its next look at the store, when its token is due.
                await clock.settle(HOUR)
                assert (await client.get(f"{first.url}/b")).status_code == 200
                assert "seals with a different key" in (await client.get(f"{first.url}/-/readyz")).json()["warning"]
        assert caplog.text.count("seals with a different key") >= 2
        assert_hidden(caplog.text + told, "k" * 32, stack.emulator.client.secret or "")
        env = stack_env(stack, SIDECAR_TOKEN_STORE=redis_srv.url, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token)
        code, out, _ = await run_cli("check", env=env)
        assert code != 0 and "FAIL  another store key is in use for this credential" in out


@pytest.mark.slow  # the hung refresh holds the emulator's shutdown for its 5 s grace
async def test_a_member_starting_during_the_fleets_refresh_serves_the_valid_stored_set(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    clock = FakeClock()
    async with run_stack(token_lifetime=HOUR) as stack:
        stack.use_clock(clock)
        settings = stack.settings(token_store=redis_srv.url)
        async with run_sidecar(settings, clock=clock) as first:
            assert (await client.get(f"{first.url}/a")).status_code == 200
            clock.advance(HOUR - 200)  # past the refresh point (300 s before expiry), still valid for 200 s
            stack.emulator.cognito.latency = 30.0  # the fleet's refresh hangs at the token endpoint
            stack.emulator.cognito.seen.clear()
            assert (await client.get(f"{first.url}/b")).status_code == 200  # served from hand; refresh begun
            await asyncio.wait_for(stack.emulator.cognito.seen.wait(), 10)  # under the lease, at the endpoint
            async with run_sidecar(settings, clock=clock) as late:
                # Served at once with the stored set, not after the hung refresh.
                assert (await client.get(f"{late.url}/c")).status_code == 200
                assert late.tokens.shared is not None and late.tokens.shared.adopted == 1
                assert first.tokens.outcomes["success"] == 1  # the fleet's refresh is still in flight
            stack.emulator.cognito.latency = 0.0
        assert stack.token_requests == 2  # the first, and the hung one: the late member asked for none


async def test_a_store_that_loses_its_data_during_a_rotation_is_seeded_with_the_newest_refresh_token(
    redis_srv: RedisServer, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy")  # token_refreshed is an INFO line
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        rotator = sidecars[0]
        await clock.settle(600)  # the rotator's refresh comes ten minutes into the set: the other is due first
        # The rotator refreshes (API Gateway refused its token); Cognito rotates, and Redis dies before the
        # answer arrives: the new refresh token is in the rotator's memory only.
        stack.emulator.cognito.answer_latency = 1.0
        stack.emulator.cognito.seen.clear()
        held = rotator.tokens.usable()
        with awaiting("token_refreshed") as refreshed:
            assert held is not None and rotator.tokens.refused(held["id_token"])
            settling = asyncio.create_task(clock.settle(1))  # past the minimum interval: the refresh goes
            await asyncio.wait_for(stack.emulator.cognito.seen.wait(), 10)
            redis_srv.stop()
            await asyncio.wait_for(refreshed.wait(), 20)
            await settling
        assert stack.emulator.cognito.refresh_outcomes["ok"] == 2
        stack.emulator.cognito.answer_latency = 0.0
        redis_srv.start()  # back, empty
        # The other member's token is due first: it must not seed the store with its superseded refresh token.
        await clock.settle(HOUR - 850)
        await clock.settle(5)
        await clock.settle(5)
        assert await get_all(client, [f"{s.url}/after" for s in sidecars]) == [200, 200]
        await clock.settle(HOUR)
        assert await get_all(client, [f"{s.url}/later" for s in sidecars]) == [200, 200]
        assert stack.emulator.cognito.refresh_outcomes.get("invalid_grant", 0) == 0
        assert all(s.tokens.outcomes["permanent"] == 0 for s in sidecars)


async def test_a_hold_off_note_about_an_older_refresh_token_does_not_hold_off_a_newer_one(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        shared = sidecars[0].tokens.shared
        assert shared is not None and shared.generation >= 1  # seeded, then rotated by the first refresh
        for older, held_off in ((1, False), (0, True)):
            generation = shared.generation - older  # about the token before this member's, or about this one
            note = HoldOff(
                until=clock.time() + 10 * HOUR,
                permanent=True,
                code="token_rejected",
                summary="invalid_grant",
                flow="refresh",
                generation=generation,
            )
            await shared.store.hold_off(shared.sealer.key, shared.sealer.seal_note(note))
            before = stack.token_requests
            await clock.settle(HOUR)
            statuses = await get_all(client, [f"{s.url}/x" for s in sidecars])
            assert (stack.token_requests == before) is held_off, generation
            assert statuses == ([503, 503] if held_off else [200, 200])


async def test_a_redis_cluster_keeps_one_credentials_keys_in_one_slot_and_shares_one_token(
    client: httpx2.AsyncClient,
) -> None:
    clock = FakeClock()
    with redis_cluster() as nodes:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=HOUR) as stack:
            stack.use_clock(clock)
            async with fleet(stack, 2, clock, token_store=url) as sidecars:
                assert await get_all(client, [f"{s.url}/a" for s in sidecars]) == [200, 200]
                assert stack.token_requests == 1
                await clock.settle(HOUR - 250)
                await clock.settle(60)
                assert await get_all(client, [f"{s.url}/b" for s in sidecars]) == [200, 200]
                assert stack.emulator.cognito.refresh_outcomes == {"ok": 2}  # rotated under the lease, nothing lost
        where = {}
        for node in nodes:
            with redis.Redis(port=node.port) as raw:
                where.update({key: node.port for key in raw.keys("{cognito-sidecar:*")})
        assert {key.rsplit(b":", 1)[1] for key in where} >= {b"state", b"fence", b"released"}
        assert len(set(where.values())) == 1  # one slot, so one node


async def test_sentinel_failover_while_requests_flow_loses_nothing(client: httpx2.AsyncClient) -> None:
    clock = FakeClock()
    with redis_sentinels() as sentinels:
        async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=HOUR) as stack:
            stack.use_clock(clock)
            async with fleet(stack, 2, clock, token_store=sentinels.url) as sidecars:
                assert await get_all(client, [f"{s.url}/a" for s in sidecars]) == [200, 200]
                with redis.Redis(port=sentinels.primary.port) as raw:
                    raw.wait(1, 5000)  # the replica has the record, as it would have moments later anyway
                watcher = redis.Redis(port=sentinels.sentinel.port).pubsub()
                watcher.subscribe("+switch-master")
                sentinels.primary.stop()
                switched = None
                async with asyncio.timeout(30):  # down-after 1 s, then the election
                    while switched is None:
                        assert await get_all(client, [f"{s.url}/during" for s in sidecars]) == [200, 200]
                        switched = await asyncio.to_thread(watcher.get_message, True, 0.2)
                watcher.close()
                await clock.settle(HOUR - 250)
                await clock.settle(60)
                assert await get_all(client, [f"{s.url}/after" for s in sidecars]) == [200, 200]
                assert stack.emulator.cognito.refresh_outcomes == {"ok": 2}
                assert stack.token_requests == 2


async def test_a_refused_re_seed_tries_the_refresh_tokens_other_members_offer_before_holding_the_fleet_off(
    redis_srv: RedisServer, client: httpx2.AsyncClient
) -> None:
    async with rotating_fleet(redis_srv, client) as (stack, clock, sidecars):
        seeder, other = sidecars
        seeder.grant.adopt("a-superseded-refresh-token")  # as a member whose file was put back to an old one
        with redis.Redis(port=redis_srv.port) as raw:
            raw.flushall()  # the store lost its data
        # What the other member offers while it waits on the seeder's lease: the refresh token it holds.
        shared = other.tokens.shared
        assert shared is not None
        await shared.offer_held()
        held = seeder.tokens.usable()
        assert held is not None and seeder.tokens.refused(held["id_token"])
        async with asyncio.timeout(20):
            # Until the seeder holds the new tokens: the emulator counts an answer before it arrives, and moving
            # the clock an hour while it is on the way would make it look expired on arrival.
            while seeder.tokens.usable() in (None, held):
                await clock.settle(0.5)
                await asyncio.sleep(0.05)  # the seeder waits 2.5 s of real time for offers
        assert stack.emulator.cognito.refresh_outcomes["invalid_grant"] == 1  # its own, then the offered one
        assert seeder.tokens.outcomes["permanent"] == 0
        await clock.settle(HOUR)
        assert await get_all(client, [f"{s.url}/after" for s in sidecars]) == [200, 200]
