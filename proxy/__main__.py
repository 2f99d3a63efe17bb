"""``python -m proxy`` is the ``cognito-sidecar`` command."""

from __future__ import annotations

import sys

from proxy.entry import main

sys.exit(main())
