"""One version: ``proxy.__version__`` is what the package, the image's label, the changelog and a release tag say."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from proxy import __version__

ROOT = Path(__file__).parents[2]


def test_the_image_changelog_and_package_name_one_version():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^ARG VERSION=(\S+)$", dockerfile, re.MULTILINE) == [__version__]
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.findall(r"^## (\S+)", changelog, re.MULTILINE)[0] == __version__  # the newest entry
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "proxy.__version__"}


def test_a_release_checks_its_tag_and_publishes_signed_multi_arch_images_with_provenance():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    steps = {job: workflow["jobs"][job]["steps"] for job in workflow["jobs"]}
    assert any("proxy.__version__" in step.get("run", "") for step in steps["check"])  # tag == version
    assert workflow["jobs"]["pypi"]["permissions"] == {"id-token": "write"}  # trusted publishing, no token
    [build] = [step for step in steps["image"] if step.get("uses", "").startswith("docker/build-push-action")]
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["sbom"] is True and build["with"]["provenance"] == "mode=max"
    assert "rewrite-timestamp=true" in build["with"]["outputs"]
    assert any("cosign sign" in step.get("run", "") for step in steps["image"])
