"""The Kubernetes manifests (deploy/k8s) and the container images (Dockerfile), without a cluster:

- both overlays render with `kubectl kustomize` and every object validates (kubernetes-validate,
  offline OpenAPI schemas, strict: unknown fields are errors) for current Kubernetes versions;
  KEDA's ScaledObject has no schema there and is checked structurally below instead;
- checkov (Kubernetes and Dockerfile checks) passes except the checks listed with their reason
  in deploy/checkov-skips.yaml, and hadolint passes on the Dockerfile;
- structure: probes, resources and a non-root, read-only securityContext on every container,
  a GPU for inference in prod, autoscalers and budgets that point at real workloads, Services
  and the Ingress that point at real ports, the nginx site's limits on the Ingress, and every
  route of the app (its url_map) sent to the api Service;
- isolation: who can reach whom is computed from the NetworkPolicies and must be exactly the
  allowed flows;
- no Secret value is committed: the Secret comes only from the operator's gitignored file.

The topology test (tests/test_k8s_topology.py) runs the dev overlay's containers as processes.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.k8s_helpers import (
    K8S,
    OVERLAYS,
    ROOT,
    Rendered,
    all_containers,
    container_env,
    containers,
    ensure_tools,
    name_of,
    pod_labels,
    pod_spec,
    render,
    selector_matches,
)

# The newest release kubernetes-validate ships schemas for, and the oldest still maintained.
K8S_VERSIONS = ("1.35.0", "1.37.0")
# Kinds whose schema is not in kubernetes-validate (CRDs): checked by the tests below instead.
CRD_KINDS = {"ScaledObject": "keda.sh/v1alpha1"}
SKIPS = yaml.safe_load((ROOT / "deploy" / "checkov-skips.yaml").read_text())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Rendered]:
    workdir = tmp_path_factory.mktemp("k8s-render")
    return {overlay: render(overlay, workdir) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def tools():
    return ensure_tools()


# ================================================================== render and validate
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered, overlay, version):
    skipped, errors = [], []
    for obj in rendered[overlay].objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.append(name_of(obj))
            assert CRD_KINDS.get(obj["kind"]) == obj["apiVersion"], f"no schema for {name_of(obj)}"
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name_of(obj)}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)
    validated = len(rendered[overlay].objects) - len(skipped)
    assert validated > 30, f"only {validated} objects validated"
    print(f"{overlay} on Kubernetes {version}: {validated} objects valid; not in the offline schemas "
          f"(checked structurally instead): {', '.join(skipped)}")


def test_validation_catches_a_mistake(rendered):
    # The check above can fail: a misspelt field or a wrong type is refused.
    deployment = json.loads(json.dumps(rendered["dev"].get("Deployment", "api")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(rendered["dev"].get("Deployment", "api")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_both_overlays_have_every_tier(rendered):
    for overlay in OVERLAYS:
        names = {o["metadata"]["name"] for o in rendered[overlay].of_kind("Deployment")}
        assert names == {"api", "worker", "inference", "web"}, overlay
        assert {o["metadata"]["namespace"] for o in rendered[overlay].objects if o["kind"] != "Namespace"} == {"d3"}
    assert {o["metadata"]["name"] for o in rendered["dev"].of_kind("StatefulSet")} == {"postgres", "minio", "redis"}
    assert not rendered["prod"].of_kind("StatefulSet"), "prod uses external storage"
    for overlay in OVERLAYS:
        job = rendered[overlay].get("Job", "d3-migrate")
        assert containers(job)[0]["command"] == ["d3", "db", "upgrade"]


# ================================================================== linters
def _checkov(tools, path: Path, framework: str) -> tuple[set[str], int]:
    result = subprocess.run([str(tools.checkov), "-f", str(path), "--framework", framework, "--skip-download",
                             "--quiet", "--compact", "-o", "json"], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed, passed = set(), 0
    for item in reports:
        failed |= {check["check_id"] for check in item["results"]["failed_checks"]}
        passed += item["summary"]["passed"]
    return failed, passed


def test_checkov_kubernetes(rendered, tools, tmp_path):
    skips = SKIPS["kubernetes"]
    fired: set[str] = set()
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(rendered[overlay].objects))
        failed, passed = _checkov(tools, path, "kubernetes")
        assert passed > 300, f"checkov ran only {passed} checks on {overlay}"
        unexpected = failed - set(skips)
        assert not unexpected, f"checkov fails on {overlay}: {sorted(unexpected)}"
        fired |= failed
    stale = set(skips) - fired
    assert not stale, f"deploy/checkov-skips.yaml skips checks that pass now; remove them: {sorted(stale)}"
    print("checkov kubernetes: skipped " + "; ".join(f"{k}: {v}" for k, v in skips.items()))


def test_checkov_dockerfile(tools):
    skips = SKIPS["dockerfile"]
    failed, passed = _checkov(tools, ROOT / "Dockerfile", "dockerfile")
    assert passed > 50
    assert failed == set(skips), f"checkov Dockerfile: failing {sorted(failed)}, skipped {sorted(skips)}"


def test_checkov_catches_a_mistake(rendered, tools, tmp_path):
    deployment = json.loads(json.dumps(rendered["dev"].get("Deployment", "web")))
    container = pod_spec(deployment)["containers"][0]
    container["securityContext"] = {"privileged": True}
    del container["resources"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    failed, _ = _checkov(tools, path, "kubernetes")
    assert {"CKV_K8S_16", "CKV_K8S_13"} <= failed  # privileged container, no memory limit


def test_hadolint(tools):
    result = subprocess.run([str(tools.hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_mistake(tools, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nRUN cd /app && make\n")
    result = subprocess.run([str(tools.hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout and "DL3003" in result.stdout


def _stages(text: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(2)
            stages[current] = [f"FROM {match.group(1)}"]
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_dockerfile_final_images():
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert {"api", "inference", "web"} <= set(stages)
    bases = {"api": "python:3.11", "inference": "nvidia/cuda:", "web": "nginx"}
    for target, base in bases.items():
        lines = stages[target]
        assert base in lines[0], f"{target} is built on {lines[0]}"
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as root"
        body = "\n".join(lines)
        for tool in ("build-essential", "gcc", "g++", "python3-dev", "python3-pip", "npm ", "git "):
            assert tool not in body, f"{target} installs the build tool {tool.strip()}"
        assert "fetch-weights" not in body and ".pth" not in body, f"{target} bakes weights into the image"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[2:3] == ["**"] or "**" in ignore, ".dockerignore starts from nothing"
    for kept in ("!api/", "!requirements.txt", "!gunicorn_config.py", "!web/"):
        assert kept in ignore
    assert "**/secrets.env" in ignore and "**/.env" in ignore


# ================================================================== structure
def _is_long_running(workload, init: bool) -> bool:
    return workload["kind"] != "Job" and not init


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_and_a_locked_down_context(rendered, overlay):
    seen = 0
    for workload, container, init in all_containers(rendered[overlay]):
        where = f"{overlay} {name_of(workload)} container {container['name']}"
        seen += 1
        if _is_long_running(workload, init):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in container, f"{where} has no {probe}"
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(part, {}), f"{where} has no {part}.{resource}"
        context = container.get("securityContext", {})
        pod_context = pod_spec(workload).get("securityContext", {})
        assert context.get("runAsNonRoot") is True or pod_context.get("runAsNonRoot") is True, where
        assert pod_context.get("runAsUser", 0) != 0 and context.get("runAsUser", 1) != 0, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert context.get("privileged", False) is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not context.get("capabilities", {}).get("add"), where
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod_spec(workload).get("automountServiceAccountToken") is False, where
        assert not pod_spec(workload).get("hostNetwork") and not pod_spec(workload).get("hostPID"), where
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: untagged image {image}"
    assert seen >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(rendered, overlay):
    """With a read-only root, every path the settings make a process write must be a mount."""
    config_name = next(o["metadata"]["name"] for o in rendered[overlay].of_kind("ConfigMap")
                       if o["metadata"]["name"].startswith("d3-config"))
    for workload, container, _init in all_containers(rendered[overlay]):
        refs = [s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])]
        if config_name not in refs:
            continue
        env = container_env(rendered[overlay], container)
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        wanted = {"HOME": env.get("HOME"), "MPLCONFIGDIR": env.get("MPLCONFIGDIR")}
        if (not _init and workload["kind"] != "Job") or container["name"] in ("weights", "fetch-weights"):
            # What the long-running processes and the weights' fetchers write: every such setting.
            for setting in ("INSTANCE_DIR", "D3_CACHE_DIR", "PROMETHEUS_MULTIPROC_DIR"):
                if setting in env:
                    wanted[setting] = env[setting]
        for setting, path in wanted.items():
            assert path and any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{overlay} {name_of(workload)}/{container['name']}: {setting}={path} is not on a volume {mounts}")


def test_inference_gets_a_gpu_in_prod_only(rendered):
    prod = rendered["prod"].get("Deployment", "inference")
    triton = next(c for c in containers(prod) if c["name"] == "triton")
    assert str(triton["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    spec = pod_spec(prod)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    names = [c["name"] for c in containers(prod)]
    assert names == ["triton", "dcgm-exporter"], "prod's inference pod is Triton plus the GPU metrics sidecar"
    config = next(o for o in rendered["prod"].of_kind("ConfigMap") if o["metadata"]["name"].startswith("d3-config"))
    assert config["data"]["D3_DEVICE"] == "cuda"
    weights = next(v for v in spec["volumes"] if v["name"] == "weights")
    assert weights == {"name": "weights", "persistentVolumeClaim": {"claimName": "d3-weights", "readOnly": True}}
    dev = rendered["dev"].get("Deployment", "inference")
    for container in containers(dev) + containers(dev, init=True):
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "nodeSelector" not in pod_spec(dev)
    for overlay in OVERLAYS:  # nothing else asks for a GPU
        for workload, container, _ in all_containers(rendered[overlay]):
            if not (workload["metadata"]["name"] == "inference" and container["name"] == "triton"):
                assert "nvidia.com/gpu" not in json.dumps(container["resources"]), name_of(workload)


def test_dev_runs_the_tiny_model_on_cpu(rendered):
    config = next(o for o in rendered["dev"].of_kind("ConfigMap") if o["metadata"]["name"].startswith("d3-config"))
    data = config["data"]
    assert data["D3_BACKBONE"] == "d3-tiny" and data["D3_DEVICE"] == "cpu"
    assert data["D3_CLIP_WEIGHTS"].startswith("random:") and data["D3_HEAD_WEIGHTS"].startswith("random:")


def _workload_by_selector(rendered: Rendered, selector: dict) -> list[dict]:
    return [w for w in rendered.workloads() if w["kind"] != "Job" and selector_matches(selector, pod_labels(w))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_budgets_and_autoscalers_point_at_real_things(rendered, overlay):
    r = rendered[overlay]
    for service in r.of_kind("Service"):
        targets = _workload_by_selector(r, {"matchLabels": service["spec"]["selector"]})
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: no port {target}"
    for deployment in r.of_kind("Deployment"):
        budgets = [p for p in r.of_kind("PodDisruptionBudget")
                   if selector_matches(p["spec"]["selector"], pod_labels(deployment))]
        assert len(budgets) == 1, f"{name_of(deployment)} has {len(budgets)} PodDisruptionBudgets"
    hpa = r.get("HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    spread = pod_spec(r.get("Deployment", "api"))["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scaled_objects(rendered, overlay):
    """What KEDA's CRD would check, and what it could not: the target and the env it reads exist."""
    r = rendered[overlay]
    scaled = {o["metadata"]["name"]: o for o in r.of_kind("ScaledObject")}
    assert set(scaled) == {"worker", "inference"}
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = r.get("Deployment", spec["scaleTargetRef"]["name"])
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600, f"{name}: model loads take minutes"
        assert "scaleUp" in behavior
        for trigger in spec["triggers"]:
            assert trigger["type"] in ("redis", "prometheus")
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"
        if name == "worker":
            (trigger,) = spec["triggers"]
            from api.worker import QUEUE  # the Celery queue `d3 worker` consumes: a Redis list of that name

            assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == QUEUE == "d3-video"
            container = next(c for c in containers(target) if c["name"] == spec["envSourceContainerName"])
            env = container_env(r, container)
            address = env[trigger["metadata"]["addressFromEnv"]]
            assert re.fullmatch(r"[\w.-]+:\d+", address), address
            assert env[trigger["metadata"]["passwordFromEnv"]] == r.secret_values["REDIS_PASSWORD"]
        else:
            (trigger,) = spec["triggers"]
            query = trigger["metadata"]["query"]
            assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
            float(trigger["metadata"]["threshold"])


def _nginx_site_value(directive: str, context: str = "443 ssl") -> str:
    text = (ROOT / "d3-api-nginx.conf").read_text()
    server = text[text.index(f"listen {context}"):]
    return re.search(rf"^\s*{directive}\s+(\S+);", server, re.M).group(1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_tls_and_the_nginx_site_limits(rendered, overlay):
    r = rendered[overlay]
    ingresses = r.of_kind("Ingress")
    assert {i["metadata"]["name"] for i in ingresses} == {"d3", "d3-video"}
    body = _nginx_site_value("client_max_body_size")
    read_timeout = _nginx_site_value("proxy_read_timeout").rstrip("s")
    connect_timeout = _nginx_site_value("proxy_connect_timeout").rstrip("s")
    routed = set()
    for ingress in ingresses:
        notes = ingress["metadata"]["annotations"]
        assert notes["cert-manager.io/cluster-issuer"]
        assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == body
        assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == read_timeout
        assert notes["nginx.ingress.kubernetes.io/proxy-send-timeout"] == read_timeout
        assert notes["nginx.ingress.kubernetes.io/proxy-connect-timeout"] == connect_timeout
        hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        assert hosts == set(ingress["spec"]["tls"][0]["hosts"]), "TLS covers every host"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = r.get("Service", path["backend"]["service"]["name"])
                port = path["backend"]["service"]["port"]
                assert port.get("name") in {p.get("name") for p in service["spec"]["ports"]}
                routed.add((path["path"], service["metadata"]["name"]))
    video = next(i for i in ingresses if i["metadata"]["name"] == "d3-video")["metadata"]["annotations"]
    assert video["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert ("/predict/video", "api") in routed and ("/", "web") in routed and ("/predict", "api") in routed
    assert not any(path.startswith("/metrics") for path, _ in routed), "/metrics stays inside the cluster"
    if overlay == "prod":
        assert hosts == {"d3.example.org"}


# The app's routes the Ingress must not send to the api Service, and why.
NOT_API_ROUTES = {
    "metrics.metrics": "Prometheus scrapes the pods; /metrics is not published",
    "static": "Flask's default static route: the app has no static folder",
}


def _ingress_backend(ingresses: list[dict], host: str, path: str) -> tuple[str, str] | None:
    """(Ingress, Service) a request for `path` reaches, by the Ingress rules of Kubernetes: the
    longest matching path wins, Exact before Prefix, and Prefix matches whole path segments."""
    best = None
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            if rule["host"] != host:
                continue
            for entry in rule["http"]["paths"]:
                want, kind = entry["path"], entry["pathType"]
                if kind == "Exact":
                    matches = path == want
                else:
                    prefix = want.rstrip("/")
                    matches = path == prefix or path.startswith(prefix + "/")
                if matches:
                    rank = (len(want.rstrip("/")), kind == "Exact")
                    if best is None or rank > best[0]:
                        best = (rank, (ingress["metadata"]["name"], entry["backend"]["service"]["name"]))
    return best[1] if best else None


def _sample_path(rule: str) -> str:
    """A concrete URL of a Flask rule: each <variable> filled, <path:...> with two segments."""
    return re.sub(r"<(?:(\w+):)?\w+>", lambda m: "a/b.png" if m.group(1) == "path" else "x", rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_sends_every_api_route_to_the_api(rendered, overlay, app):
    """Every route of the real app (its url_map) reaches the api Service through the Ingress; the
    page's routes, and /metrics, which stays inside the cluster, reach the web Service."""
    ingresses = rendered[overlay].of_kind("Ingress")
    (host,) = {rule["host"] for i in ingresses for rule in i["spec"]["rules"]}
    wrong = []
    for rule in app.url_map.iter_rules():
        path = _sample_path(rule.rule)
        backend = _ingress_backend(ingresses, host, path)
        if rule.endpoint in NOT_API_ROUTES or rule.endpoint.startswith("web."):
            expected = ("d3", "web")  # the page; the web pods answer 404 to anything else
        elif rule.rule.startswith("/predict/video"):
            expected = ("d3-video", "api")  # streamed unbuffered, with the lower upload limits
        else:
            expected = ("d3", "api")
        if backend != expected:
            wrong.append(f"{rule.rule} ({rule.endpoint}): {path} reaches {backend}, not {expected}")
    assert not wrong, "Ingress routing:\n" + "\n".join(wrong)
    # The check can fail: an Exact /predict leaves /predict/audio to the web pods.
    exact = json.loads(json.dumps(ingresses))
    for entry in exact[0]["spec"]["rules"][0]["http"]["paths"]:
        if entry["path"] == "/predict":
            entry["pathType"] = "Exact"
    assert _ingress_backend(exact, host, "/predict/audio") == ("d3", "web")
    assert _ingress_backend(ingresses, host, "/predictionsx") == ("d3", "web"), "Prefix matches whole segments"


# ================================================================== secrets
def test_no_secret_value_is_committed(rendered):
    tracked = subprocess.run(["git", "ls-files", "deploy", "Dockerfile", ".dockerignore"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if f.endswith("secrets.env")], "a secrets.env is committed"
    for overlay in OVERLAYS:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/k8s/overlays/{overlay}/secrets.env"], cwd=ROOT)
        assert ignored.returncode == 0, f"deploy/k8s/overlays/{overlay}/secrets.env is not gitignored"
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        (generator,) = kustomization["secretGenerator"]
        assert generator == {"name": "d3-secrets", "envs": ["secrets.env"]}, "secrets only from the operator's file"
        example = (K8S / "overlays" / overlay / "secrets.env.example").read_text()
        values = [line.split("=", 1)[1] for line in example.splitlines() if line and not line.startswith("#")]
        assert values and set(values) == {"change-me"}, "the example holds placeholders only (the app refuses them)"
        # The rendered Secret holds exactly the throwaway file's values: nothing else feeds it.
        (secret,) = rendered[overlay].of_kind("Secret")
        assert rendered[overlay].secret(secret["metadata"]["name"]) == rendered[overlay].secret_values
    for path in K8S.rglob("*"):
        if path.is_file() and path.name != "secrets.env":
            for doc in (yaml.safe_load_all(path.read_text()) if path.suffix == ".yaml" else []):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    pytest.fail(f"{path} commits a Secret object")
                if isinstance(doc, dict):
                    for generator in doc.get("secretGenerator", []):
                        assert "literals" not in generator, f"{path}: secret literals"
    # Only the containers that use the Secret get it: not the web, not the weights download. The
    # inference tier gets the database and object-store keys only (the model versions), one by one.
    tier_keys = {"POSTGRES_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"}
    for overlay in OVERLAYS:
        for workload, container, _init in all_containers(rendered[overlay]):
            text = json.dumps(container)
            name = workload["metadata"]["name"]
            if name in ("web", "d3-fetch-weights") or container["name"] in ("weights", "dcgm-exporter"):
                assert "d3-secrets" not in text, f"{name_of(workload)}/{container['name']} gets the Secret"
            elif name == "inference":
                assert not any("secretRef" in source for source in container.get("envFrom", [])), \
                    f"{name_of(workload)}/{container['name']} gets the whole Secret"
                keys = {item["valueFrom"]["secretKeyRef"]["key"] for item in container.get("env", [])
                        if "secretKeyRef" in item.get("valueFrom", {})}
                assert keys == tier_keys, f"{name_of(workload)}/{container['name']} gets {sorted(keys)}"
    # No password, key or token in any committed value, and no settings key names a secret.
    for overlay in OVERLAYS:
        for config in rendered[overlay].of_kind("ConfigMap"):
            for key in config.get("data", {}):
                assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", key), f"{key} belongs in the Secret"


# ================================================================== isolation
NAMESPACE = "d3"
# Peers outside the service: (name, namespace, pod labels), and addresses outside the cluster.
OUTSIDERS = [
    ("ingress-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
    ("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
    ("keda-operator", "keda", {"app": "keda-operator"}),
    ("fake-ingress-controller", "default", {"app.kubernetes.io/name": "ingress-nginx"}),
    ("other-app", "default", {"app": "other"}),
    ("debug-pod-in-d3", NAMESPACE, {"run": "debug"}),
    ("pod-with-a-d3-name", NAMESPACE, {"app.kubernetes.io/name": "api"}),
]
EXTERNAL = {"internet": "203.0.113.7", "private-host": "10.1.2.3", "prod-db": "10.20.1.10",
            "prod-s3": "10.20.2.10", "prod-redis": "10.20.3.10", "metadata-service": "169.254.169.254"}

ALLOWED_IN = {
    "dev": {
        ("ingress-controller", "api", 6000), ("ingress-controller", "web", 8080),
        ("prometheus", "api", 6000), ("prometheus", "inference", 8002),
        ("api", "inference", 8000), ("api", "inference", 8001),
        ("worker", "inference", 8000), ("worker", "inference", 8001),
        ("api", "postgres", 5432), ("api", "minio", 9000), ("api", "redis", 6379),
        ("worker", "postgres", 5432), ("worker", "minio", 9000), ("worker", "redis", 6379),
        ("d3-migrate", "postgres", 5432), ("keda-operator", "redis", 6379),
        # the model versions: the active head's row and its file
        ("inference", "postgres", 5432), ("inference", "minio", 9000),
    },
    "prod": {
        ("ingress-controller", "api", 6000), ("ingress-controller", "web", 8080),
        ("prometheus", "api", 6000), ("prometheus", "inference", 8002), ("prometheus", "inference", 9400),
        ("api", "inference", 8000), ("api", "inference", 8001),
        ("worker", "inference", 8000), ("worker", "inference", 8001),
    },
}
ALLOWED_OUT = {
    "dev": {("api", "internet", 443), ("worker", "internet", 443)},
    "prod": {("api", "internet", 443), ("worker", "internet", 443), ("d3-fetch-weights", "internet", 443),
             ("api", "prod-db", 5432), ("worker", "prod-db", 5432), ("d3-migrate", "prod-db", 5432),
             ("api", "prod-s3", 9000), ("worker", "prod-s3", 9000),
             ("api", "prod-redis", 6379), ("worker", "prod-redis", 6379),
             ("inference", "prod-db", 5432), ("inference", "prod-s3", 9000)},
}
PROBE_PORTS = (53, 80, 443, 5432, 6000, 6379, 8000, 8001, 8002, 8080, 9000, 9400)


class Peer:
    def __init__(self, name: str, namespace: str, labels: dict[str, str], ports: dict[str, int] | None = None):
        self.name, self.namespace, self.labels = name, namespace, labels
        self.ports = ports or {}  # container port name -> number (the pod's listening ports)


def _pods(r: Rendered) -> list[Peer]:
    pods = []
    for workload in r.workloads():
        ports = {}
        for container in containers(workload):
            for port in container.get("ports", []):
                ports[port.get("name", str(port["containerPort"]))] = port["containerPort"]
        pods.append(Peer(workload["metadata"]["name"], NAMESPACE, pod_labels(workload), ports))
    return pods


def _port_matches(rule_ports: list[dict] | None, port: int, dst: Peer | None) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        value = entry.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            value = dst.ports.get(value) if dst else None
        if value is not None and (value == port or value <= port <= entry.get("endPort", value)):
            return True
    return False


def _peer_matches(peer_rule: dict, peer: Peer | str, policy_namespace: str) -> bool:
    if "ipBlock" in peer_rule:
        if not isinstance(peer, str):
            return False  # pod traffic is matched by selectors here, not by the pod network's range
        block = peer_rule["ipBlock"]
        address = ipaddress.ip_address(EXTERNAL[peer])
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if isinstance(peer, str):
        return False
    if "namespaceSelector" in peer_rule:
        ns_labels = {"kubernetes.io/metadata.name": peer.namespace}
        if not selector_matches(peer_rule["namespaceSelector"], ns_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    if "podSelector" in peer_rule:
        return selector_matches(peer_rule["podSelector"], peer.labels)
    return True


def _policies(r: Rendered, pod: Peer, direction: str) -> list[dict]:
    return [p for p in r.of_kind("NetworkPolicy") if pod.namespace == NAMESPACE
            and selector_matches(p["spec"]["podSelector"], pod.labels) and direction in p["spec"]["policyTypes"]]


def _ingress_allowed(r: Rendered, src: Peer, dst: Peer, port: int) -> bool:
    policies = _policies(r, dst, "Ingress")
    if not policies:
        return True  # not isolated (the default-deny policy makes this never happen)
    return any(_port_matches(rule.get("ports"), port, dst)
               and (not rule.get("from") or any(_peer_matches(peer, src, NAMESPACE) for peer in rule["from"]))
               for policy in policies for rule in policy["spec"].get("ingress", []))


def _egress_allowed(r: Rendered, src: Peer, dst: Peer | str, port: int) -> bool:
    if src.namespace != NAMESPACE:
        return True  # other namespaces' egress is theirs to restrict
    policies = _policies(r, src, "Egress")
    if not policies:
        return True
    # A rule without `to` (or `from`) admits every peer, as in Kubernetes.
    return any(_port_matches(rule.get("ports"), port, dst if isinstance(dst, Peer) else None)
               and (not rule.get("to") or any(_peer_matches(peer, dst, NAMESPACE) for peer in rule["to"]))
               for policy in policies for rule in policy["spec"].get("egress", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_listed_flows(rendered, overlay):
    r = rendered[overlay]
    names = {p["metadata"]["name"] for p in r.of_kind("NetworkPolicy")}
    assert "default-deny" in names
    deny = r.get("NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    pods = _pods(r)
    sources = pods + [Peer(*o) for o in OUTSIDERS]
    reachable = set()
    for dst in pods:
        listening = set(dst.ports.values())
        for src in sources:
            if src is dst:
                continue
            for port in sorted(listening | set(PROBE_PORTS)):
                if port in listening and _ingress_allowed(r, src, dst, port) and _egress_allowed(r, src, dst, port):
                    reachable.add((src.name, dst.name, port))
    assert reachable == ALLOWED_IN[overlay], (
        f"not allowed but reachable: {sorted(reachable - ALLOWED_IN[overlay])}; "
        f"allowed but blocked: {sorted(ALLOWED_IN[overlay] - reachable)}")
    outbound = {(src.name, name, port) for src in pods for name in EXTERNAL for port in PROBE_PORTS
                if port != 53 and _egress_allowed(r, src, name, port)}
    assert outbound == ALLOWED_OUT[overlay], (
        f"not allowed but open: {sorted(outbound - ALLOWED_OUT[overlay])}; "
        f"allowed but blocked: {sorted(ALLOWED_OUT[overlay] - outbound)}")
    # Every pod may resolve names (cluster DNS), and only that, in kube-system.
    dns = Peer("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
    for pod in pods:
        assert _egress_allowed(r, pod, dns, 53), f"{pod.name} cannot resolve names"
        assert not _egress_allowed(r, pod, Peer("api-server", "kube-system", {"component": "kube-apiserver"}), 443)


def test_reachability_check_catches_an_open_policy(rendered):
    # The computation above can fail: an allow-all ingress rule makes storage reachable.
    r = rendered["dev"]
    opened = Rendered(r.overlay, [*r.objects, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "oops"},
        "spec": {"podSelector": {"matchLabels": {"d3.io/role": "postgres"}}, "policyTypes": ["Ingress"],
                 "ingress": [{}]}}], r.secret_values, r.tree)
    pods = {p.name: p for p in _pods(opened)}
    web, postgres = pods["web"], pods["postgres"]
    assert _ingress_allowed(opened, Peer(*OUTSIDERS[4]), postgres, 5432)
    assert not _egress_allowed(opened, web, postgres, 5432)  # web's own egress still says no
    assert not _ingress_allowed(r, Peer(*OUTSIDERS[4]), postgres, 5432)


# ================================================================== env names
# Names in the manifests' environment that are not settings of api/config.py, and who reads them.
NOT_SETTINGS = {
    "POSTGRES_SERVER": "assembled into DATABASE_URL by $(VAR) expansion",
    "POSTGRES_DB": "assembled into DATABASE_URL", "POSTGRES_USER": "assembled into DATABASE_URL",
    "POSTGRES_PASSWORD": "assembled into DATABASE_URL", "DATABASE_OPTIONS": "assembled into DATABASE_URL",
    "REDIS_SERVER": "assembled into REDIS_URL", "REDIS_PASSWORD": "assembled into REDIS_URL",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client (gunicorn_config.py)",
    "MPLCONFIGDIR": "matplotlib", "HOME": "the process", "PYTHONDONTWRITEBYTECODE": "Python",
    "PYTHONUNBUFFERED": "Python",
}
# Settings other tiers bring (issue 10: inference tier, issue 11: worker tier); accepted until
# their branch lands, then they must be settings like the rest.
PENDING_SETTINGS = {"D3_INFERENCE_URL": "t10", "CELERY_BROKER_URL": "w11"}


def test_every_env_name_is_read_by_someone(rendered):
    """A misspelt name in a manifest would be ignored silently: every name must be a setting of
    the app (api/config.py), a Gunicorn setting (gunicorn_config.py) or a listed helper."""
    from api.config import Settings

    settings = {name.upper() for name in Settings.model_fields}
    gunicorn = (ROOT / "gunicorn_config.py").read_text()
    problems = []
    for overlay in OVERLAYS:
        for workload, container, _init in all_containers(rendered[overlay]):
            if not container["image"].split("/")[-1].startswith(("api:", "inference:")):
                continue  # the storage images' own env names (POSTGRES_*, MINIO_ROOT_*) are theirs
            for name in container_env(rendered[overlay], container):
                known = (name in settings or name in NOT_SETTINGS or f'"{name}"' in gunicorn
                         or (name in PENDING_SETTINGS and name not in settings))
                if not known:
                    problems.append(f"{overlay} {name_of(workload)}/{container['name']}: {name}")
    assert not problems, "env names nothing reads:\n" + "\n".join(sorted(set(problems)))


def _add_headers(text: str) -> dict[str, str]:
    return dict(re.findall(r'^\s*add_header\s+(\S+)\s+"([^"]*)"\s+always;', text, re.M))


def test_web_pod_config_matches_the_front_ends_own():
    """The web tier's nginx (base/web-nginx.conf) keeps the front end's URL layout and headers
    (web/nginx/default.conf.template, api/routes/web.py), minus the API pass-through."""
    ours = (K8S / "base" / "web-nginx.conf").read_text()
    template = ROOT / "web" / "nginx" / "default.conf.template"
    if not template.exists():
        pytest.skip("web/nginx/default.conf.template is not in this checkout yet (issue 15)")
    theirs = template.read_text()
    assert _add_headers(ours) == _add_headers(theirs)
    for location in ("location = / {", "location = /ui/ {", "location ^~ /ui/assets/ {", "location ^~ /ui/ {"):
        assert location in ours and location in theirs, location
    assert "proxy_pass" not in ours
    from api.routes.web import SECURITY_HEADERS

    assert _add_headers(ours)["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
