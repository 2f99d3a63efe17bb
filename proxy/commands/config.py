"""``cognito-sidecar config``: the settings this environment gives, each with where it came from; secrets only as
``[set]`` or ``[file: path]``. The same report a running sidecar serves at ``/-/config``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from proxy.settings.effective import effective, effective_text
from proxy.settings.load import load_settings


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    report = effective(load_settings(env))
    print(json.dumps(report, indent=2) if args.json else effective_text(report), end="\n" if args.json else "")
    return 0
