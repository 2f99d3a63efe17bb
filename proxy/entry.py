"""The ``cognito-sidecar`` command's entry point: quick answers first, then the full command line.

``--version`` and ``healthcheck`` (run by container engines every few seconds) answer without importing the
sidecar, its server or its clients; everything else is ``proxy.cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from proxy import __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"cognito-sidecar {__version__}")
        return 0
    if args[:1] == ["healthcheck"]:
        from proxy.commands.healthcheck import main as healthcheck

        return healthcheck(args[1:])
    from proxy.cli import main as cli

    return cli(args)


__all__ = ["main"]
