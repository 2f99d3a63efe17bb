"""The parts of docs/ read off the code (the settings table, the layout) are current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_docs_are_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_every_setting_is_in_the_configuration_docs():
    from proxy.settings import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    for key, field in Settings.fields.items():
        if field.description:
            assert f"`SIDECAR_{key.upper()}`" in text, key
