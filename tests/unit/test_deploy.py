"""The Kubernetes packaging, as kustomize builds it: every overlay's pieces fit together (the PodMonitor, the
Service and the NetworkPolicy name the port the sidecar's metrics listener is on; selectors select the pod).
Needs kubectl (scripts/check installs Debian's); the schemas themselves are checked by scripts/check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

OVERLAYS = sorted((Path(__file__).parents[2] / "deploy" / "kubernetes" / "overlays").iterdir())


def _build(overlay: Path) -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is missing (scripts/check installs Debian's)")
    built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=True)
    return {document["kind"]: document for document in yaml.safe_load_all(built.stdout)}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[overlay.name for overlay in OVERLAYS])
def test_each_overlay_builds_and_its_pieces_name_the_same_pod_and_port(overlay: Path):
    kinds = _build(overlay)
    assert {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodMonitor"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    [sidecar] = [c for c in pod["spec"]["initContainers"] if c["name"] == "cognito-sidecar"]
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
    config = kinds["ConfigMap"]["data"]
    assert config["SIDECAR_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    assert config["SIDECAR_LISTEN"].startswith("127.0.0.1:")  # forwarding stays on the pod's loopback

    def selects(selector: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    monitor = kinds["PodMonitor"]["spec"]
    assert selects(monitor["selector"]["matchLabels"])
    assert [(e["port"], e["path"]) for e in monitor["podMetricsEndpoints"]] == [("metrics", "/-/metrics")]
    service = kinds["Service"]["spec"]
    assert selects(service["selector"]) and [p["targetPort"] for p in service["ports"]] == ["metrics"]
    policy = kinds["NetworkPolicy"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"])
    assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [ports["metrics"]]
    egress_ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert {53, 443} <= egress_ports
    if "SIDECAR_TOKEN_STORE" in config:  # the fleet reaches its Redis
        assert {6379, 6380} <= egress_ports
        assert kinds["Deployment"]["spec"]["replicas"] > 1
