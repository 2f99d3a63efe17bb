"""Instructions per forwarded request, counted by callgrind: a cost figure that a noisy machine cannot move.

    python bench/cost.py                      # the baseline (bench.py's BASELINE) against this checkout
    git worktree add /tmp/before HEAD~1
    python bench/cost.py baseline /tmp/before . .@SIDECAR_LOG_FORMAT=json .@SIDECAR_ACCESS_LOG=0 [--requests 1000]
    python bench/cost.py baseline . bare       # with the featureless prototype (bench.py's BARE): the floor

Each tree (with ``@NAME=VALUE`` settings, as in ``bench/ab.py``) runs as a sidecar under ``valgrind
--tool=callgrind`` twice, forwarding N and then 3N GET requests on one keep-alive connection to the nginx
upstream of ``bench/ab.py``; instructions per request are the difference of the two totals over 2N, so
start-up and shutdown cancel out. The same code, inputs and environment give the same count whatever else
the machine is doing (wrk's timings here moved by 10-20% between runs of identical code); instructions are
not time, but a change that adds work adds instructions. Prints one line per tree and the ratio to the
first (``baseline`` and ``.`` when none is named), then likewise the instructions of a run less its requests
(start-up and shutdown). Not a test; needs valgrind and nginx (``apt-get install valgrind nginx-light``).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import BARE, bare_env, compile_tree, free_port, stop_all, token_upstream, tree_env, tree_path, wait_port

# Under valgrind the interpreter starts about 50 times slower.
START_TIMEOUT = 300.0


def forward(port: int, count: int) -> None:
    """``count`` GET requests on one connection; every answer must be the upstream's 200 (the token went)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for index in range(count):
            connection.request("GET", f"/item/{index}")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                sys.exit(f"cost: request {index} got {response.status}")
    finally:
        connection.close()


def instructions(tree: str, upstream: int, token: str, count: int, work: Path) -> int:
    """Instructions the sidecar of ``tree`` (or the bare prototype) executed from start to exit, forwarding ``count``
    requests."""
    port = free_port()
    if tree == "bare":
        cwd, env = work, bare_env(f"http://127.0.0.1:{upstream}", token, port)
        program = ["-c", BARE]
    else:
        cwd, env = tree_env(tree, upstream, port)
        settings = [cwd / "proxy" / "settings.py", *(cwd / "proxy" / "settings").glob("*.py")]
        if any("shutdown_delay" in path.read_text() for path in settings if path.exists()):  # the baseline predates it
            env["SIDECAR_SHUTDOWN_DELAY"] = "0"
        program = ["-m", "proxy", "serve"]
    out = work / f"callgrind-{port}.out"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *program]
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=START_TIMEOUT)
        forward(port, count)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=START_TIMEOUT)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    sys.exit(f"cost: no totals in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "trees",
        nargs="*",
        default=["baseline", "."],
        help="source trees ('baseline': bench.py's BASELINE; 'bare': the prototype), each with @NAME=VALUE settings",
    )
    parser.add_argument("--requests", type=int, default=1000, help="N: runs forward N and 3N requests")
    args = parser.parse_args()
    for tool in ("valgrind", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"cost: {tool} is required (apt-get install valgrind nginx-light)")
    for tree in args.trees:
        # Bytecode, as installed (start-up is counted too); the baseline is extracted here, once, not by two runs.
        if tree != "bare":
            compile_tree(tree_path(tree.split("@")[0]))
    work = Path(tempfile.mkdtemp(prefix="sidecar-cost-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream, token = token_upstream(work, procs)
        runs = [(tree, count) for tree in args.trees for count in (args.requests, 3 * args.requests)]
        with ThreadPoolExecutor(max_workers=2) as pool:  # one valgrind per core
            totals = list(pool.map(lambda run: instructions(run[0], upstream, token, run[1], work), runs))
        per_request = {
            tree: (totals[2 * index + 1] - totals[2 * index]) / (2 * args.requests)
            for index, tree in enumerate(args.trees)
        }
        first = per_request[args.trees[0]]
        print(f"instructions per forwarded request (callgrind; {args.requests} and {3 * args.requests} requests):")
        for tree, count in per_request.items():
            print(f"{tree:40} {count:10,.0f}   {count / first:6.3f} of {args.trees[0]}   {count - first:+9,.0f}")
        # What is left of a run once its requests are taken out: start-up (imports, settings, the first token) and
        # shutdown, the start-up's share by far. Steadier than timing a start on a busy machine.
        fixed = {tree: totals[2 * index] - per_request[tree] * args.requests for index, tree in enumerate(args.trees)}
        base = fixed[args.trees[0]]
        print("instructions to start and stop (the rest of a run):")
        for tree, count in fixed.items():
            print(f"{tree:40} {count / 1e6:10,.0f}M  {count / base:6.3f} of {args.trees[0]}")
        return 0
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    sys.exit(main())
