"""Footprint: memory and start-up of ``serve`` for each tree, beside the bare prototype and ``python -c pass``.

    python bench/footprint.py [TREE ...] [--runs 5] [--requests 200]

Not a test, and CI does not run it. For each tree (a checkout, or ``baseline``: the commit ``bench.BASELINE`` names;
by default ``baseline .``; settings may be appended as ``TREE@SIDECAR_X=1``), its package compiled to bytecode first
as an installation's is, against one emulator on loopback:
- exec to ``/-/readyz`` 200, a real token request included, and the CPU time the process used by then (medians of
  ``--runs`` fresh processes, the trees taking turns);
- RSS (VmRSS) of a ``serve`` process idle after ``--requests`` forwarded requests, and again after one scrape of
  ``/-/metrics`` (which imports prometheus-client);
- ``cognito-sidecar --help`` (the median of ``--runs``).
The bare prototype (``bench/bench.py's BARE``: a featureless ASGI callable over aiohttp under uvicorn) gets the same RSS
measurement, and ``python -c pass`` the same start-up one. Ratios are against the first tree (the baseline).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2

from bench import (  # bench/bench.py, beside this script
    BARE,
    bare_env,
    compile_tree,
    cpu_seconds,
    free_port,
    tree_env,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET, REFRESH, CLIENT = "bench-secret", "bench-rt", "bench"  # as bench.tree_env gives them


def _ready(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _until_ready(process: subprocess.Popen[bytes], port: int, path: str, limit: float = 30) -> float:
    """Seconds from now until ``path`` answers 200 (polled every 2 ms)."""
    start = time.monotonic()
    while not _ready(port, path):
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before it was ready")
        if time.monotonic() - start > limit:
            raise RuntimeError("not ready in time")
        time.sleep(0.002)
    return time.monotonic() - start


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _tree_env(tree: str, cognito: int, api: int, port: int) -> tuple[Path, dict[str, str]]:
    """``bench.tree_env`` against the emulator, with the access log off (nothing to measure it against here)."""
    return tree_env(
        f"{tree}@SIDECAR_ACCESS_LOG=0" if "@SIDECAR_ACCESS_LOG=" not in tree else tree,
        0,
        port,
        upstream_url=f"http://127.0.0.1:{api}/prod",
        token_url=f"http://127.0.0.1:{cognito}/oauth2/token",
    )


def _serve_once(tree: str, cognito: int, api: int) -> tuple[float, float]:
    """Seconds from exec to ready, and the CPU seconds the process used by then (less moved by a busy machine)."""
    port = free_port()
    cwd, env = _tree_env(tree, cognito, api, port)
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve"], cwd=cwd, env=env, stderr=subprocess.DEVNULL)
    try:
        return _until_ready(process, port, "/-/readyz"), cpu_seconds([process.pid])
    finally:
        process.terminate()
        process.wait(30)


def _rss_after(
    command: list[str], cwd: Path, env: dict[str, str], port: int, path: str, requests: int
) -> tuple[float, float | None]:
    """VmRSS after ``requests`` forwarded requests, and after a scrape of ``/-/metrics`` then (None: no such route)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until_ready(process, port, path)
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(requests):
                client.get("/hello").raise_for_status()
            time.sleep(0.5)  # let the last answers' buffers go before reading VmRSS
            served = _rss_mib(process.pid)
            if client.get("/-/metrics").status_code != 200:
                return served, None
        time.sleep(0.5)
        return served, _rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def _median_seconds(command: list[str], cwd: Path, env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", default=["baseline", "."], help="checkouts, or 'baseline'")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    cognito, api = free_port(), free_port()
    command = [sys.executable, "-m", "proxy", "emulator", "--cognito-port", str(cognito), "--api-port", str(api)]
    command += ["--client-id", CLIENT, "--token-lifetime", "86400"]
    env = {**os.environ, "EMULATOR_CLIENT_SECRET": SECRET, "EMULATOR_REFRESH_TOKEN": REFRESH}
    emulator = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_port(cognito)
        wait_port(api)
        for tree in args.trees:
            compile_tree(_tree_env(tree, cognito, api, 0)[0])
        # Start-ups alternate between the trees, so that a noisy stretch of the machine's time hits them alike.
        starts: dict[str, list[tuple[float, float]]] = {tree: [] for tree in args.trees}
        for _ in range(args.runs):
            for tree in args.trees:
                starts[tree].append(_serve_once(tree, cognito, api))
        rows = []
        for tree in args.trees:
            port = free_port()
            cwd, tree_env = _tree_env(tree, cognito, api, port)
            ready = statistics.median(wall for wall, _ in starts[tree])
            cpu = statistics.median(used for _, used in starts[tree])
            rss, scraped = _rss_after(
                [sys.executable, "-m", "proxy", "serve"], cwd, tree_env, port, "/-/readyz", args.requests
            )
            helped = _median_seconds([sys.executable, "-m", "proxy", "--help"], cwd, tree_env, args.runs)
            rows.append((tree, ready, cpu, rss, scraped, helped))
        token = httpx2.post(
            f"http://127.0.0.1:{cognito}/oauth2/token",
            auth=(CLIENT, SECRET),
            data={"grant_type": "refresh_token", "refresh_token": REFRESH, "client_id": CLIENT},
        ).json()["id_token"]
        port = free_port()
        bare = bare_env(f"http://127.0.0.1:{api}/prod", token, port)
        bare_rss, _ = _rss_after([sys.executable, "-c", BARE], ROOT, bare, port, "/hello", args.requests)
        python = _median_seconds([sys.executable, "-c", "pass"], ROOT, dict(os.environ), args.runs)
    finally:
        emulator.terminate()
        emulator.wait(30)
    first = rows[0]
    print(
        f"{'tree':<40} {'exec to ready':>14} {'CPU by then':>12} {'RSS MiB':>8} {'scraped':>8} {'--help':>8}"
        f"  vs {first[0]}"
    )
    for tree, ready, cpu, rss, scraped, helped in rows:
        ratio = (
            f"ready {ready / first[1]:.2f}x, CPU {cpu / first[2]:.2f}x, RSS {rss / first[3]:.2f}x, "
            f"help {helped / first[5]:.2f}x"
        )
        shown = f"{scraped:>8.1f}" if scraped is not None else f"{'-':>8}"
        print(f"{tree:<40} {ready:>12.3f} s {cpu:>10.2f} s {rss:>8.1f} {shown} {helped:>6.3f} s  {ratio}")
    print(f"{'bare prototype (bench.py BARE)':<40} {'':>14} {'':>12} {bare_rss:>8.1f}")
    print(f"{'python -c pass':<40} {python:>12.3f} s")
    print("targets: exec to ready under 0.5 s, RSS under 45 MiB, --help under 0.3 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
