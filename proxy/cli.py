"""The ``cognito-sidecar`` command: ``serve`` (the sidecar), ``demo`` and ``emulator``.

Wiring only: read settings, build the app, run it. Every expected failure ends in one plain message
on stderr and a non-zero exit status (2 for configuration problems), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import webbrowser
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx2
import uvloop
from pydantic import SecretStr

from proxy import __version__
from proxy.app import create_app
from proxy.doctor import format_epoch, run_checks
from proxy.emulator import EmulatorStack, make_stack
from proxy.errors import ConfigError, SidecarError
from proxy.login import (
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_REDIRECT_URI,
    DEFAULT_SCOPE,
    Pkce,
    authorize_url,
    callback_listener,
    domain_of,
    exchange,
    wait_for_code,
    write_refresh_token,
)
from proxy.logs import configure_logging
from proxy.providers import one_shot, token_http
from proxy.serving import GracefulServer, bind_listen, bound_url, config_for, running, tune_gc
from proxy.settings import Settings, load_settings, read_secret_file, settings_help
from proxy.tokens import TokenEndpoint
from proxy.workers import CONFIG_EXIT, run_workers

log = logging.getLogger("proxy")

EXIT_CONFIG = CONFIG_EXIT
EXIT_FAILURE = 1


def _serve(env: Mapping[str, str]) -> int:
    settings = load_settings(env)
    configure_logging(settings.log_level, settings.log_format)
    sock = bind_listen(settings.listen, socket_mode=int(settings.socket_mode, 8))
    sockets = [sock]
    if settings.metrics_listen is not None:
        sockets.append(bind_listen(settings.metrics_listen))
    try:
        if settings.workers > 1:
            return run_workers(settings, sockets, _serve_on)
        return _serve_on(settings, sockets, False)
    finally:
        if settings.unix_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(settings.unix_socket)


def _serve_on(settings: Settings, sockets: Sequence[socket.socket], private_store: bool) -> int:
    """One serving process on bound ``sockets`` (the forwarding listener, then the metrics one if any)."""
    app = create_app(
        settings,
        metrics_port=sockets[1].getsockname()[1] if len(sockets) > 1 else None,
        private_store=private_store,
    )
    log.info(
        "cognito-sidecar listening on %s, forwarding to %s with the %s in the %s header",
        bound_url(sockets[0]),
        settings.upstream_url,
        settings.token,
        settings.header,
    )
    if len(sockets) > 1:
        log.info("metrics and health (the /-/ routes only) on %s", bound_url(sockets[1]))
    sidecar = app.state.sidecar

    def start_draining() -> None:
        sidecar.draining = True

    def reload_secrets() -> None:
        log.info("SIGHUP: re-reading the secret files")
        sidecar.reload_secrets()

    server = GracefulServer(
        config_for(app, grace=settings.shutdown_grace, limits=sidecar.limits),
        on_stop=start_draining,
        on_reload=reload_secrets,
        delay=settings.shutdown_delay,
    )
    tune_gc()
    server.run(sockets=list(sockets))
    return 0


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


async def _demo(listen: str) -> int:
    stop = _stop_on_signals()
    stack = make_stack(client_id="demo-client")
    async with running(stack.cognito.app) as cognito_url, running(stack.apigw) as api_url:
        settings = _stack_settings(stack, cognito_url, api_url, listen)
        host, port = settings.listen_address
        async with running(create_app(settings), host=host, port=port) as sidecar_url:
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


async def _emulator(args: argparse.Namespace) -> int:
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
    async with (
        running(stack.cognito.app, host=args.host, port=args.cognito_port) as cognito_url,
        running(stack.apigw, host=args.host, port=args.api_port) as api_url,
    ):
        print(f"SIDECAR_TOKEN_URL={cognito_url}/oauth2/token")
        print(f"SIDECAR_UPSTREAM_URL={api_url}/{stack.apigw.stage}")
        print(f"SIDECAR_CLIENT_ID={stack.client.client_id}")
        print(
            "(the client secret and refresh token are EMULATOR_CLIENT_SECRET and EMULATOR_REFRESH_TOKEN, or their "
            "_FILE variants; random ones, never shown, when unset)"
        )
        sys.stdout.flush()
        await stop.wait()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cognito-sidecar",
        description="Adds an Amazon Cognito token to every request a legacy service sends to API Gateway.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"cognito-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run the sidecar (settings from SIDECAR_* variables; see README)",
        description="Run the sidecar. Settings come from the environment (and SIDECAR_CONFIG).",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands.add_parser("healthcheck", help="exit 0 when the running sidecar is ready (for container healthchecks)")
    demo = commands.add_parser("demo", help="run the local emulator and the sidecar, and show one request end to end")
    demo.add_argument("--listen", default=None, help="sidecar address (default: SIDECAR_LISTEN or 127.0.0.1:8080)")
    emu = commands.add_parser("emulator", help="run the local Cognito and API Gateway emulator (dev stacks)")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--cognito-port", type=int, default=9000)
    emu.add_argument("--api-port", type=int, default=9001)
    emu.add_argument("--client-id", default="emulator-client")
    emu.add_argument("--token-lifetime", type=int, default=3600, help="id/access token lifetime in seconds")
    emu.add_argument("--stage", default="prod")
    emu.add_argument("--rotate", action="store_true", help="rotate refresh tokens on every refresh")
    emu.add_argument("--grace-period", type=float, default=0.0, help="seconds a rotated-out refresh token still works")
    login = commands.add_parser(
        "login", help="sign in once (authorization code + PKCE) and save the refresh token the sidecar needs"
    )
    login.add_argument("--redirect-uri", default=DEFAULT_REDIRECT_URI, help=f"default {DEFAULT_REDIRECT_URI}")
    login.add_argument("--scope", default=DEFAULT_SCOPE, help=f"space-separated (default {DEFAULT_SCOPE!r})")
    login.add_argument("--no-pkce", action="store_true", help="for app clients not set up for PKCE")
    login.add_argument("--code", default=None, help="exchange this code (copied from the browser's address bar)")
    login.add_argument("--code-verifier", default=None, help="the PKCE verifier that goes with --code, if any")
    login.add_argument(
        "--out", type=Path, default=None, help="file for the refresh token (default: $SIDECAR_REFRESH_TOKEN_FILE)"
    )
    login.add_argument("--print", action="store_true", dest="print_token", help="print the refresh token to stdout")
    login.add_argument("--timeout", type=float, default=DEFAULT_LOGIN_TIMEOUT, help="seconds to wait for the sign-in")
    login.add_argument("--no-browser", action="store_true", help="only print the URL to open")
    token = commands.add_parser("token", help='print a currently valid token (for curl -H "Authorization: $(...)")')
    token.add_argument("--type", choices=("id", "access"), default=None, help="default: SIDECAR_TOKEN")
    check = commands.add_parser("check", help="check the configuration, the token endpoint and the token")
    check.add_argument("--path", default=None, help="also send one GET to this path upstream and explain the answer")
    return parser


async def _login(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(env, purpose="login")
    out: Path | None = args.out or settings.refresh_token_file
    if out is None and not args.print_token:
        raise ConfigError(
            ["--out: say where to save the refresh token (or set SIDECAR_REFRESH_TOKEN_FILE, or --print)"]
        )
    secret = settings.client_secret.get_secret_value() if settings.client_secret else None
    async with token_http(settings) as http:
        endpoint = TokenEndpoint(
            http,
            token_url=settings.token_url,
            client_id=settings.client_id,
            timeout=settings.token_timeout,
            proxy=settings.egress.proxy_for(settings.token_url),
        )
        verifier = args.code_verifier
        code = args.code
        if code is None:
            pkce = None if args.no_pkce else Pkce.new()
            state = secrets.token_urlsafe(24)
            url = authorize_url(
                domain=domain_of(settings.token_url),
                client_id=settings.client_id,
                redirect_uri=args.redirect_uri,
                scope=args.scope,
                state=state,
                pkce=pkce,
            )
            async with callback_listener(args.redirect_uri, state) as outcome:
                print(f"Open this URL in a browser and sign in:\n\n  {url}\n", file=sys.stderr, flush=True)
                if not args.no_browser and (
                    env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or sys.platform == "darwin"
                ):
                    webbrowser.open(url)
                print(f"Waiting up to {args.timeout:g} s for the redirect to {args.redirect_uri} ...", file=sys.stderr)
                code = await wait_for_code(outcome, args.redirect_uri, args.timeout)
            verifier = pkce.verifier if pkce else None
        response = await exchange(
            endpoint, code=code, redirect_uri=args.redirect_uri, verifier=verifier, client_secret=secret
        )
    refresh_token = response.refresh_token or ""  # exchange() refuses an answer without one
    if out is not None:
        write_refresh_token(out, refresh_token)
        print(f"Saved the refresh token to {out} (mode 0600). Next, run the sidecar with it:", file=sys.stderr)
        print(f"  SIDECAR_REFRESH_TOKEN_FILE={out} cognito-sidecar serve", file=sys.stderr)
    if args.print_token:
        print(refresh_token)
    return 0


async def _token(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(env, purpose="token")
    kind = {"id": "id_token", "access": "access_token", None: settings.token}[args.type]
    async with (
        token_http(settings) as http,
        one_shot(settings, http, {kind}) as provider,  # through the token store, if the fleet shares one
    ):
        token = (await provider.get())[kind]
    print(token.value)
    return 0


async def _check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    findings = await run_checks(env, path=args.path)
    for finding in findings:
        print(finding.render())
    failed = sum(1 for f in findings if f.status == "FAIL")
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return 0 if not failed else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ
    try:
        if args.command in (None, "serve"):
            return _serve(env)
        # One-shot commands say what went wrong once, in their own words: the token cache's log lines would
        # repeat it (unless a log level is asked for).
        quiet = args.command in ("token", "check", "login")
        configure_logging(
            env.get("SIDECAR_LOG_LEVEL", "critical" if quiet else "warning"),
            "json" if env.get("SIDECAR_LOG_FORMAT", "").strip().lower() == "json" else "text",
        )
        if args.command == "demo":
            listen = args.listen or env.get("SIDECAR_LISTEN", "127.0.0.1:8080")
            return uvloop.run(_demo(listen))
        if args.command == "login":
            return uvloop.run(_login(args, env))
        if args.command == "token":
            return uvloop.run(_token(args, env))
        if args.command == "check":
            return uvloop.run(_check(args, env))
        return uvloop.run(_emulator(args))
    except ConfigError as exc:
        print(f"cognito-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SidecarError as exc:
        print(f"cognito-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
