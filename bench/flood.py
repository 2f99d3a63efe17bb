"""Memory a flood of pipelined requests costs the sidecar: RSS before, during and after.

    python bench/flood.py . ../before [--connections 1000] [--kib 255]

Each tree runs ``python -m proxy serve`` against the emulator (a process of its own) on free ports. Then
``--connections`` connections each send ``--kib`` KiB of pipelined ``GET /-/healthz`` in one write and never read;
one ordinary request is sent meanwhile and must be answered. Prints the process's RSS (VmRSS) before, with the
connections open, and after they closed, for each tree, and the growth against the first tree's. A benchmark,
not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

REQUEST = b"GET /-/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def flood(port: int, connections: int, kib: int, pid: int) -> tuple[float, int]:
    payload = REQUEST * (kib * 1024 // len(REQUEST))
    opened = []
    for _ in range(connections):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            break
        writer.write(payload)
        opened.append(writer)
    await asyncio.sleep(3)  # let the sidecar read and parse what it will
    during = rss_mib(pid)
    print(f"  open descriptors in the sidecar during the flood: {len(os.listdir(f'/proc/{pid}/fd'))}")
    async with httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        status = (await client.get(f"http://127.0.0.1:{port}/hello")).status_code
    for writer in opened:
        writer.transport.abort()
    return during, status


def run(tree: str, connections: int, kib: int) -> tuple[float, float, float, int]:
    """The emulator in a process of its own, and ``serve`` from ``tree`` pointed at it."""
    cognito, api, port = free_port(), free_port(), free_port()
    secrets = {"EMULATOR_CLIENT_SECRET": "flood-client-secret", "EMULATOR_REFRESH_TOKEN": "flood-refresh-token"}
    base = {**os.environ, "SIDECAR_LOG_LEVEL": "error", **secrets}
    emulator = subprocess.Popen(
        [sys.executable, "-m", "proxy", "emulator", "--cognito-port", str(cognito), "--api-port", str(api)],
        env=base,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert emulator.stdout is not None
    settings = dict(line.strip().split("=", 1) for line in (emulator.stdout.readline() for _ in range(3)))
    env = {
        **base,
        **settings,
        "PYTHONPATH": str(Path(tree).resolve()),
        "SIDECAR_CLIENT_SECRET": secrets["EMULATOR_CLIENT_SECRET"],
        "SIDECAR_REFRESH_TOKEN": secrets["EMULATOR_REFRESH_TOKEN"],
        "SIDECAR_LISTEN": f"127.0.0.1:{port}",
        "SIDECAR_LOG_LEVEL": "info",
        "SIDECAR_ACCESS_LOG": "0",
        "SIDECAR_SHUTDOWN_DELAY": "0",
    }
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve"], cwd=tree, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert sidecar.stderr is not None
        for line in sidecar.stderr:
            if "listening on" in line:
                break
        with httpx2.Client(trust_env=False, timeout=30) as client:  # the first token, before measuring
            client.get(f"http://127.0.0.1:{port}/warm-up")
        before = rss_mib(sidecar.pid)
        during, status = asyncio.run(flood(port, connections, kib, sidecar.pid))
        time.sleep(3)
        after = rss_mib(sidecar.pid)
        return before, during, after, status
    finally:
        for process in (sidecar, emulator):
            process.terminate()
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--kib", type=int, default=255)
    args = parser.parse_args()
    print(f"{args.connections} connections, {args.kib} KiB of pipelined GET /-/healthz each, never read")
    print(f"{'tree':<30} {'RSS before':>11} {'during':>9} {'after':>9} {'growth':>8}  other client")
    first = None
    for tree in args.trees:
        before, during, after, status = run(tree, args.connections, args.kib)
        growth = during - before
        first = growth if first is None else first
        ratio = f" ({growth / first:.2f} of the first)" if first else ""
        print(f"{tree:<30} {before:>8.1f} MiB {during:>5.1f} MiB {after:>5.1f} MiB {growth:>5.1f} MiB  {status}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
