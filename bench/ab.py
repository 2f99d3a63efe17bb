"""A/B: sidecars built from several source trees, measured in alternating wrk runs in one go.

    python bench/ab.py                      # the baseline (bench.py's BASELINE) against this checkout
    git worktree add /tmp/before HEAD~1
    python bench/ab.py baseline /tmp/before . [bare] [--rounds 10] [--duration 2] [--connections 32]
    python bench/ab.py . .@SIDECAR_LOG_FORMAT=json .@SIDECAR_ACCESS_LOG=0   # settings compared on one tree
    python bench/ab.py . .@SIDECAR_EGRESS_PROXY=tinyproxy   # direct against through a forward proxy (tinyproxy)

Each tree (a checkout of this repository, with ``@NAME=VALUE`` settings appended if any; ``baseline`` is the
commit named by ``bench.BASELINE``, and the default is ``baseline .``; ``bare`` is the prototype from
``bench/bench.py``) runs as its own sidecar on CPU 0, against one nginx upstream on CPU 1 that answers 401 unless
the token was injected. wrk (CPU 1) alternates between them, in rotating order, so a noisy machine hits every tree
alike; the medians and best values are printed, with write/read system calls per
request from ``/proc/PID/io``.
Not a test (pytest does not collect it); needs wrk, nginx and taskset, like ``bench/bench.py``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import (
    BARE,
    bare_env,
    children,
    cpu_seconds,
    egress_proxy,
    ensure_tools,
    free_port,
    stop_all,
    token_upstream,
    tree_env,
    wait_port,
    wrk,
)

ROOT = Path(__file__).resolve().parent.parent


def syscalls(pids: list[int]) -> tuple[int, int]:
    """(write, read) system calls of ``pids`` so far."""
    writes = reads = 0
    for pid in pids:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        writes, reads = writes + int(fields["syscw"]), reads + int(fields["syscr"])
    return writes, reads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "trees",
        nargs="*",
        default=["baseline", "."],
        help="source trees (checkouts of this repository, each with @NAME=VALUE settings), 'baseline' or 'bare'",
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--cpus", default="0", help="CPUs the sidecars run on (0,1 for SIDECAR_WORKERS=2: wrk and nginx share CPU 1)"
    )
    args = parser.parse_args()
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="sidecar-ab-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up, token = token_upstream(work, procs)
        targets: list[tuple[str, subprocess.Popen[bytes], int]] = []
        proxy_port = egress_proxy(work, procs) if any("=tinyproxy" in tree for tree in args.trees) else None
        for tree in args.trees:
            port = free_port()
            if tree == "bare":
                env = bare_env(f"http://127.0.0.1:{up}", token, port)
                command, cwd = [sys.executable, "-c", BARE], work
            else:
                cwd, env = tree_env(tree, up, port)
                if env.get("SIDECAR_EGRESS_PROXY") == "tinyproxy":
                    env["SIDECAR_EGRESS_PROXY"] = f"http://127.0.0.1:{proxy_port}"
                command = [sys.executable, "-m", "proxy", "serve"]
            proc = subprocess.Popen(
                ["taskset", "-c", args.cpus, *command],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            wait_port(port)
            targets.append((tree, proc, port))
        results: dict[str, list[dict[str, float]]] = {tree: [] for tree, _, _ in targets}
        # Non-2xx answers and socket errors, and requests wrk gave up on after 2 s: printed, and the exit status.
        failed = dict.fromkeys(results, 0)
        timeouts = dict.fromkeys(results, 0)
        for rnd in range(args.rounds):
            for tree, proc, port in targets[rnd % len(targets) :] + targets[: rnd % len(targets)]:
                pids = [proc.pid, *children(proc.pid)]  # with SIDECAR_WORKERS, the workers serve
                cpu0, (w0, r0) = cpu_seconds(pids), syscalls(pids)
                run = wrk(f"http://127.0.0.1:{port}/item", args.connections, args.duration)
                failed[tree] += int(run["failed"])
                timeouts[tree] += int(run["timeouts"])
                w1, r1 = syscalls(pids)
                run["cpu_us"] = (cpu_seconds(pids) - cpu0) / run["requests"] * 1e6
                run["writes"], run["reads"] = (w1 - w0) / run["requests"], (r1 - r0) / run["requests"]
                results[tree].append(run)
        print(f"{args.rounds} alternating {args.duration} s runs at {args.connections} connections:")
        for tree, runs in results.items():

            def median(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(run[key] for run in runs)

            print(
                f"{tree:30} req/s median {median('rps'):7,.0f} best {max(r['rps'] for r in runs):7,.0f}   "
                f"CPU us/req median {median('cpu_us'):6.1f} best {min(r['cpu_us'] for r in runs):6.1f}   "
                f"p50 {median('p50'):.2f} ms p99 {median('p99'):.1f} ms   "
                f"syscalls/req write {median('writes'):.2f} read {median('reads'):.2f}"
                + (f"   FAILED {failed[tree]} requests" if failed[tree] else "")
                + (f"   TIMED OUT {timeouts[tree]} requests (over 2 s)" if timeouts[tree] else "")
            )
        return 1 if any(failed.values()) or any(timeouts.values()) else 0
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    sys.exit(main())
