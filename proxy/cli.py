"""The ``cognito-sidecar`` command line: the parser, and dispatch to ``proxy.commands``.

Each command is imported when it runs, so ``serve`` never loads the emulator. Every expected failure ends in one
plain message on stderr and a non-zero exit status (2 for configuration problems), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy import __version__
from proxy.commands import DEFAULT_LOGIN_TIMEOUT, DEFAULT_REDIRECT_URI, DEFAULT_SCOPE
from proxy.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, SidecarError, TokenEndpointError
from proxy.logs import configure_logging
from proxy.secrets import keep_out_of_core_dumps

# serve's options, each overriding its variable: (flag, variable, example).
SERVE_FLAGS = (
    ("--listen", "SIDECAR_LISTEN", "HOST:PORT"),
    ("--upstream", "SIDECAR_UPSTREAM_URL", "URL"),
    ("--config", "SIDECAR_CONFIG", "FILE"),
)


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The command line. ``serve --help`` lists every setting: only then are the settings' models imported (the
    rest of the help answers at once)."""
    parser = argparse.ArgumentParser(
        prog="cognito-sidecar",
        description="Adds an Amazon Cognito token to every request a legacy service sends to API Gateway.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"cognito-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the sidecar (settings from SIDECAR_* variables; see docs/configuration.md)",
        description="Run the sidecar. Settings come from the environment (and SIDECAR_CONFIG); the options below "
        "override their variables.",
        epilog=_settings_help() if argv[:1] == ["serve"] else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, variable, example in SERVE_FLAGS:
        serve.add_argument(flag, default=None, metavar=example, help=f"overrides {variable}")
    commands.add_parser("healthcheck", help="exit 0 when the running sidecar is ready (for container healthchecks)")
    demo = commands.add_parser(
        "demo",
        help="run the local emulator and the sidecar, and show one request end to end",
        description="Start the built-in Cognito and API Gateway emulator and a sidecar in front of it, on loopback, "
        "send one request through and show what API Gateway's stand-in received (never the token); then keep "
        "serving for curl until Ctrl-C. Needs no AWS account and no settings.",
    )
    demo.add_argument("--listen", default=None, help="sidecar address (default: SIDECAR_LISTEN or 127.0.0.1:8080)")
    emu = commands.add_parser(
        "emulator",
        help="run the local Cognito and API Gateway emulator (dev stacks)",
        description="Run the emulated Cognito token endpoint and API Gateway stage, for compose dev stacks and "
        "tests. It prints the SIDECAR_TOKEN_URL, SIDECAR_UPSTREAM_URL and SIDECAR_CLIENT_ID a sidecar needs. The "
        "client secret and refresh token are EMULATOR_CLIENT_SECRET and EMULATOR_REFRESH_TOKEN (or their _FILE "
        "variants); random ones, never shown, when unset.",
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    emu.add_argument("--cognito-port", type=int, default=9000, help="the token endpoint's port (default 9000)")
    emu.add_argument("--api-port", type=int, default=9001, help="API Gateway's port (default 9001)")
    emu.add_argument("--client-id", default="emulator-client", help="the app client id (default emulator-client)")
    emu.add_argument("--token-lifetime", type=int, default=3600, help="id/access token lifetime in seconds")
    emu.add_argument("--stage", default="prod", help="API Gateway's stage (default prod)")
    emu.add_argument("--rotate", action="store_true", help="rotate refresh tokens on every refresh")
    emu.add_argument("--grace-period", type=float, default=0.0, help="seconds a rotated-out refresh token still works")
    emu.add_argument(
        "--write-credentials",
        type=Path,
        default=None,
        metavar="DIR",
        help="write client_secret and refresh_token (0600) into DIR, for a sidecar of the same dev stack to read",
    )
    login = commands.add_parser(
        "login",
        help="sign in once (authorization code + PKCE) and save the refresh token the sidecar needs",
        description="Sign in once in a browser at Cognito's hosted UI (authorization code with PKCE) and save the "
        "refresh token to SIDECAR_REFRESH_TOKEN_FILE (or --out), mode 0600. Uses SIDECAR_COGNITO_DOMAIN (or "
        "SIDECAR_TOKEN_URL), SIDECAR_CLIENT_ID and SIDECAR_CLIENT_SECRET(_FILE); the redirect URI must be listed "
        "on the app client byte for byte.",
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
    token = commands.add_parser(
        "token",
        help='print a currently valid token (for curl -H "Authorization: $(...)")',
        description="Print a currently valid token, and nothing else, on stdout: through the token store when "
        "SIDECAR_TOKEN_STORE names the fleet's, else with one token request. Uses the same SIDECAR_* settings as "
        "serve (SIDECAR_UPSTREAM_URL is not needed). Exits 1 with the token endpoint's answer explained if none "
        "could be had, 2 on configuration problems.",
    )
    token.add_argument("--type", choices=("id", "access"), default=None, help="default: SIDECAR_TOKEN")
    config = commands.add_parser(
        "config",
        help="print the settings this environment gives, and where each came from (secrets as [set])",
        description="Print the effective settings (SIDECAR_* variables, *_FILE files, SIDECAR_CONFIG) and where "
        "each value came from: environment, toml, file, inherited (a route's, from the top level), derived or "
        "default. Secrets are shown as [set] or [file: path], never their values. Exits 2 on configuration problems.",
    )
    config.add_argument("--json", action="store_true", help="as JSON, the same report /-/config serves")
    check = commands.add_parser(
        "check",
        help="check the configuration, the token endpoint and the token",
        description="Check the SIDECAR_* settings, the egress proxy and TLS files, that the token endpoint's host "
        "resolves and answers, and that a real refresh works (showing the token's claims, never the token); with "
        "--path, send one GET upstream and explain a 401 or 403. Prints PASS, WARN and FAIL lines; exits 0 when "
        "nothing failed, 1 when a check failed, 2 on configuration problems.",
    )
    check.add_argument("--path", default=None, help="also send one GET to this path upstream and explain the answer")
    return parser


# What ``demo`` and ``emulator`` say where the emulator is not installed (the production image).
NO_EMULATOR = (
    "the emulator is not in this installation: the production image leaves it out (it signs tokens for anyone).\n"
    "  For a dev stack: docker build --target emulator -t cognito-sidecar-emulator .  (the compose files build it)\n"
    "  Outside a container: pip install cognito-sidecar, then cognito-sidecar demo"
)


def _settings_help() -> str:
    from proxy.settings import settings_help

    return settings_help()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:  # no command: what there is to do (the image's default command is serve)
        parser.print_help()
        return 0
    keep_out_of_core_dumps()  # before any secret is read
    env: Mapping[str, str] = os.environ
    try:
        if args.command == "serve":
            from proxy.egress.tls import bundle_deferred

            with bundle_deferred():  # before anything imports it: see bundle_deferred
                import aiohttp  # noqa: F401
            from proxy.commands.serve import serve

            flags = {variable: getattr(args, flag[2:].replace("-", "_")) for flag, variable, _ in SERVE_FLAGS}
            return serve({**env, **{name: value for name, value in flags.items() if value is not None}})
        import uvloop

        # One-shot commands say what went wrong once, in their own words: the token cache's log lines would
        # repeat it (unless a log level is asked for).
        quiet = args.command in ("token", "check", "login")
        configure_logging(
            env.get("SIDECAR_LOG_LEVEL", "critical" if quiet else "warning"),
            "json" if env.get("SIDECAR_LOG_FORMAT", "").strip().lower() == "json" else "text",
        )
        if args.command in ("demo", "emulator"):
            try:
                from proxy.commands import demo as emulator
            except ModuleNotFoundError as exc:
                if exc.name != "proxy.emulator":
                    raise
                print(f"cognito-sidecar: {NO_EMULATOR}", file=sys.stderr)
                return EXIT_CONFIG
            if args.command == "emulator":
                return uvloop.run(emulator.emulator(args))
            return uvloop.run(emulator.demo(args.listen or env.get("SIDECAR_LISTEN", "127.0.0.1:8080")))
        if args.command == "login":
            from proxy.commands import login

            return uvloop.run(login.run(args, env))
        if args.command == "token":
            from proxy.commands import token

            return uvloop.run(token.run(args, env))
        if args.command == "config":
            from proxy.commands import config

            return config.run(args, env)
        from proxy.commands import check

        return uvloop.run(check.run(args, env))
    except ConfigError as exc:
        print(f"cognito-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TokenEndpointError as exc:  # a one-shot command's: said for a person, once
        print(f"cognito-sidecar: {exc.terminal()}", file=sys.stderr)
        return EXIT_FAILURE
    except SidecarError as exc:
        print(f"cognito-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
