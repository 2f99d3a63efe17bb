"""The compose dev stacks, as files: what scripts/container-check cannot see by running them once. Each image is
built from a Dockerfile target and named by compose after the project (no fixed `image:`, which two checkouts
would re-tag), the emulator only from the emulator target, and no secret comes from a file in the repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
STACKS = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose" / "fleet.yml"]


def _services(stack: Path) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(stack.read_text())["services"]
    return services


@pytest.mark.parametrize("stack", STACKS, ids=[stack.name for stack in STACKS])
def test_each_built_service_names_a_dockerfile_target_and_no_image(stack: Path):
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    built = {name: service for name, service in _services(stack).items() if "build" in service}
    assert built
    for name, service in built.items():
        assert "image" not in service, name
        assert (stack.parent / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["target"] in targets
        emulator = service["command"][0] == "emulator"
        assert (service["build"]["target"] == "emulator") == emulator, name


@pytest.mark.parametrize("stack", STACKS, ids=[stack.name for stack in STACKS])
def test_no_secret_comes_from_a_file_in_the_repository(stack: Path):
    document = yaml.safe_load(stack.read_text())
    assert "secrets" not in document
    assert not any("secrets" in service for service in document["services"].values())
