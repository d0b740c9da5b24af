"""The dev overlay, run for real without a cluster: every Deployment, StatefulSet and Job of the
rendered manifests becomes local processes, started from the manifest's own command, args and
environment, then the system is driven through the API Service's port and every probe the
manifests declare is hit.

How a manifest becomes a process (tests/k8s_topology.py, class LocalCluster):
- environment: what the kubelet would build: envFrom (the rendered ConfigMap and Secret, with
  their hashed names), then env in order with $(VAR) expansion; command and args expanded too.
- ports: each Service port is followed to the containerPort of the one workload it selects, and
  that port gets a free local port. Then a rewrite table is applied to every env value, argument,
  probe command and mounted config file: `<service>[.d3[.svc[.cluster.local]]]:<port>` of a
  Service becomes 127.0.0.1:<local port>, the pod's own `0.0.0.0|127.0.0.1|localhost|:<port>`
  becomes the same host on the local port, and `--*port <n>` / `--*port=<n>` flags of a declared
  containerPort take the local port (in a mounted nginx config, `listen <port>` too). A port,
  host name or env name the manifests get wrong is thus left as it is and the process cannot
  find its peer (or listens where no probe looks).
- files: every volumeMount is a folder of the test (a configMap volume holds the rendered keys);
  the image's own paths map to the work tree (/app -> the repository, the web image's
  /usr/share/nginx/html -> web/dist), checked against the Dockerfile.
- storage: the project's test helpers stand in for the PostgreSQL and MinIO images
  (tests/conftest.py: a throwaway PostgreSQL cluster configured with the StatefulSet's POSTGRES_*
  env and password authentication, the moto S3 server), on the ports their Services declare.
  Redis runs the StatefulSet's own command and args (redis-server is installed here).
- read-only root: as root (CI), each process runs in a private mount namespace whose root
  filesystem is read-only (unshare -m), with its volumes on a tmpfs and /tmp mounted where the pod
  mounts it, so a write outside the declared volumes fails here as it would in the pod.
- order: storage, then the Job (must exit 0), then each Deployment's init containers (each must
  exit 0), then its containers; startup probes must pass before the others are tried.

Containers whose command this checkout does not have yet (the inference tier's `d3
serve-inference`, the worker tier's `d3 worker`) are reported as skipped with that reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import image_bytes
from tests.k8s_helpers import ROOT, Rendered, containers, render
from tests.k8s_topology import SANDBOX, LocalCluster
from tests.video_clips import clip_bytes

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("k8s-topology")
    local = LocalCluster(render("dev", workdir), workdir)
    try:
        local.start()
        yield local
    except BaseException:
        print(local.logs())
        raise
    finally:
        local.stop()


def api_key(cluster: LocalCluster) -> str:
    # What an operator runs: kubectl exec deploy/api -- d3 keys create --name ... --admin
    out = cluster.exec_in("api", "api", ["d3", "keys", "create", "--name", "topology", "--admin"])
    return out.splitlines()[0].strip()


@pytest.fixture(scope="module")
def session(cluster):
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key(cluster)}"
    return http


def test_every_workload_runs_or_says_why_not(cluster):
    started = set(cluster.running)
    print("started:", ", ".join(sorted(started)))
    for name, reason in cluster.skipped.items():
        print(f"SKIPPED {name}: {reason}")
    assert {"postgres", "minio", "redis", "api", "d3-migrate"} <= started | cluster.completed
    assert "d3-migrate" in cluster.completed
    assert set(cluster.skipped) <= {"inference", "worker", "web"}, cluster.skipped
    if SANDBOX:  # programs the pod's user can run here do run as that user (runAsUser 10001)
        status = Path(f"/proc/{cluster.processes[('redis', 'redis')].pid}/status").read_text()
        assert re.search(r"^Uid:\s+10001\s", status, re.M), status


def test_every_declared_probe_passes(cluster):
    results = cluster.run_probes()
    failed = [r for r in results if not r.ok and not r.skipped]
    for result in results:
        print(result)
    assert not failed, "\n".join(map(str, failed))
    checked = {r.workload for r in results if r.ok}
    assert {"api", "postgres", "redis"} <= checked


def _url(cluster: LocalCluster, path: str) -> str:
    return f"http://127.0.0.1:{cluster.service_port('api', 6000)}{path}"


def test_image_and_batch_through_the_api_service(cluster, session):
    health = session.get(_url(cluster, "/health"), timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["database"] == {"reachable": True, "backend": "postgresql"}
    assert health.json()["object_store"]["kind"] == "minio"
    one = session.post(_url(cluster, "/predict"), files={"file": ("a.png", image_bytes(seed=1), "image/png")},
                       timeout=60)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["prediction"] in ("real", "fake") and 0 <= body["fake_probability"] <= 1
    assert body["warning"], "the tiny random model says its verdicts mean nothing"
    batch = session.post(_url(cluster, "/predict/batch"),
                         files=[("files", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in (2, 3)], timeout=60)
    assert batch.status_code == 200, batch.text
    assert [r["filename"] for r in batch.json()["results"]] == ["2.png", "3.png"]
    record = session.get(_url(cluster, f"/predictions/{body['id']}"), timeout=30)
    assert record.status_code == 200 and record.json()["id"] == body["id"]
    if "inference" in cluster.running:
        # The images went through the inference tier: Triton counted them (its metrics port).
        metrics = requests.get(f"http://127.0.0.1:{cluster.service_port('inference', 8002)}/metrics", timeout=10)
        served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.text.splitlines()
                     if line.startswith("nv_inference_request_success{"))
        assert served >= 2, metrics.text[:2000]
    # The records and objects are in the StatefulSets' stand-ins, reached with the Secret's credentials.
    assert body["id"] in cluster.database_prediction_ids()
    assert cluster.stored_objects("d3-results"), "no result object in the S3 server"


def test_the_inference_tier_reads_the_model_versions(cluster):
    # The tier follows the active model version from the API's database and the models bucket: with
    # the manifests' settings it reaches both. It decides before it loads the model, and says
    # "model versions off" and why when it cannot (api/detector/tier_commands.py).
    if "inference" not in cluster.running:
        pytest.skip(cluster.skipped.get("inference", "inference not started"))
    assert cluster.log_mentions("inference", "d3 inference tier: loading"), cluster.logs()
    assert not cluster.log_mentions("inference", "model versions off"), cluster.logs()


def test_async_video_through_the_api_service(cluster, session, tmp_path):
    data = clip_bytes(tmp_path, levels=list(range(0, 250, 25)))
    queued = session.post(_url(cluster, "/predict/video"), files={"file": ("clip.avi", data, "video/x-msvideo")},
                          data={"async": "true", "frames": "4"}, timeout=60)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    deadline = time.monotonic() + 180
    while True:
        status = session.get(_url(cluster, f"/predictions/{job_id}"), timeout=30).json()
        if status["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["status"] == "done", status
    assert status["frames_analyzed"] == 4
    timeline = session.get(_url(cluster, f"/predictions/{job_id}/timeline.png"), timeout=30)
    assert timeline.status_code == 200 and timeline.content.startswith(b"\x89PNG")
    if "worker" in cluster.running:
        assert cluster.log_mentions("worker", job_id), "the job ran in the worker tier"


def test_web_static_files_through_the_web_service(cluster):
    if "web" not in cluster.running:
        pytest.skip(cluster.skipped.get("web", "web not started"))
    port = cluster.service_port("web", 8080)
    root = requests.get(f"http://127.0.0.1:{port}/", allow_redirects=False, timeout=10)
    assert root.status_code == 302 and root.headers["Location"].endswith("/ui/")
    page = requests.get(f"http://127.0.0.1:{port}/ui/", timeout=10)
    assert page.status_code == 200 and page.text == (ROOT / "web" / "dist" / "index.html").read_text()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assets = sorted((ROOT / "web" / "dist" / "assets").iterdir())
    asset = requests.get(f"http://127.0.0.1:{port}/ui/assets/{assets[0].name}", timeout=10)
    assert asset.status_code == 200 and asset.content == assets[0].read_bytes()
    assert requests.get(f"http://127.0.0.1:{port}/predictions", timeout=10).status_code == 404, \
        "the web pods serve the page only; the Ingress sends API paths to the api Service"


def _mutated(cluster: LocalCluster, workload: str, container: str, change) -> tuple[dict, dict]:
    copy = json.loads(json.dumps(cluster.workloads[workload]))
    target = next(c for c in containers(copy, init=True) + containers(copy) if c["name"] == container)
    change(target)
    return copy, target


def test_mistakes_in_the_manifests_fail(cluster):
    """The rules above cannot hide a mistake: each of these, in a manifest, stops the system."""
    # A probe path the API does not serve.
    workload, api = _mutated(cluster, "api", "api", lambda c: c["readinessProbe"]["httpGet"].update(path="/healthz"))
    assert not cluster.probe(workload, api, "readinessProbe", api["readinessProbe"]).ok
    # A probe on a port nothing listens on (the pod declares 6000; 6999 is not rewritten).
    workload, api = _mutated(cluster, "api", "api", lambda c: c["startupProbe"]["httpGet"].update(port=6999))
    assert not cluster.probe(workload, api, "startupProbe", api["startupProbe"]).ok
    workload, api = _mutated(cluster, "api", "api", lambda c: c["livenessProbe"]["tcpSocket"].update(port=6999))
    assert not cluster.probe(workload, api, "livenessProbe", api["livenessProbe"]).ok

    def run(workload: dict, container: dict, timeout: float = 120) -> int:
        argv, env, cwd, kwargs = cluster.command(workload, container)
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=timeout, **kwargs).returncode

    # The schema gate as shipped passes (the Job migrated) ...
    def gate(c):
        c["command"] = ["d3", "db", "current"]
    workload, check = _mutated(cluster, "api", "wait-for-schema", gate)
    assert run(workload, check) == 0
    # ... but not with a misspelt env name (the app falls back to an empty SQLite database) ...
    def misspelt(c):
        gate(c)
        c["env"] = [dict(e, name="DATABASE_URI") if e["name"] == "DATABASE_URL" else e for e in c["env"]]
    workload, check = _mutated(cluster, "api", "wait-for-schema", misspelt)
    assert run(workload, check) != 0
    # ... nor with a host name no Service has (not rewritten: it does not resolve here or there).
    def wrong_host(c):
        gate(c)
        c["env"] = [dict(e, value=e["value"].replace("$(POSTGRES_SERVER)", "postgresql:5432"))
                    if e["name"] == "DATABASE_URL" else e for e in c["env"]]
    workload, check = _mutated(cluster, "api", "wait-for-schema", wrong_host)
    assert run(workload, check) != 0
    # A command the image does not have exits at once.
    workload, api = _mutated(cluster, "api", "api", lambda c: c.update(command=["d3", "serve"]))
    assert run(workload, api, timeout=60) != 0
    # Outside its volumes a container cannot write (readOnlyRootFilesystem), inside it can.
    if SANDBOX:
        workload, api = _mutated(cluster, "api", "api", lambda c: c.update(
            command=["sh", "-c", "touch /tmp/ok \"$INSTANCE_DIR/ok\" && ! touch /app/not-ok /not-ok 2>/dev/null"]))
        assert run(workload, api) == 0
        assert not (ROOT / "not-ok").exists()
    # A Service whose targetPort no container declares cannot even be laid out.
    broken = [json.loads(json.dumps(o)) for o in cluster.r.objects]
    service = next(o for o in broken if o["kind"] == "Service" and o["metadata"]["name"] == "api")
    service["spec"]["ports"][0]["targetPort"] = "web"
    with pytest.raises((AssertionError, KeyError)):
        LocalCluster(Rendered(cluster.r.overlay, broken, cluster.r.secret_values, cluster.r.tree), cluster.workdir)
