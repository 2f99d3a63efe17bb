"""A real forward proxy of the tests' own: tinyproxy on an ephemeral loopback port, with Basic proxy authentication
and an allowlist when asked, and its log in hand so that a test can prove the traffic went through it.

tinyproxy comes from Debian's tinyproxy-bin package; ``scripts/check`` unpacks it into ``.cache/tinyproxy`` when it
is not installed (no service is started). Readiness is read from its log, not polled.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.redis_server import _free_port

READY = "Accepting connections"
START_LIMIT = 20.0
UNPACKED = Path(__file__).resolve().parent.parent / ".cache" / "tinyproxy" / "usr" / "bin" / "tinyproxy"


def tinyproxy_executable() -> str:
    found = shutil.which("tinyproxy") or (str(UNPACKED) if UNPACKED.is_file() else None)
    if found is None:
        raise RuntimeError(
            "tinyproxy is not installed: run scripts/check once (it unpacks Debian's tinyproxy-bin into .cache), "
            "or apt-get install tinyproxy-bin"
        )
    return found


class Tinyproxy:
    """``user``/``password``: Basic proxy authentication required; ``allow``: the only host names it connects to
    (fnmatch patterns; anything else gets 403)."""

    def __init__(
        self, *, user: str | None = None, password: str | None = None, allow: tuple[str, ...] | None = None
    ) -> None:
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="sidecar-tinyproxy-"))
        self.user = user
        self.password = password
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 200",
            "LogLevel Info",
            "DisableViaHeader Yes",
        ]
        if user is not None:
            lines.append(f"BasicAuth {user} {password}")
        if allow is not None:
            (self.directory / "allow").write_text("".join(f"{pattern}\n" for pattern in allow))
            lines += [f'Filter "{self.directory / "allow"}"', "FilterDefaultDeny Yes", "FilterType fnmatch"]
        (self.directory / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        self.log: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials when it has them."""
        userinfo = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def requests(self, verb: str = "") -> list[str]:
        """What clients asked of the proxy so far, e.g. ``CONNECT 127.0.0.1:4431 HTTP/1.1``."""
        marker = "Request (file descriptor"
        found = [line.split("): ", 1)[1].strip() for line in list(self.log) if marker in line]
        return [line for line in found if line.startswith(verb)]

    def start(self) -> None:
        command = [tinyproxy_executable(), "-d", "-c", str(self.directory / "tinyproxy.conf")]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_LIMIT
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("tinyproxy exited at start:\n" + "".join(self.log))
            self.log.append(line)
            if READY in line:
                self._reader = threading.Thread(target=self._read_log, daemon=True)
                self._reader.start()
                return
        raise RuntimeError("tinyproxy did not start in time:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)  # the pipe ends with the process
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def tinyproxy(
    *, user: str | None = None, password: str | None = None, allow: tuple[str, ...] | None = None
) -> Iterator[Tinyproxy]:
    proxy = Tinyproxy(user=user, password=password, allow=allow)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()


__all__ = ["Tinyproxy", "tinyproxy", "tinyproxy_executable"]
