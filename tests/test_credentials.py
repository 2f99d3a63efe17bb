"""Credentials in depth: rotation persisted without loss, client_credentials, API keys, secret reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from proxy.emulator import fingerprint
from proxy.secrets import read_secret_file
from proxy.settings import SecretStr
from tests.conftest import FakeClock, Stack, awaiting, metric, run_sidecar, run_stack, sidecar_process, stack_env


async def test_rotated_refresh_token_is_written_to_its_file(client: httpx2.AsyncClient, tmp_path: Path):
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True) as stack:
        stack.use_clock(clock)
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        settings = stack.settings(refresh_token_file=token_file)
        async with run_sidecar(settings, clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            first = read_secret_file(token_file)
            in_memory = sidecar.grant.refresh_token
            # Compared by fingerprint: a failure message never shows a token.
            assert fingerprint(first) != fingerprint(stack.emulator.refresh_token)
            assert fingerprint(first) == fingerprint(in_memory)
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            clock.advance(3600)
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            latest = fingerprint(read_secret_file(token_file))
            assert latest not in (fingerprint(first), fingerprint(stack.emulator.refresh_token))


async def test_a_rotated_refresh_token_is_on_disk_before_the_rest_of_the_answer_is_looked_at(
    client: httpx2.AsyncClient, tmp_path: Path
):
    async with run_stack(rotate_refresh_tokens=True) as stack:
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        token_file.chmod(0o600)
        # Cognito rotated, and the rest of its answer is unusable: the new refresh token must be kept anyway.
        answer = '{"id_token": "not a JWT", "refresh_token": "the-rotated-one", "expires_in": 3600}'
        stack.emulator.cognito.fail_next(200, answer)
        async with run_sidecar(stack.settings(refresh_token_file=token_file)) as sidecar:
            refused = await client.get(f"{sidecar.url}/a")
            assert refused.status_code == 503 and refused.headers["x-sidecar-error"] == "token_unusable"
            assert read_secret_file(token_file) == "the-rotated-one"
            assert sidecar.grant.last_persist_window is not None  # timed from the answer, logged with the rotation


async def test_unwritable_token_file_is_reported_and_serving_goes_on(client: httpx2.AsyncClient, tmp_path: Path):
    async with run_stack(rotate_refresh_tokens=True) as stack:
        folder = tmp_path / "secrets"
        folder.mkdir()
        token_file = folder / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token)
        shutil.rmtree(folder)  # the volume went away after start-up
        async with run_sidecar(stack.settings(refresh_token_file=token_file)) as sidecar:
            response = await client.get(f"{sidecar.url}/a")
            ready = await client.get(f"{sidecar.url}/-/readyz")
            metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
    assert response.status_code == 200
    assert ready.status_code == 200
    assert "could not be written" in ready.json()["warning"]
    assert "sidecar_refresh_token_persist_failures_total 1.0" in metrics


@pytest.mark.slow
async def test_kill_9_at_random_instants_never_loses_the_credential(tmp_path: Path):
    """SIGKILL the sidecar 20 times at random instants while it refreshes (rotating) every second or so, some
    in the middle of a refresh; with Cognito's grace period above the restart time every restart must work."""
    async with run_stack(rotate_refresh_tokens=True, grace_period=10, token_lifetime=3) as stack:
        stack.emulator.cognito.latency = 0.05  # each refresh is in flight for a while: some kills land in one
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        env = stack_env(stack, SIDECAR_REFRESH_TOKEN_FILE=str(token_file), SIDECAR_ACCESS_LOG="0")
        rng = random.Random(7)
        async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            for _ in range(20):
                async with sidecar_process(env) as sidecar:
                    response = await client.get(f"{sidecar.url}/alive")
                    assert response.status_code == 200, response.text  # this restart works with what the file held
                    # Traffic for a random while (background refreshes rotate meanwhile), then the kill.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(rng.uniform(0.1, 1.5)):
                            while True:
                                await client.get(f"{sidecar.url}/busy")
                    await sidecar.stop(signal.SIGKILL)
                content = token_file.read_text()
                whole = content.endswith("\n") and len(content.strip()) > 20
                assert whole  # never empty or torn (the content itself stays out of the failure message)
        assert stack.token_requests > 20


async def test_client_credentials_one_token_request_per_token_life(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack(machine_to_machine=True) as stack:
        stack.use_clock(clock)
        settings = stack.settings(grant="client_credentials", token="access_token", scopes="api/read")
        async with run_sidecar(settings, clock=clock) as sidecar:
            # Sustained traffic over three hours, 60-minute tokens, 5-minute margin: a refresh every 55 minutes.
            for _ in range(36):
                for _ in range(5):
                    response = await client.get(f"{sidecar.url}/m2m")
                    assert response.status_code == 200
                clock.advance(300)
            claims = response.json()["claims"]
    assert claims["token_use"] == "access"
    assert claims["scope"] == "api/read"
    assert stack.emulator.cognito.grant_counts["client_credentials"] == stack.token_requests
    assert stack.token_requests == 4  # at 0, 55, 110 and 165 minutes


async def test_api_key_replaces_the_clients_own(client: httpx2.AsyncClient):
    async with run_stack(api_key="usage-plan-key") as stack:
        async with run_sidecar(stack.settings(api_key=SecretStr("wrong-key"))) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).json() == {"message": "Forbidden"}
        async with run_sidecar(stack.settings(api_key=SecretStr("usage-plan-key"))) as sidecar:
            response = await client.get(f"{sidecar.url}/a", headers={"x-api-key": "client-sent"})
    assert response.status_code == 200
    shown = [h for h in response.json()["headers"] if h[0] == "x-api-key"]
    assert shown == [["x-api-key", f"[api key {fingerprint('usage-plan-key')}]"]]


async def test_rotated_client_secret_is_picked_up_after_invalid_client(client: httpx2.AsyncClient, tmp_path: Path):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        secret_file = tmp_path / "client-secret"
        secret_file.write_text((stack.emulator.client.secret or "") + "\n")
        settings = stack.settings(client_secret_file=secret_file)
        async with run_sidecar(settings, clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            # The team rotates the app client's secret and Kubernetes updates the mounted file.
            stack.emulator.client.secret = "the-new-secret"
            secret_file.write_text("the-new-secret\n")
            clock.advance(3600)
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
    assert stack.token_requests == 3  # invalid_client once, then the same refresh with the re-read secret


async def test_reload_lifts_a_permanent_failure_at_once(client: httpx2.AsyncClient, tmp_path: Path):
    async with run_stack() as stack:
        token_file = tmp_path / "refresh-token"
        token_file.write_text("a-revoked-token\n")
        async with run_sidecar(
            stack.settings(refresh_token=SecretStr("a-revoked-token"), refresh_token_file=token_file)
        ) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 503
            token_file.write_text(stack.emulator.refresh_token + "\n")  # a person logged in again
            assert sidecar.tokens.reload_credentials()  # what SIGHUP does
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200


@pytest.mark.slow
async def test_sighup_rereads_secret_files(stack: Stack, tmp_path: Path):
    token_file = tmp_path / "refresh-token"
    token_file.write_text("a-revoked-token\n")
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN_FILE=str(token_file))
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/a")).status_code == 503
        token_file.write_text(stack.emulator.refresh_token + "\n")
        sidecar.process.send_signal(signal.SIGHUP)
        await sidecar.read_until("secret files re-read (a value changed)")  # the reload's end
        assert (await client.get(f"{sidecar.url}/b")).status_code == 200
        code, _ = await sidecar.stop()
    assert code == 0


async def test_api_key_file_is_reread_like_the_other_secrets(client: httpx2.AsyncClient, tmp_path: Path):
    async with run_stack(api_key="rotated-key") as stack:
        key_file = tmp_path / "api-key"
        key_file.write_text("old-key\n")
        settings = stack.settings(api_key=SecretStr("old-key"), api_key_file=key_file)
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 403
            key_file.write_text("rotated-key\n")
            assert sidecar.forwarder.reload_secrets()  # what SIGHUP does, with the providers' reload
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200


async def test_two_sidecars_on_one_refresh_token_file_both_warn_naming_each_other(
    client: httpx2.AsyncClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    async with run_stack() as stack:
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        token_file.chmod(0o600)  # (a group-readable file is warned about too; not the subject here)
        settings = stack.settings(refresh_token_file=token_file)
        env = stack_env(stack, SIDECAR_REFRESH_TOKEN_FILE=str(token_file), SIDECAR_ACCESS_LOG="0")
        async with run_sidecar(settings) as first, sidecar_process(env) as second:
            assert (await client.get(f"{first.url}/a")).status_code == 200
            assert (await client.get(f"{second.url}/a")).status_code == 200
            holder = (await client.get(f"{first.url}/-/readyz")).json()["warning"]
            later = (await client.get(f"{second.url}/-/readyz")).json()["warning"]
            await second.stop()
            assert "warning" not in (await client.get(f"{first.url}/-/readyz")).json()  # the other one is gone
        async with run_sidecar(settings) as third:  # the others have stopped: the lock is free again
            assert (await client.get(f"{third.url}/a")).status_code == 200
            after = await client.get(f"{third.url}/-/readyz")
    assert f"another process (pid {second.process.pid}) started with the refresh token" in holder
    assert f"another process (pid {os.getpid()}) is serving with the refresh token" in later
    assert "rotat" in holder and "rotat" in later
    assert f"pid {second.process.pid}" in caplog.text  # the holder logs it too
    assert "warning" not in after.json()


async def test_a_token_store_shares_the_file_only_with_its_own_members(client: httpx2.AsyncClient, tmp_path: Path):
    async with run_stack() as stack:
        token_file = tmp_path / "refresh-token"
        token_file.write_text(stack.emulator.refresh_token + "\n")
        token_file.chmod(0o600)
        store = f"file:{tmp_path / 'store'}"
        members = stack.settings(refresh_token_file=token_file, token_store=store)
        async with run_sidecar(members) as first, run_sidecar(members) as second:
            for sidecar in (first, second):
                assert (await client.get(f"{sidecar.url}/a")).status_code == 200
                assert "warning" not in (await client.get(f"{sidecar.url}/-/readyz")).json()
            # One without the store (or with another store or key) on the same file: everyone is told.
            async with run_sidecar(stack.settings(refresh_token_file=token_file)) as outsider:
                assert (await client.get(f"{outsider.url}/a")).status_code == 200
                told = [(await client.get(f"{s.url}/-/readyz")).json().get("warning", "") for s in (first, outsider)]
    assert "started with the refresh token" in told[0]
    assert "is serving with the refresh token" in told[1] and "another token store or store key" in told[1]


def _kubernetes_secret_volume(folder: Path, files: dict[str, str], version: str) -> None:
    """Write ``files`` the way the kubelet updates a mounted Secret: a new timestamped directory, then an
    atomic swap of the ``..data`` symlink; each name is a symlink through ``..data``."""
    target = folder / f"..{version}"
    target.mkdir()
    for name, value in files.items():
        (target / name).write_text(value + "\n")
        (target / name).chmod(0o400)
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    swap = folder / "..data_tmp"
    swap.symlink_to(target.name)
    swap.replace(folder / "..data")


async def test_secret_files_are_reread_when_kubernetes_swaps_them(client: httpx2.AsyncClient, tmp_path: Path):
    volume = tmp_path / "secret-volume"
    volume.mkdir(mode=0o700)
    _kubernetes_secret_volume(volume, {"api_key": "old-key"}, "2026_12_02_10_00_00.1")
    async with run_stack(api_key="new-key") as stack:
        settings = stack.settings(api_key=SecretStr("old-key"), api_key_file=volume / "api_key")
        async with run_sidecar(settings) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 403  # API Gateway: wrong key
            # No signal: the kubelet swaps the volume, and the sidecar notices by itself.
            _kubernetes_secret_volume(volume, {"api_key": "new-key"}, "2026_12_02_10_05_00.2")
            await asyncio.wait_for(sidecar.parts.secrets_changed.wait(), 10)
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200


async def test_a_wrong_new_secret_is_tried_at_once_and_the_working_one_kept(
    client: httpx2.AsyncClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy")  # token_refreshed is an INFO line
    async with run_stack() as stack:
        secret_file = tmp_path / "client-secret"
        secret_file.write_text((stack.emulator.client.secret or "") + "\n")
        secret_file.chmod(0o600)
        async with run_sidecar(stack.settings(client_secret_file=secret_file)) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            assert stack.token_requests == 1
            with awaiting("secret_refused") as refused:
                secret_file.write_text("a-wrong-secret\n")  # a typo, with a valid token still in hand
                assert sidecar.tokens.reload_credentials()  # what the file watcher or SIGHUP does
                await asyncio.wait_for(refused.wait(), 10)
            assert stack.token_requests == 2  # the one request that tried the new value, at once
            ready = await client.get(f"{sidecar.url}/-/readyz")
            assert ready.status_code == 200 and "refused by Cognito (invalid_client)" in ready.json()["warning"]
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
            assert metric(metrics, "sidecar_secret_refusals_total") == 1
            # The file fixed: tried once more, and the warning goes.
            with awaiting("token_refreshed") as refreshed:
                secret_file.write_text((stack.emulator.client.secret or "") + "\n")
                assert sidecar.tokens.reload_credentials()
                await asyncio.wait_for(refreshed.wait(), 10)
            assert stack.token_requests == 3
            assert "warning" not in (await client.get(f"{sidecar.url}/-/readyz")).json()
    assert "a-wrong-secret" not in caplog.text


async def test_a_kubernetes_secret_layout_keeps_its_link_and_a_new_login_in_it_wins(
    client: httpx2.AsyncClient, tmp_path: Path
):
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=3600) as stack:
        stack.use_clock(clock)
        volume = tmp_path / "cognito"
        volume.mkdir(mode=0o700)
        _kubernetes_secret_volume(volume, {"refresh_token": stack.emulator.refresh_token}, "1")
        token_file = volume / "refresh_token"
        async with run_sidecar(stack.settings(refresh_token_file=token_file), clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            # Rotated and written through the link: the link stays, so the Secret's updates are still seen.
            assert token_file.is_symlink()
            assert fingerprint(read_secret_file(token_file)) == fingerprint(sidecar.grant.refresh_token)
            # The kubelet puts the Secret's old value back (its copy differs from the API's): an old copy, ignored.
            _kubernetes_secret_volume(volume, {"refresh_token": stack.emulator.refresh_token}, "2")
            assert not sidecar.parts.reload_secrets()
            await clock.settle(3600)
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            # A person logs in again and updates the Secret: that value wins, and the old family is gone.
            stack.emulator.cognito.revoke_all()
            fresh = stack.emulator.cognito.issue_refresh_token(stack.emulator.client.client_id)
            _kubernetes_secret_volume(volume, {"refresh_token": fresh}, "3")
            assert sidecar.parts.reload_secrets()
            await clock.settle(3600)
            assert (await client.get(f"{sidecar.url}/c")).status_code == 200
            assert sidecar.tokens.outcomes["permanent"] == 0
            assert token_file.is_symlink()


@contextlib.contextmanager
def read_only_volume(path: Path, name: str, value: str) -> Iterator[Callable[[str], None]]:
    """A read-only filesystem at ``path`` holding ``name``, as Kubernetes mounts a Secret; yields a function that
    changes the file as the kubelet would (remounted writable for a moment). Needs root, as mounting does."""
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a read-only filesystem needs root and mount permission")

    def put(new: str) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)
        (path / name).write_text(new + "\n")
        (path / name).chmod(0o400)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    try:
        put(value)
        yield put
    finally:
        subprocess.run(["umount", str(path)], check=True)


async def test_a_read_only_secret_with_rotation_takes_a_new_login_at_once(client: httpx2.AsyncClient, tmp_path: Path):
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True, grace_period=0, token_lifetime=3600) as stack:
        stack.use_clock(clock)
        token_file = tmp_path / "secret" / "refresh_token"
        with read_only_volume(token_file.parent, token_file.name, stack.emulator.refresh_token) as put:
            async with run_sidecar(stack.settings(refresh_token_file=token_file), clock=clock) as sidecar:
                assert (await client.get(f"{sidecar.url}/a")).status_code == 200
                assert "could not be written" in (await client.get(f"{sidecar.url}/-/readyz")).json()["warning"]
                assert not sidecar.parts.reload_secrets()  # the file still holds the rotated-out token: kept out
                stack.emulator.cognito.revoke_all()
                put(stack.emulator.cognito.issue_refresh_token(stack.emulator.client.client_id))
                assert sidecar.parts.reload_secrets()  # what SIGHUP and the file watcher do
                await clock.settle(3600)
                assert (await client.get(f"{sidecar.url}/b")).status_code == 200
                assert sidecar.tokens.outcomes["permanent"] == 0
