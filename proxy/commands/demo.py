"""``cognito-sidecar demo`` (the emulator and the sidecar on loopback, one request shown end to end) and
``cognito-sidecar emulator`` (the emulator alone, for dev stacks)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx2

from proxy.app import create_app
from proxy.commands.check import format_epoch
from proxy.emulator import EmulatorStack, make_stack
from proxy.errors import EXIT_FAILURE, SidecarError
from proxy.secrets import read_secret_file, write_secret_file
from proxy.server.serving import running
from proxy.settings import SecretStr, Settings


def _claims_summary(claims: Mapping[str, object]) -> list[str]:
    lines = []
    for name in ("token_use", "iss", "aud", "client_id", "cognito:username", "sub", "scope", "auth_time", "exp"):
        if name in claims:
            value = claims[name]
            if name in ("exp", "auth_time"):
                value = f"{value} ({format_epoch(value)})"
            lines.append(f"    {name}: {value}")
    return lines


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM. Installed first, so a signal that comes early still stops cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _stack_settings(stack: EmulatorStack, cognito_url: str, api_url: str, listen: str) -> Settings:
    secret = stack.client.secret
    return Settings(
        upstream_url=f"{api_url}/{stack.apigw.stage}",
        token_url=f"{cognito_url}/oauth2/token",
        client_id=stack.client.client_id,
        client_secret=SecretStr(secret) if secret else None,
        refresh_token=SecretStr(stack.refresh_token),
        listen=listen,
    )


async def demo(listen: str) -> int:
    stop = _stop_on_signals()
    stack = make_stack(client_id="demo-client")
    async with running(stack.cognito.app) as cognito_url, running(stack.apigw) as api_url:
        settings = _stack_settings(stack, cognito_url, api_url, listen)
        host, port = settings.listen_address
        app = create_app(settings)
        async with running(app, host=host, port=port, limits=app.sidecar.limits) as sidecar_url:
            async with httpx2.AsyncClient(trust_env=False) as client:
                response = await client.get(f"{sidecar_url}/hello?name=world", timeout=30)
            print(f"Emulated Cognito token endpoint: {settings.token_url}")
            print(f"Emulated API Gateway stage:      {settings.upstream_url}")
            print(f"Sidecar:                         {sidecar_url}")
            print()
            print(f"GET {sidecar_url}/hello?name=world  ->  HTTP {response.status_code}")
            if response.status_code != 200:
                print(response.text)
                return EXIT_FAILURE
            echo = response.json()
            query = f"?{echo['query_string']}" if echo["query_string"] else ""
            print(f"API Gateway's stand-in saw {echo['method']} {echo['path']}{query} with a valid Cognito token")
            print(f"  (token fingerprint {echo['token_sha256']}; the token itself is never printed). Its claims:")
            print("\n".join(_claims_summary(echo["claims"])))
            print()
            print("Try it yourself while this runs (Ctrl-C stops it):")
            print(f"  curl -s '{sidecar_url}/hello?name=you'")
            print(f"  curl -s {sidecar_url}/-/readyz")
            print(f"  or open {sidecar_url}/-/ in a browser: the status page")
            sys.stdout.flush()
            await stop.wait()
    print("demo stopped")
    return 0


def _emulator_secret(name: str) -> str | None:
    """An emulator secret from ``NAME`` or the file ``NAME_FILE``: never from the command line, which any user of
    the machine can read in ``ps``."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return read_secret_file(path) or None
        except OSError as exc:
            raise SidecarError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return os.environ.get(name) or None


def _hand_over(client_secret: str | None, refresh_token: str, directory: Path) -> None:
    """Write the emulator's credentials where a sidecar of the same dev stack reads them (``client_secret`` and
    ``refresh_token``, 0600, atomically): the stack then needs no secret files in the repository."""
    try:
        if client_secret:
            write_secret_file(directory / "client_secret", client_secret)
        write_secret_file(directory / "refresh_token", refresh_token)
    except OSError as exc:
        raise SidecarError(
            f"--write-credentials: cannot write to {directory} ({exc.strerror}); give the emulator a writable "
            "directory of its own (a volume both containers mount)"
        ) from None


def _usable(url: str) -> str:
    """``url`` as this machine can call it: a wildcard listening address is no address to send requests to."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


async def emulator(args: argparse.Namespace) -> int:
    stop = _stop_on_signals()
    stack = make_stack(
        client_id=args.client_id,
        client_secret=_emulator_secret("EMULATOR_CLIENT_SECRET"),
        refresh_token=_emulator_secret("EMULATOR_REFRESH_TOKEN"),
        token_lifetime=args.token_lifetime,
        stage=args.stage,
        rotate_refresh_tokens=args.rotate,
        grace_period=args.grace_period,
    )
    if args.write_credentials is not None:
        _hand_over(stack.client.secret, stack.refresh_token, args.write_credentials)
    async with (
        running(stack.cognito.app, host=args.host, port=args.cognito_port) as cognito_url,
        running(stack.apigw, host=args.host, port=args.api_port) as api_url,
    ):
        print(f"SIDECAR_TOKEN_URL={_usable(cognito_url)}/oauth2/token")
        print(f"SIDECAR_UPSTREAM_URL={_usable(api_url)}/{stack.apigw.stage}")
        print(f"SIDECAR_CLIENT_ID={stack.client.client_id}")
        if _usable(cognito_url) != cognito_url:
            print(
                f"(listening on every interface of this host, {args.host}: other machines and containers use its name)"
            )
        print(
            "(the client secret and refresh token are EMULATOR_CLIENT_SECRET and EMULATOR_REFRESH_TOKEN, or their "
            "_FILE variants; random ones, never shown, when unset)"
        )
        sys.stdout.flush()
        await stop.wait()
    return 0
