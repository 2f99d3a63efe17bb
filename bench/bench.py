"""Benchmark: the sidecar against direct requests and nginx doing the same job, in one run.

    python bench/bench.py [--duration 10] [--rounds 2] [--gib 1] [--stream-rounds 3] [--streaming-only] [--no-baseline]

Not a test (pytest does not collect it) and CI does not run it. Needs Linux with 2 cores, and wrk and
nginx (installed with apt-get when missing and running as root). It starts, on loopback:
- an upstream nginx on CPU 1 answering a ~200-byte JSON body, and 401 unless the exact token is present
  (so every 200 proves the header was injected); it also serves the token endpoint (a real emulator
  token, fetched once) and counts the token requests in its log;
- nginx as a reverse proxy on CPU 0 (proxy_set_header Authorization, upstream keepalive): the reference;
- the sidecar on CPU 0, one uvicorn worker, default settings (access log on);
- with ``--workers 2`` (the default), also the sidecar with SIDECAR_WORKERS=2 on CPUs 0 and 1 (so sharing CPU 1
  with wrk and the upstream): what a second worker buys on this machine;
- "bare": the featureless prototype the first issue measured (ASGI callable over aiohttp), on CPU 0;
- "baseline": the sidecar of the commit ``BASELINE`` names (extracted once into ``.cache/bench/``), on CPU 0, so that
  the drift since that fixed point is printed from the same rounds (``--no-baseline`` skips it);
- for the upload, a receiver on CPU 1 that counts the body bytes and drops them, and a sidecar pointed at it.
wrk and curl run on CPU 1. Rounds rotate the order of direct, nginx, bare, sidecar and baseline. It prints one table,
exits 1 if any request failed or a figure misses its target, and prints the figures either way.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
# The fixed point every performance figure is compared against (docs/performance.md): the hot path before the
# security, observability and fleet work. Named here and nowhere else; ``baseline`` in a list of trees is this commit.
BASELINE = "bd51c89"
# What the baseline imports that this checkout no longer installs.
BASELINE_NEEDS = ("stamina", "pydantic", "cachetools")
BODY = json.dumps(
    {
        "id": 7,
        "name": "widget",
        "tags": ["a", "b", "c"],
        "price": 12.5,
        "stock": 42,
        "description": "a fixed answer of about two hundred bytes, like a small API response",
        "ok": True,
    }
)
TARGETS = {
    "rps32": 7000.0,
    "nginx_share32": 0.12,
    "cpu_us32": 150.0,
    "p99_ms32": 20.0,
    "p50_extra_ms1": 0.4,
    "download_mbs": 1000.0,
    "upload_mbs": 600.0,
    "rss_growth_mib": 10.0,
    "cold_token_requests": 1,
    "steady_token_requests": 1,
}


# The "bare" baseline: the throwaway prototype the first issue measured, a featureless ASGI callable over
# aiohttp under uvicorn (uvloop, httptools). The sidecar should cost about the same while carrying its features.
BARE = """
import os, aiohttp, uvicorn
from yarl import URL
UP, TOKEN = os.environ["BARE_UPSTREAM"], os.environ["BARE_TOKEN"]
HOP = {b"connection", b"transfer-encoding", b"keep-alive"}
session = None
async def app(scope, receive, send):
    global session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                session = aiohttp.ClientSession(auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            else:
                await session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in (b"host", b"connection")]
    headers.append(("authorization", TOKEN))
    url = URL(UP + scope["raw_path"].decode(), encoded=True)
    response = await session.request(scope["method"], url, headers=headers)
    try:
        out = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP]
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        response.release()
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["BARE_PORT"]), loop="uvloop", http="httptools",
            access_log=False, server_header=False, date_header=False, log_level="warning")
"""


def bare_env(upstream_url: str, token: str, port: int) -> dict[str, str]:
    """The environment that runs ``BARE`` on ``port``, forwarding to ``upstream_url`` with ``token``."""
    return {**os.environ, "BARE_UPSTREAM": upstream_url, "BARE_TOKEN": token, "BARE_PORT": str(port)}


# The upload receiver, on CPU 1: counts the de-chunked body bytes of each request (httptools, as uvicorn
# uses) and throws them away. nginx storing 1 GiB in /dev/shm was the bottleneck instead of the proxy: CPU 1
# ran at 100% while the sidecar idled at 45%.
SINK = """
import sys, asyncio, httptools, uvloop
port, out = int(sys.argv[1]), sys.argv[2]
class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser, self.size, self.expect = transport, httptools.HttpRequestParser(self), 0, False
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_begin(self):
        self.size, self.expect = 0, False
    def on_header(self, name, value):
        self.expect = self.expect or (name.lower() == b"expect" and value.lower() == b"100-continue")
    def on_headers_complete(self):
        if self.expect:  # curl waits a second for this before a large upload
            self.transport.write(b"HTTP/1.1 100 Continue\\r\\n\\r\\n")
    def on_body(self, body):
        self.size += len(body)
    def on_message_complete(self):
        with open(out, "w") as f:
            f.write(str(self.size))
        self.transport.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n{}")
        if not self.parser.should_keep_alive():
            self.transport.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", port)
    await server.serve_forever()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_tools() -> None:
    missing = [
        tool
        for tool in ("wrk", "nginx", "taskset", "curl")
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk", "nginx-light", "curl"],
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    for tool in ("wrk", "taskset", "curl"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is required (apt-get install wrk nginx-light curl util-linux)")


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def stop_all(procs: list[subprocess.Popen[bytes]], work: Path) -> None:
    """SIGTERM every process still running (SIGKILL after 10 s), then remove the work directory."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(work, ignore_errors=True)


def emulator_token(procs: list[subprocess.Popen[bytes]]) -> str:
    """A real token answer (JSON) from the emulator for client ``bench``, valid 24 h; the emulator joins ``procs``."""
    cognito_port, api_port = free_port(), free_port()
    command = [sys.executable, "-m", "proxy", "emulator", "--cognito-port", str(cognito_port), "--api-port"]
    command += [str(api_port), "--client-id", "bench", "--token-lifetime", "86400"]
    # Secrets by environment, never argv (ps shows argv to every user).
    env = {**os.environ, "EMULATOR_CLIENT_SECRET": "bench-secret", "EMULATOR_REFRESH_TOKEN": "bench-rt"}
    procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=ROOT, env=env))
    wait_port(cognito_port)
    answer = httpx2.post(
        f"http://127.0.0.1:{cognito_port}/oauth2/token",
        auth=("bench", "bench-secret"),
        data={"grant_type": "refresh_token", "refresh_token": "bench-rt", "client_id": "bench"},
    )
    answer.raise_for_status()
    return answer.text


def start_nginx(workdir: Path, name: str, cpu: int, server_block: str) -> subprocess.Popen[bytes]:
    conf = workdir / f"{name}.conf"
    (workdir / name).mkdir(exist_ok=True)
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/{name};
  proxy_temp_path {workdir}/{name};
  fastcgi_temp_path {workdir}/{name};
  uwsgi_temp_path {workdir}/{name};
  scgi_temp_path {workdir}/{name};
  keepalive_requests 1000000;
  sendfile on;
  {server_block}
}}
""")
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), nginx_bin(), "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL
    )


def token_upstream(work: Path, procs: list[subprocess.Popen[bytes]]) -> tuple[int, str]:
    """An nginx on CPU 1 serving a real emulator token at /oauth2/token and, elsewhere, a ~200-byte answer only
    to requests that carry that token (401 otherwise); its port and the token. Both join ``procs``."""
    token_json = emulator_token(procs)
    token = json.loads(token_json)["id_token"]
    port = free_port()
    server = f"""
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location = /oauth2/token {{ return 200 '{token_json}'; }}
    location / {{
      if ($http_authorization != "{token}") {{ return 401 '{{"message":"Unauthorized"}}'; }}
      return 200 '{{"a":"{"x" * 180}"}}';
    }}
  }}"""
    procs.append(start_nginx(work, "upstream", 1, server))
    wait_port(port)
    return port, token


def baseline_tree() -> Path:
    """The ``BASELINE`` commit's files, extracted once (``git archive``) into ``.cache/bench/`` with their bytecode.
    Exits with what to do when the commit is not in this clone or the baseline's own dependencies are missing."""
    tree = ROOT / ".cache" / "bench" / f"baseline-{BASELINE}"
    missing = [name for name in BASELINE_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        names = " ".join(missing)
        sys.exit(f"bench: the baseline ({BASELINE}) imports {names}, which this environment lacks: pip install {names}")
    if tree.is_dir():
        return tree
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"], check=False).returncode:
        sys.exit(
            f"bench: commit {BASELINE} (the baseline) is not in this clone: fetch the history (git fetch --unshallow)"
        )
    tree.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"baseline-{BASELINE}-", dir=tree.parent))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
    compile_tree(partial)
    partial.chmod(0o755)
    partial.rename(tree)  # whole or not at all: an interrupted extraction leaves only a temporary directory
    return tree


def tree_path(name: str) -> Path:
    """A tree named on a benchmark's command line: ``baseline`` (``baseline_tree``) or a checkout's directory."""
    return baseline_tree() if name == "baseline" else Path(name).resolve()


def compile_tree(tree: Path) -> None:
    """Compile ``tree``'s package to bytecode, as an installation does (pip, the image): a start-up measured
    without it would time the compiler (with PYTHONDONTWRITEBYTECODE set, every start compiles every module)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "proxy")], check=True, stdout=subprocess.DEVNULL
    )


def tree_env(
    tree: str, upstream: int, port: int, *, upstream_url: str | None = None, token_url: str | None = None
) -> tuple[Path, dict[str, str]]:
    """For ``TREE[@NAME=VALUE...]`` (``baseline`` names ``BASELINE``): the tree's directory, and the environment that
    runs its sidecar on ``port`` against ``upstream`` (``token_upstream``; or ``upstream_url`` and ``token_url``),
    with the settings appended to the tree applied."""
    path, *settings = tree.split("@")
    cwd = tree_path(path)
    return cwd, {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "PYTHONPATH": str(cwd),
        "SIDECAR_UPSTREAM_URL": upstream_url or f"http://127.0.0.1:{upstream}",
        "SIDECAR_TOKEN_URL": token_url or f"http://127.0.0.1:{upstream}/oauth2/token",
        "SIDECAR_CLIENT_ID": "bench",
        "SIDECAR_CLIENT_SECRET": "bench-secret",
        "SIDECAR_REFRESH_TOKEN": "bench-rt",
        "SIDECAR_LISTEN": f"127.0.0.1:{port}",
        **dict(setting.split("=", 1) for setting in settings),
    }


def egress_proxy(work: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    """A tinyproxy forward proxy on CPU 1 (scripts/check unpacks it into .cache when it is not installed); its port.
    ``ab.py TREE@SIDECAR_EGRESS_PROXY=tinyproxy`` sends that sidecar's traffic through it."""
    executable = shutil.which("tinyproxy") or str(ROOT / ".cache" / "tinyproxy" / "usr" / "bin" / "tinyproxy")
    if not Path(executable).exists():
        sys.exit("bench: tinyproxy is required (run scripts/check once, or apt-get install tinyproxy-bin)")
    port = free_port()
    config = work / "tinyproxy.conf"
    config.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 1024\nLogLevel Error\n")
    procs.append(
        subprocess.Popen(["taskset", "-c", "1", executable, "-d", "-c", str(config)], stdout=subprocess.DEVNULL)
    )
    wait_port(port)
    return port


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"bench: nothing listens on {port}")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def wrk(url: str, connections: int, duration: int, token: str | None = None) -> dict[str, float]:
    """wrk on CPU 1; with ``token``, wrk itself sends the Authorization header (the direct baseline)."""
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    script: Path | None = None
    if token is not None:
        fd, name = tempfile.mkstemp(suffix=".lua")
        os.close(fd)
        script = Path(name)
        script.write_text(f'wrk.headers["Authorization"] = "{token}"\n')
        command += ["-s", str(script)]
    try:
        out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    finally:
        if script is not None:
            script.unlink()
    return _parse(out)


def received_bytes(count: Path) -> int:
    """Body bytes the receiver counted for the last upload (then the count is reset)."""
    size = int(count.read_text() or 0) if count.exists() else 0
    count.write_text("")
    return size


def download(url: str, size: int) -> tuple[float, int]:
    """MB/s and bytes received for one GET of ``url`` by curl on CPU 1."""
    start = time.monotonic()
    out = subprocess.run(
        ["taskset", "-c", "1", "curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return size / (time.monotonic() - start) / 1e6, int(out.strip() or 0)


def upload(url: str, source: Path) -> float:
    """MB/s for one chunked upload of ``source`` (a cached file) by curl on CPU 1; the receiver counts it."""
    start = time.monotonic()
    command = ["taskset", "-c", "1", "curl", "-s", "-o", "/dev/null", "-T", str(source)]
    subprocess.run([*command, "-H", "Transfer-Encoding: chunked", url], check=False)
    return source.stat().st_size / (time.monotonic() - start) / 1e6


async def cold_start(url: str, n: int) -> int:
    limits = httpx2.Limits(max_connections=n)
    async with httpx2.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:
        answers = await asyncio.gather(*(client.get(f"{url}/cold/{i}") for i in range(n)), return_exceptions=True)
    return sum(1 for a in answers if not isinstance(a, httpx2.Response) or a.status_code != 200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the upload and download, GiB")
    parser.add_argument("--streaming-only", action="store_true", help="skip the request-rate rounds")
    parser.add_argument("--stream-rounds", type=int, default=3, help="transfers each way per target; the best counts")
    parser.add_argument("--workers", type=int, default=2, help="also measure SIDECAR_WORKERS=N on CPUs 0,1 (1: skip)")
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help=f"skip the baseline ({BASELINE}) in the rounds"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    failures: list[str] = []
    try:
        # 1. A real token from the emulator, fetched once.
        token_json = emulator_token(procs)
        token = json.loads(token_json)["id_token"]

        # 2. The upstream (and token endpoint) nginx on CPU 1, the reference proxy nginx on CPU 0.
        blob = work / "blob"
        with open(blob, "wb") as f:
            f.truncate(int(args.gib * 1024**3))
        # nginx workers run as an unprivileged user: let them read the blob.
        work.chmod(0o755)
        blob.chmod(0o644)
        up, ref, side = free_port(), free_port(), free_port()
        token_log = work / "token.log"
        procs.append(
            start_nginx(
                work,
                "upstream",
                1,
                f"""
  server {{
    listen 127.0.0.1:{up} backlog=4096;
    default_type application/json;
    location = /oauth2/token {{ access_log {token_log}; return 200 '{token_json}'; }}
    location = /blob {{ alias {blob}; }}
    location / {{
      if ($http_authorization != "{token}") {{ return 401 '{{"message":"Unauthorized"}}'; }}
      return 200 '{BODY}';
    }}
  }}""",
            )
        )
        procs.append(
            start_nginx(
                work,
                "reference",
                0,
                f"""
  upstream up {{ server 127.0.0.1:{up}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{ref} backlog=4096;
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Authorization "{token}"; proxy_buffering off;
    }}
  }}""",
            )
        )
        wait_port(up)
        wait_port(ref)

        # 3. The sidecar on CPU 0, default settings, but no body limit: the 1 GiB transfers measure streaming
        # (API Gateway itself takes 10 MB at most, the default SIDECAR_MAX_BODY_BYTES).
        def start_sidecar(
            upstream: int = up, *, port: int = side, workers: int = 1, cpus: str = "0", tree: str = str(ROOT)
        ) -> subprocess.Popen[bytes]:
            # The baseline knows neither setting.
            settings = "" if tree == "baseline" else f"@SIDECAR_MAX_BODY_BYTES=0@SIDECAR_WORKERS={workers}"
            cwd, env = tree_env(tree + settings, up, port, upstream_url=f"http://127.0.0.1:{upstream}")
            with open(work / "sidecar.log", "ab") as log:
                proc = subprocess.Popen(
                    ["taskset", "-c", cpus, sys.executable, "-m", "proxy", "serve"],
                    env=env,
                    stderr=log,
                    stdout=log,
                    cwd=cwd,
                )
            wait_port(port)
            return proc

        ref_pids = children(procs[-1].pid) or [procs[-1].pid]
        bare_port = free_port()
        bare = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-c", BARE], env=bare_env(f"http://127.0.0.1:{up}", token, bare_port)
        )
        procs.append(bare)
        wait_port(bare_port)
        extra: dict[str, tuple[str, list[int]]] = {}
        if args.workers > 1:
            # SIDECAR_WORKERS on both cores: CPU 1 is shared with wrk and the upstream nginx, so this says what a
            # second worker buys on this 2-core machine, not what it would on an idle one. Started (and its one
            # token fetched) before the token log is emptied: the steady count is the one-worker sidecar's.
            pair_port = free_port()
            pair = start_sidecar(port=pair_port, workers=args.workers, cpus="0,1")
            procs.append(pair)
            if httpx2.get(f"http://127.0.0.1:{pair_port}/warm-up").status_code != 200:
                failures.append("warm-up request through the workers sidecar failed")
            extra[f"{args.workers}workers"] = (f"http://127.0.0.1:{pair_port}/item", children(pair.pid))
        if args.baseline:
            # The fixed point (BASELINE), started before the token log is emptied like the workers sidecar.
            base_port = free_port()
            base = start_sidecar(port=base_port, tree="baseline")
            procs.append(base)
            if httpx2.get(f"http://127.0.0.1:{base_port}/warm-up").status_code != 200:  # its token, before the count
                failures.append("warm-up request through the baseline sidecar failed")
            extra["baseline"] = (f"http://127.0.0.1:{base_port}/item", [base.pid])
        token_log.write_text("")
        sidecar = start_sidecar()
        procs.append(sidecar)
        targets = {
            "direct": (f"http://127.0.0.1:{up}/item", []),
            "nginx": (f"http://127.0.0.1:{ref}/item", ref_pids),
            "bare": (f"http://127.0.0.1:{bare_port}/item", [bare.pid]),
            "sidecar": (f"http://127.0.0.1:{side}/item", [sidecar.pid]),
            **extra,
        }
        for url, _ in targets.values():
            if httpx2.get(url, headers={"Authorization": token} if f":{up}/" in url else {}).status_code != 200:
                failures.append(f"warm-up request to {url} failed")
        rows: dict[tuple[str, int], list[dict[str, float]]] = {}
        order = list(targets)
        for rnd in range(0 if args.streaming_only else args.rounds):
            for conns in (1, 32, 256):
                for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
                    url, pids = targets[name]
                    cpu0 = cpu_seconds(pids) if pids else 0.0
                    result = wrk(url, conns, args.duration, token if name == "direct" else None)
                    result["cpu_us"] = (cpu_seconds(pids) - cpu0) / max(result["requests"], 1) * 1e6 if pids else 0.0
                    result["rss_mib"] = status_kib(pids[0], "VmRSS") / 1024 if pids else 0.0
                    rows.setdefault((name, conns), []).append(result)
                    if result["failed"]:
                        failures.append(f"{name} at {conns} connections: {int(result['failed'])} failed requests")
                    if result["timeouts"]:
                        failures.append(
                            f"{name} at {conns} connections: {int(result['timeouts'])} requests unanswered within "
                            "wrk's 2 s timeout (the latency tail, not error answers)"
                        )

        def best(name: str, conns: int, key: str) -> float:
            values = [r[key] for r in rows.get((name, conns), [])]
            if not values:
                return float("nan")
            return max(values) if key == "rps" else min(values)

        # The emulator's token lives 24 h: the whole run is within one lifetime, so one token request in all.
        steady_tokens = len(token_log.read_text().splitlines())
        columns = ("conns", "req/s", "p50 ms", "p99 ms", "CPU us/req", "RSS MiB", "vs nginx")
        if not args.streaming_only:
            print(f"\n{'target':8} " + " ".join(f"{c:>10}" for c in columns))
        for conns in () if args.streaming_only else (1, 32, 256):
            for name in order:
                rps = best(name, conns, "rps")
                ratio = rps / best("nginx", conns, "rps")
                cells = (
                    f"{conns}",
                    f"{rps:.0f}",
                    f"{best(name, conns, 'p50'):.2f}",
                    f"{best(name, conns, 'p99'):.2f}",
                    f"{best(name, conns, 'cpu_us'):.1f}",
                    f"{best(name, conns, 'rss_mib'):.1f}",
                    f"{ratio:.3f}",
                )
                print(f"{name:8.8} " + " ".join(f"{c:>10}" for c in cells))
        if not args.streaming_only:
            shares = ", ".join(
                f"{conns} conns {best('sidecar', conns, 'rps') / best('bare', conns, 'rps'):.2f}"
                for conns in (1, 32, 256)
            )
            print(f"sidecar/bare prototype, requests/s in the same rounds: {shares}")
            if args.baseline:
                drift = ", ".join(
                    f"{conns} conns req/s {best('sidecar', conns, 'rps') / best('baseline', conns, 'rps'):.2f}x "
                    f"CPU/req {best('sidecar', conns, 'cpu_us') / best('baseline', conns, 'cpu_us'):.2f}x"
                    for conns in (1, 32, 256)
                )
                print(f"sidecar against the baseline ({BASELINE}) in the same rounds: {drift}")
            print(f"token requests by the sidecar over all rounds (one token lifetime): {steady_tokens}")

        # 4. Streaming: 1 GiB down (from nginx) and up (to the counting receiver), direct (the baseline) and
        # through the sidecar; for the upload, a fresh sidecar points at the receiver.
        size = blob.stat().st_size
        with open(blob, "rb") as warm:  # a sparse file's first read is slow: do it outside the timings
            while warm.read(1 << 24):
                pass
        sink_port, sink_count = free_port(), work / "sink.count"
        procs.append(
            subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", SINK, str(sink_port), str(sink_count)])
        )
        wait_port(sink_port)
        print()
        speeds: dict[str, float] = {}
        growth: dict[str, float] = {}

        def stream(label: str, direction: str, once: Callable[[], tuple[float, int]]) -> None:
            """``args.stream_rounds`` transfers; the best speed counts (like the best request-rate round)."""
            runs = [once() for _ in range(args.stream_rounds)]
            speeds[f"{label}_{direction}"] = best_mbs = max(mbs for mbs, _ in runs)
            arrived = [count for _, count in runs]
            listed = ", ".join(f"{mbs:,.0f}" for mbs, _ in runs)
            print(
                f"{label:8} {direction:8} {size / 2**30:.2f} GiB: best {best_mbs:,.0f} MB/s ({listed}); bytes arrived: "
                f"{'all, every time' if set(arrived) == {size} else arrived}"
            )
            if set(arrived) != {size}:
                failures.append(f"{label} {direction}: bytes went missing")

        hwm0 = status_kib(sidecar.pid, "VmHWM")
        for label, base in (("direct", f"http://127.0.0.1:{up}"), ("sidecar", f"http://127.0.0.1:{side}")):
            stream(label, "download", lambda base=base: download(f"{base}/blob", size))
        growth["download"] = (status_kib(sidecar.pid, "VmHWM") - hwm0) / 1024
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(30)
        sidecar = start_sidecar(upstream=sink_port)
        procs.append(sidecar)
        if httpx2.get(f"http://127.0.0.1:{side}/warm-up").status_code != 200:
            failures.append("warm-up request through the upload sidecar failed")
        hwm0 = status_kib(sidecar.pid, "VmHWM")
        for label, base in (("direct", f"http://127.0.0.1:{sink_port}"), ("sidecar", f"http://127.0.0.1:{side}")):

            def upload_once(base: str = base) -> tuple[float, int]:
                mbs = upload(f"{base}/upload", blob)
                return mbs, received_bytes(sink_count)

            stream(label, "upload", upload_once)
        growth["upload"] = (status_kib(sidecar.pid, "VmHWM") - hwm0) / 1024
        down_mbs, up_mbs = (speeds["sidecar_download"], speeds["sidecar_upload"])
        down_ratio, up_ratio = down_mbs / speeds["direct_download"], up_mbs / speeds["direct_upload"]
        print(f"sidecar/direct: download {down_ratio:.2f}, upload {up_ratio:.2f}")
        print(f"sidecar peak RSS growth: download {growth['download']:.1f} MiB, upload {growth['upload']:.1f} MiB")

        # 5. Cold start: a fresh sidecar, 1,000 concurrent requests.
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(30)
        token_log.write_text("")
        sidecar = start_sidecar()
        procs.append(sidecar)
        cold_failed = asyncio.run(cold_start(f"http://127.0.0.1:{side}", 1000))
        cold_tokens = len(token_log.read_text().splitlines())
        print(f"cold start, 1,000 concurrent requests: {cold_failed} failed, {cold_tokens} token request(s)")
        if cold_failed:
            failures.append(f"{cold_failed} cold-start requests failed")

        checks: dict[str, tuple[float, str]] = (
            {}
            if args.streaming_only
            else {
                "rps32": (best("sidecar", 32, "rps"), ">="),
                "nginx_share32": (best("sidecar", 32, "rps") / best("nginx", 32, "rps"), ">="),
                "cpu_us32": (best("sidecar", 32, "cpu_us"), "<="),
                "p99_ms32": (best("sidecar", 32, "p99"), "<="),
                "p50_extra_ms1": (best("sidecar", 1, "p50") - best("direct", 1, "p50"), "<="),
                "steady_token_requests": (steady_tokens, "=="),
            }
        )
        checks |= {
            "download_mbs": (down_mbs, ">="),
            "upload_mbs": (up_mbs, ">="),
            "rss_growth_mib": (max(growth.values()), "<="),
            "cold_token_requests": (cold_tokens, "=="),
        }
        print("\ntarget check:")
        for key, (value, op) in checks.items():
            target = TARGETS[key]
            ok = value >= target if op == ">=" else value <= target if op == "<=" else value == target
            print(f"  {key:21} {value:>10.3f} {op} {target:<8} {'ok' if ok else 'MISSED'}")
            if not ok:
                failures.append(f"{key} missed its target")
    finally:
        stop_all(procs, work)
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    return 0


def _parse(out: str) -> dict[str, float]:
    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(group) for group in errors.groups()) if errors else (0, 0, 0, 0)
    # Failed: an error answer or a broken connection. Timed out: no answer within wrk's 2 s, a latency tail (wrk
    # reports the request neither as answered nor as an error; at 256 connections on one core a few can wait this
    # long while the connections open).
    failed = (int(non2xx.group(1)) if non2xx else 0) + connect + read + write
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "requests": requests, "failed": failed, "timeouts": timeout}


if __name__ == "__main__":
    sys.exit(main())
