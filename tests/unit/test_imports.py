"""What a plain ``serve`` loads: the app built from settings, in a fresh interpreter. Heavy modules that only some
setups need (a sealed store, a client certificate, the emulator, Redis) must not be paid for by every process."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from proxy.app import create_app
from proxy.settings import load_settings
create_app(load_settings({
    "SIDECAR_UPSTREAM_URL": "https://api.example.com/prod",
    "SIDECAR_TOKEN_URL": "https://auth.example.com/oauth2/token",
    "SIDECAR_CLIENT_ID": "client",
    "SIDECAR_REFRESH_TOKEN": "refresh",
}))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} | {m for m in sys.modules if m[:6] == "proxy."})))
"""

NEVER = (
    # Settings are validated by proxy.settings.schema: a validation library would cost ~9 MiB and a fifth of start-up.
    "pydantic",
    "cryptography",
    "jwt",
    "redis",
    "opentelemetry",
    "google",
    "proxy.emulator",
    "proxy.commands.demo",
    "proxy.commands.login",
    # The Prometheus exposition: imported at the first scrape of /-/metrics (tests/test_observability.py scrapes).
    "prometheus_client",
    "proxy.metrics",
)


def test_a_plain_serve_never_imports_what_only_some_setups_need():
    loaded = set(
        json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, check=True, timeout=60).stdout)
    )
    assert "aiohttp" in loaded and "proxy.forward" in loaded  # the probe built the real thing
    assert sorted(name for name in NEVER if name in loaded) == []


HELP_PROBE = """
import contextlib, io, json, sys
from proxy.entry import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_top_level_help_imports_neither_the_settings_nor_the_clients():
    loaded = set(
        json.loads(
            subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, check=True, timeout=60).stdout
        )
    )
    assert "argparse" in loaded  # the probe asked for the help
    assert (
        sorted(name for name in ("pydantic", "aiohttp", "httpx2", "uvicorn", "starlette", "uvloop") if name in loaded)
        == []
    )
