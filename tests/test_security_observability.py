"""Seeing what it does: /metrics (access rules, values, two Gunicorn workers counted together) and
structured JSON request logs that never contain a key or a secret."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from api.detector import DetectorConfig, InferenceEngine
from api.models import Prediction
from api.request_log import JsonFormatter
from tests.helpers import ROOT, TINY_MODEL, free_port, image_bytes, make_app, raw_exchange, wait_for_port
from tests.security_helpers import api_key, bearer, new_key, post_image, secure_app


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(data: dict, name: str, **labels) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client, **kwargs) -> dict:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.content_type.startswith("text/plain")
    return samples(response.get_data(as_text=True))


# -- /metrics access -----------------------------------------------------------------------
def test_metrics_only_for_allowed_networks_or_admin_keys(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine)
    user, admin = new_key(app, "alice"), new_key(app, "ops", admin=True)
    client = app.test_client()
    outside = {"X-Forwarded-For": "203.0.113.5"}  # a client on the internet, through the proxy
    assert client.get("/metrics").status_code == 200  # from loopback: METRICS_ALLOW default
    denied = client.get("/metrics", headers=outside)
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers={**outside, **bearer("d3_garbage")}).status_code == 401
    forbidden = client.get("/metrics", headers={**outside, **bearer(user)})
    assert forbidden.status_code == 403 and forbidden.get_json()["error"]["code"] == "forbidden"
    assert client.get("/metrics", headers={**outside, **api_key(admin)}).status_code == 200

    narrow = secure_app(tmp_path / "narrow", tiny_engine, METRICS_ALLOW="10.1.0.0/16")
    narrow_client = narrow.test_client()
    assert narrow_client.get("/metrics").status_code == 401  # loopback is no longer on the list
    assert narrow_client.get("/metrics", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200


# -- values --------------------------------------------------------------------------------
def test_metrics_count_requests_predictions_batches_and_video_jobs(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine)
    key = new_key(app, "alice")
    client = app.test_client()
    before = scrape(client)
    for seed in range(3):
        assert post_image(client, image_bytes(seed=400 + seed), headers=bearer(key), threshold="0").status_code == 200
    assert post_image(client, image_bytes(seed=410), headers=bearer(key), threshold="1").status_code == 200
    batch = client.post("/predict/batch", headers=bearer(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(image_bytes(seed=s)), "b.png") for s in (420, 421)] +
                              [(io.BytesIO(b"not an image"), "bad.png")], "threshold": "0"})
    assert batch.get_json()["succeeded"] == 2
    assert post_image(client, b"<html>", headers=bearer(key)).status_code == 415
    assert client.get("/predictions", headers=bearer("d3_nope")).status_code == 401
    with app.extensions["d3"].db.session() as session:  # video jobs in every state, as the video service stores them
        for status in ("queued", "running", "running", "done", "failed"):
            session.add(Prediction(media_type="video", sha256="0" * 64, size_bytes=1, threshold=0.5,
                                   model_version="test", status=status, owner="someone"))
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("d3_http_requests_total", endpoint="predict.predict", method="POST", status="200") == 4
    assert delta("d3_http_requests_total", endpoint="predict.predict", method="POST", status="415") == 1
    assert delta("d3_http_requests_total", endpoint="predictions.list_predictions", method="GET", status="401") == 1
    assert delta("d3_http_request_duration_seconds_count", endpoint="predict.predict") == 5
    assert delta("d3_predictions_total", label="fake", media_type="image") == 5  # 3 single + 2 in the batch
    assert delta("d3_predictions_total", label="real", media_type="image") == 1
    assert delta("d3_fake_probability_count", media_type="image") == 6
    assert delta("d3_fake_probability_bucket", media_type="image", le="1.0") == 6
    assert delta("d3_inference_batch_size_count") >= 5  # one forward per request at least (shared engine)
    assert delta("d3_inference_batch_size_sum") >= 6
    assert delta("d3_inference_forward_seconds_count") == delta("d3_inference_batch_size_count")
    assert value(after, "d3_inference_queue_depth") == 0
    assert value(after, "d3_gpu_memory_allocated_bytes") == 0  # CPU engine
    assert value(after, "d3_model_ready") == 1
    for status, count in {"queued": 1, "running": 2, "done": 1, "failed": 1}.items():
        assert value(after, "d3_video_jobs", status=status) == count
    # Label values are endpoint names, never raw paths (bounded cardinality).
    client.get(f"/random/{uuid.uuid4()}", headers=bearer(key))
    assert not any("random" in str(labels) for _, labels in scrape(client))


class _SlowLoadingModel(torch.nn.Module):
    """Its warm-up forward waits for the gate: a model load the test can time."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(30)
        return torch.full((x.shape[0],), 0.5)


def test_model_load_time_is_measured(tmp_path):
    """The load time is the scraped app's own engine's, whatever other engines in the process do.

    The gauge is process-wide; it used to be written by a thread per engine whenever that engine
    became ready, so a scrape could report whichever engine finished last (the flaky failure).
    """
    gate = threading.Event()
    engine = InferenceEngine(DetectorConfig(device="cpu"), model=_SlowLoadingModel(gate))
    other_gate = threading.Event()
    other = InferenceEngine(DetectorConfig(device="cpu"), model=_SlowLoadingModel(other_gate))
    engine.start()
    try:
        app = make_app(tmp_path / "slow", engine)
        assert value(scrape(app.test_client()), "d3_model_ready") == 0
        assert value(scrape(app.test_client()), "d3_model_load_seconds") == 0  # not loaded yet
        time.sleep(0.5)
        gate.set()
        assert engine.wait_ready(30)
        loaded = value(scrape(app.test_client()), "d3_model_load_seconds")
        assert 0.5 <= loaded < 30
        assert loaded == pytest.approx(engine.load_seconds)
        # Another engine in the same process loads quickly, later: this app still reports its own.
        other.start()
        other_app = make_app(tmp_path / "fast", other)
        other_gate.set()
        assert other.wait_ready(30) and other.load_seconds < 0.5
        time.sleep(0.2)  # its metrics thread has written the process-wide gauge by now
        assert value(scrape(app.test_client()), "d3_model_load_seconds") == pytest.approx(engine.load_seconds)
        assert value(scrape(other_app.test_client()), "d3_model_load_seconds") == pytest.approx(other.load_seconds)
    finally:
        gate.set()
        other_gate.set()
        engine.stop()
        other.stop()


# -- structured logs ---------------------------------------------------------------------------
def _lines(caplog) -> list[dict]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in caplog.records]


def test_one_json_line_per_request_with_id_key_name_verdict_and_never_the_key(tmp_path, tiny_engine, caplog):
    app = secure_app(tmp_path, tiny_engine)
    key = new_key(app, "alice")
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="d3.request"):
        ok = post_image(client, image_bytes(seed=500), headers=bearer(key), threshold="0")
        given = client.get("/predictions", headers={**api_key(key), "X-Request-ID": "req-from-nginx-42"})
        refused = post_image(client, b"%!PS-Adobe-3.0 EPSF-3.0", headers=bearer(key))
        bad_key = client.get("/predictions", headers=bearer(key[:-1] + "x"))
        key_in_path = client.get(f"/{key}", headers=bearer(key))
        reused = post_image(client, image_bytes(seed=500), headers=bearer(key), threshold="0")
    requests = [line for line in _lines(caplog) if line["logger"] == "d3.request"]
    assert len(requests) == 6
    first, second, third, fourth, fifth, sixth = requests
    assert first["request_id"] == ok.headers["X-Request-ID"] and re.fullmatch(r"[0-9a-f]{32}", first["request_id"])
    assert first.items() >= {"method": "POST", "path": "/predict", "endpoint": "predict.predict", "status": 200,
                             "key": "alice", "key_id": key.split("_")[1], "media_type": "image",
                             "verdict": "fake", "client": "127.0.0.1"}.items()
    assert first["duration_ms"] > 0 and first["level"] == "INFO" and first["ts"].endswith("Z")
    # The model's share of the request, counted for this request only (the thread is reused).
    assert 0 < first["model_ms"] < first["duration_ms"]
    assert reused.get_json()["reused"] and "model_ms" not in sixth and "model_ms" not in second
    assert second["request_id"] == given.headers["X-Request-ID"] == "req-from-nginx-42"
    assert third["status"] == 415 and third["error"]["code"] == "unsupported_media_type" and refused.status_code == 415
    assert "%!PS" not in json.dumps(third)  # error text, never file contents
    assert fourth["status"] == 401 and fourth["key"] == "anonymous" and bad_key.status_code == 401
    assert fifth["status"] == 404 and fifth["path"] == "/***" and key_in_path.status_code == 404
    secret = key.split("_", 2)[2]
    for record in caplog.records:
        text = JsonFormatter().format(record)
        assert key not in text and secret not in text and key[:-1] not in text


def test_error_lines_carry_the_cause_and_the_request_id_but_no_secrets(tmp_path, tiny_engine, caplog):
    secret = "s3cr3t-" + uuid.uuid4().hex
    app = secure_app(tmp_path, tiny_engine, SECRET_KEY=secret)
    key = new_key(app, "alice")

    @app.get("/boom")  # a route that fails the way a bug would, leaking secrets into its message
    def boom():
        raise RuntimeError(f"exploded with SECRET_KEY={secret} and key {key}")

    with caplog.at_level(logging.INFO):
        response = app.test_client().get("/boom", headers=bearer(key))
    assert response.status_code == 500 and secret not in response.get_data(as_text=True)
    lines = _lines(caplog)
    error = next(line for line in lines if line["logger"] == "api.errors")
    request = next(line for line in lines if line["logger"] == "d3.request")
    assert error["request_id"] == request["request_id"] == response.headers["X-Request-ID"]
    assert "RuntimeError: exploded with SECRET_KEY=*** and key ***" in error["exc"]
    assert request["level"] == "ERROR" and request["status"] == 500 and request["error"]["code"] == "internal_error"
    for record in caplog.records:
        text = JsonFormatter().format(record)
        assert secret not in text and key not in text


# -- two Gunicorn workers ---------------------------------------------------------------------
def _http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # a new connection every time
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def gunicorn_service(tmp_path):
    port = free_port()
    instance = tmp_path / "instance"
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {**os.environ, **TINY_MODEL, "INSTANCE_DIR": str(instance),
           "DATABASE_URL": f"sqlite:///{instance / 'd3.sqlite'}", "BIND": f"127.0.0.1:{port}",
           "AUTH_REQUIRED": "true", "SECRET_KEY": "gunicorn-test-" + uuid.uuid4().hex,
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2",
           "GUNICORN_ACCESS_LOG": str(tmp_path / "access.log"), "GUNICORN_ERROR_LOG": str(tmp_path / "error.log"),
           "RATE_LIMIT_DEFAULT": "100000/minute", "LOG_LEVEL": "INFO", "D3_MAX_WAIT_MS": "0"}
    for name in ("INVOCATION_ID", "JOURNAL_STREAM"):
        env.pop(name, None)  # logs to the files above, as outside systemd
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "d3"), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    created = subprocess.run([str(bin_dir / "d3"), "keys", "create", "--name", "gunicorn-client"], env=env,
                             check=True, capture_output=True, text=True, timeout=120)
    key = created.stdout.strip()
    process = subprocess.Popen([str(bin_dir / "gunicorn"), "-c", "gunicorn_config.py", "api.app:app"], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, 60)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180

        def healthy() -> bool:
            try:  # a worker still importing the app accepts nothing yet: a timeout is "not ready"
                return _http(f"{base}/health")[0] == 200
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                return False

        while not healthy():
            assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()[-3000:]
            assert process.poll() is None, (tmp_path / "error.log").read_text()[-3000:]
            time.sleep(0.2)
        yield {"base": base, "key": key, "dir": tmp_path, "metrics_dir": metrics_dir, "process": process}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _pids_by_path(access_log: Path, path: str, status: int = 200) -> dict[str, int]:
    pids: dict[str, int] = {}
    for line in access_log.read_text().splitlines():
        if f" {path} HTTP/1.1\" {status} " in line:
            pid = re.search(r"pid=<?(\d+)", line).group(1)
            pids[pid] = pids.get(pid, 0) + 1
    return pids


def test_metrics_are_counted_across_two_gunicorn_workers(gunicorn_service):
    base, key, folder = gunicorn_service["base"], gunicorn_service["key"], gunicorn_service["dir"]
    sent = {"fake": 0, "real": 0, "unavailable": 0}
    for attempt in range(200):  # until both workers have served predictions (bounded)
        label_threshold = ("0", "fake") if attempt % 2 == 0 else ("1", "real")
        body, content_type = _multipart(image_bytes(seed=600 + attempt))
        for _ in range(300):  # the second worker may still be loading its model: 503 + Retry-After
            status, _ = _http(f"{base}/predict?threshold={label_threshold[0]}", body,
                              {"Content-Type": content_type, "Authorization": f"Bearer {key}"})
            if status != 503:
                break
            sent["unavailable"] += 1
            time.sleep(0.2)
        assert status == 200
        sent[label_threshold[1]] += 1
        if attempt >= 5 and len(_pids_by_path(folder / "access.log", "/predict?threshold=0")
                                | _pids_by_path(folder / "access.log", "/predict?threshold=1")) >= 2:
            break
    total = sent["fake"] + sent["real"]
    deadline = time.monotonic() + 10
    while True:  # a worker writes its access line just after the response: let the last one land
        served: dict[str, int] = {}
        for path in ("/predict?threshold=0", "/predict?threshold=1"):
            for pid, count in _pids_by_path(folder / "access.log", path, status=200).items():
                served[pid] = served.get(pid, 0) + count
        if sum(served.values()) >= total or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(served) == 2 and sum(served.values()) == total, served  # two worker processes did the work

    status, text = _http(f"{base}/metrics")
    assert status == 200
    data = samples(text.decode())
    assert value(data, "d3_http_requests_total", endpoint="predict.predict", method="POST", status="200") == total
    assert value(data, "d3_predictions_total", label="fake", media_type="image") == sent["fake"]
    assert value(data, "d3_predictions_total", label="real", media_type="image") == sent["real"]
    assert value(data, "d3_http_requests_total", endpoint="predict.predict", method="POST",
                 status="503") == sent["unavailable"]
    assert value(data, "d3_http_request_duration_seconds_count", endpoint="predict.predict") == \
        total + sent["unavailable"]
    assert value(data, "d3_inference_batch_size_sum") == total  # every image went through a forward pass
    assert value(data, "d3_model_ready") == 1
    assert 0 < value(data, "d3_model_load_seconds") < 120
    # Every worker wrote its own files into the shared folder; one scrape summed them.
    worker_files = {p.name for p in gunicorn_service["metrics_dir"].glob("counter_*.db")}
    assert {f"counter_{pid}.db" for pid in served} <= worker_files
    # And from outside the allow-list, without an admin key: refused.
    assert _http(f"{base}/metrics", headers={"X-Forwarded-For": "203.0.113.9"})[0] == 401

    # The workers' log lines are JSON, one per request, and the key is in none of the logs.
    lines = (folder / "error.log").read_text().splitlines()
    app_lines = [json.loads(line) for line in lines if line.startswith("{")]
    requests = [line for line in app_lines if line.get("logger") == "d3.request" and line["path"] == "/predict"]
    assert len(requests) == total + sent["unavailable"]
    requests = [line for line in requests if line["status"] == 200]
    assert len(requests) == total
    assert all(line["key"] == "gunicorn-client" and line["verdict"] in ("fake", "real") for line in requests)
    assert {line["request_id"] for line in requests}.__len__() == total
    for log_file in ("error.log", "access.log"):
        text = (folder / log_file).read_text()
        assert key not in text and key.split("_", 2)[2] not in text


def _raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return raw_exchange(sock, request)


def test_requests_gunicorn_refuses_itself_get_json_errors(gunicorn_service):
    """A request line or header Gunicorn cannot parse never reaches the app: its answer is JSON too."""
    port = int(gunicorn_service["base"].rsplit(":", 1)[1])
    cases = [
        (b"GET /predictions/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # over limit_request_line
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n", 400),  # a control character in a header
        (b"NOT A REQUEST\r\n\r\n", 400),
    ]
    for request, status in cases:
        got, headers, body = _raw_request(port, request)
        assert got == status, (request[:40], got, body[:200])
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] and error["message"], error
    # A request line of 5,000 bytes (over Gunicorn's default of 4,094) reaches the app.
    got, _, body = _raw_request(port, b"GET /predictions/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n"
                                      b"Connection: close\r\n\r\n")
    assert got in (401, 404) and json.loads(body)["error"]["code"], body[:200]
