"""The inference tier: the API through a real Triton server (`d3 serve-inference`, PyTriton).

The tier runs the tiny seeded model; the in-process engine runs the same one, so the two must give
the same probabilities. Failures are real: the tier's whole process group is killed or frozen.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from api.config import ConfigError, load_settings
from api.detector import preprocess_image
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.detector.triton_server import libpython_env
from api.request_log import JsonFormatter
from tests.helpers import TINY_MODEL, app_settings, free_port, image_bytes, make_app, post_form
from tests.video_clips import VIDEO_APP_SETTINGS, clip_bytes, post_video

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 2.0  # D3_INFERENCE_TIMEOUT_S of these tests
SLACK_S = 1.5  # what a loaded 2-core CI machine may add to it
# PyTriton's tensor stores already in /dev/shm when this module is collected: not this run's tiers
# (a run killed earlier on a developer's machine), so not this run's to answer for.
SHM_BEFORE = {p.name for p in Path("/dev/shm").glob("pytrtion*")}  # noqa: S108


@pytest.fixture
def remote_engine(triton_tier):
    engine = RemoteEngine(RemoteConfig(triton_tier.grpc_url, timeout_s=BOUND_S, poll_interval_s=0.5))
    engine.start()
    assert engine.wait_ready(30), engine.load_error
    yield engine
    engine.stop()


@pytest.fixture
def remote_client(tmp_path, remote_engine):
    return make_app(tmp_path / "remote", remote_engine, **VIDEO_APP_SETTINGS).test_client()


@pytest.fixture
def local_client(tmp_path, tiny_engine):
    return make_app(tmp_path / "local", tiny_engine, **VIDEO_APP_SETTINGS).test_client()


def predict(client, data: bytes, name: str = "x.png"):
    return post_form(client, "/predict?reuse=false", [("file", (name, data))])


def in_process(engine, images: list[bytes]) -> list[float]:
    return engine.predict([preprocess_image(Image.open(io.BytesIO(data))) for data in images])


# ------------------------------------------------------------------ the tier itself
def test_the_tier_serves_the_models_identity_health_and_metrics(triton_tier, tiny_engine):
    output = triton_tier.output()
    assert f"grpc://127.0.0.1:{triton_tier.grpc_port}" in output and "UNTRAINED" in output
    assert requests.get(f"{triton_tier.http_url}/v2/health/ready", timeout=5).status_code == 200
    assert requests.get(f"{triton_tier.http_url}/v2/models/d3/ready", timeout=5).status_code == 200
    config = requests.get(f"{triton_tier.http_url}/v2/models/d3/config", timeout=5).json()
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters["d3_model_version"] == tiny_engine.model_version
    assert parameters["d3_trained"] == "false" and parameters["d3_device"] == "cpu"
    # Triton owns the batching, with the settings' values.
    batching = config["dynamic_batching"]
    assert config["max_batch_size"] == 64 and batching["max_queue_delay_microseconds"] == 10000
    assert batching["default_queue_policy"]["max_queue_size"] == 8
    assert "nv_inference_count" in triton_tier.metrics()
    # One instance of the model (D3_TRITON_INSTANCES' default); the float32 images or their uint8
    # pixels, either optional.
    assert [group["count"] for group in config["instance_group"]] == [1]
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["images"]["data_type"] == "TYPE_FP32" and inputs["pixels"]["data_type"] == "TYPE_UINT8"
    assert inputs["images"]["optional"] and inputs["pixels"]["optional"]


def test_the_tier_scores_pixels_and_images_alike_even_in_one_batch(triton_tier, tiny_engine):
    import numpy as np
    import tritonclient.grpc as grpcclient

    from api.detector.preprocess import pixels_of

    images = np.stack([preprocess_image(Image.open(io.BytesIO(image_bytes(seed=s)))).numpy() for s in range(3)])
    pixels = pixels_of(images)
    assert pixels is not None and pixels.dtype == np.uint8
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton_tier.grpc_port}")

    def request(name: str, array, datatype: str, head: bool) -> list:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs = [tensor]
        if head:  # what the API adds; a stock client does not
            version = grpcclient.InferInput("head_version", [len(array), 1], "BYTES")
            version.set_data_from_numpy(np.array([[b""]] * len(array), dtype=np.object_))
            inputs.append(version)
        return inputs

    try:
        # Sent together, inside the tier's 10 ms window: requests with other inputs meet in one
        # batch and must each be answered, not fail the batch.
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.infer, "d3", request(*args)) for args in (
                ("images", images, "FP32", False), ("pixels", pixels, "UINT8", True),
                ("images", images, "FP32", True), ("pixels", pixels, "UINT8", False))]
            answers = [f.result().as_numpy("fake_probability").reshape(-1).tolist() for f in futures]
    finally:
        client.close()
    assert answers[0] == answers[1] == answers[2] == answers[3]  # bit for bit
    assert answers[0] == pytest.approx(in_process(tiny_engine, [image_bytes(seed=s) for s in range(3)]), abs=1e-6)


def test_the_command_re_executes_with_its_own_libpython():
    # The tier fixture strips LD_LIBRARY_PATH, so every tier in these tests went through this.
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    env = libpython_env({"LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu:" + libdir})
    if env is None:
        pytest.skip("this interpreter has no shared libpython: nothing to re-exec for")
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/usr/lib/x86_64-linux-gnu"
    assert libpython_env(env) is None  # already first: no loop


def test_serve_inference_refuses_clashing_ports():
    result = subprocess.run([sys.executable, "-m", "api.cli", "serve-inference", "--http-port", "9100",
                             "--grpc-port", "9100", "--metrics-port", "9102"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **TINY_MODEL})
    assert result.returncode == 2 and "ports must differ" in result.stderr


def test_both_engines_have_the_one_interface(tiny_engine):
    from api.detector.interface import Engine

    remote = RemoteEngine(RemoteConfig(f"grpc://127.0.0.1:{free_port()}"))
    assert isinstance(tiny_engine, Engine) and isinstance(remote, Engine)
    for name in ("ready", "trained", "model_version", "load_error"):
        assert hasattr(remote, name) and hasattr(tiny_engine, name)


def test_inference_url_is_validated():
    with pytest.raises(ConfigError, match="D3_INFERENCE_URL"):
        load_settings({"D3_INFERENCE_URL": "10.0.0.5:8001"}, environ={})
    assert load_settings({"D3_INFERENCE_URL": "grpc://10.0.0.5:8001"}, environ={}).d3_inference_url


# ------------------------------------------------------------------ same scores, same API
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_settings_switch_the_api_to_the_tier(tmp_path, triton_tier, tiny_engine, protocol):
    url = triton_tier.grpc_url if protocol == "grpc" else triton_tier.http_url
    app = make_app(tmp_path, None, D3_INFERENCE_URL=url, D3_INFERENCE_TIMEOUT_S=str(BOUND_S))
    engine = app.extensions["d3"].engine
    try:
        assert isinstance(engine, RemoteEngine) and engine.wait_ready(30), engine.load_error
        client = app.test_client()
        health = client.get("/health").get_json()
        assert health["ready"] and health["model"]["model_version"] == tiny_engine.model_version
        assert health["model"]["trained"] is False and health["model"]["inference_tier"]["ready"] is True
        tier = health["systems"]["inference_tier"]  # the background prober's own check of the tier
        assert tier["ok"] is True and tier["model_version"] == tiny_engine.model_version and tier["url"] == url
        assert "random" in health["warning"]
        data = image_bytes(seed=11)
        body = predict(client, data).get_json()
        assert body["model_version"] == tiny_engine.model_version
        assert abs(body["fake_probability"] - in_process(tiny_engine, [data])[0]) <= 1e-6
    finally:
        engine.stop()


def test_predict_and_batch_match_the_in_process_engine(remote_client, local_client, triton_tier):
    images = [image_bytes(seed=s, size=(40 + 9 * s, 30 + 5 * s)) for s in range(6)]
    for data in images[:3]:
        remote, local = predict(remote_client, data), predict(local_client, data)
        assert remote.status_code == local.status_code == 200, remote.get_json()
        assert abs(remote.get_json()["fake_probability"] - local.get_json()["fake_probability"]) <= 1e-6
        assert remote.get_json()["model_version"] == local.get_json()["model_version"]

    before = triton_tier.metrics()
    fields = [("files", (f"{i}.png", data)) for i, data in enumerate(images)]
    remote = post_form(remote_client, "/predict/batch?reuse=false", fields)
    after = triton_tier.metrics()
    local = post_form(local_client, "/predict/batch?reuse=false", fields)
    assert remote.status_code == local.status_code == 200, remote.get_json()
    r, loc = remote.get_json()["results"], local.get_json()["results"]
    assert [x["fake_probability"] for x in r] == pytest.approx([x["fake_probability"] for x in loc], abs=1e-6)
    # The batch's items went to the tier as one request of six images.
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 1
    assert after["nv_inference_count"] - before["nv_inference_count"] == 6


def test_the_api_sends_pixels_and_falls_back_to_floats(remote_engine, tiny_engine):
    import torch

    sent: list[str] = []
    send = remote_engine._send

    def spy(inputs, *args):
        sent.append(inputs[0][2])
        return send(inputs, *args)

    remote_engine._send = spy
    images = [preprocess_image(Image.open(io.BytesIO(image_bytes(seed=s)))) for s in range(2)]
    assert remote_engine.predict(images) == pytest.approx(tiny_engine.predict(images), abs=1e-6)
    # Tensors that are not normalised 8-bit pixels go as they are, and still score as in-process.
    noise = [torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    assert remote_engine.predict(noise) == pytest.approx(tiny_engine.predict(noise), abs=1e-6)
    assert sent == ["UINT8", "FP32"]


def test_video_frames_match_the_in_process_engine(remote_client, local_client, tmp_path):
    data = clip_bytes(tmp_path, levels=[(53 * i + 7) % 256 for i in range(20)])
    remote, local = post_video(remote_client, data, frames="10"), post_video(local_client, data, frames="10")
    assert remote.status_code == local.status_code == 200, remote.get_json()
    rf, lf = remote.get_json()["frames"], local.get_json()["frames"]
    assert len(rf) == len(lf) == 10
    assert [f["fake_probability"] for f in rf] == pytest.approx([f["fake_probability"] for f in lf], abs=1e-6)
    assert len({round(f["fake_probability"], 6) for f in rf}) > 1  # the frames really differ


def test_request_log_splits_out_the_tiers_share(remote_client, caplog):
    with caplog.at_level(logging.INFO, logger="d3.request"):
        assert predict(remote_client, image_bytes(seed=3)).status_code == 200
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "d3.request"]
    assert len(lines) == 1 and 0 < lines[0]["model_ms"] < lines[0]["duration_ms"]


# ------------------------------------------------------------------ two workers, one tier
@pytest.fixture
def slow_batching_tier():
    """A tier of its own that holds a batch open for 100 ms. With the session tier's 10 ms, two workers'
    requests met only by chance (each worker's own overhead is longer than the window), and on a
    loaded machine sometimes never: once two requests share a batch here, their workers answer and
    send again together, so the batches keep mixing the workers."""
    from tests.triton_tier import TritonTier

    tier = TritonTier(TINY_MODEL, D3_TRITON_MAX_QUEUE_DELAY_MICROSECONDS="100000")
    tier.start()
    yield tier
    tier.destroy()


def test_two_gunicorn_workers_share_one_tier(tmp_path, slow_batching_tier, tiny_engine):
    triton_tier = slow_batching_tier
    port = free_port()
    settings = app_settings(tmp_path, BIND=f"127.0.0.1:{port}", D3_INFERENCE_URL=triton_tier.grpc_url,
                            RATE_LIMIT_DEFAULT="1000000/minute")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("D3_")}, **settings,
           "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "1", "GUNICORN_LOG_DIR": str(tmp_path / "logs")}
    subprocess.run([sys.executable, "-m", "api.cli", "db", "upgrade"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn_config.py", "api.app:app"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            log = tmp_path / "logs" / "error.log"
            assert gunicorn.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        images = [image_bytes(seed=100 + i) for i in range(8)]
        before = triton_tier.metrics()

        def one(i: int) -> float:
            response = requests.post(f"{url}/predict?reuse=false", files={"file": ("x.png", images[i % 8])},
                                     timeout=30)
            assert response.status_code == 200, response.text
            return response.json()["fake_probability"]

        with ThreadPoolExecutor(8) as pool:
            probabilities = list(pool.map(one, range(48)))
        after = triton_tier.metrics()
        images_in = after["nv_inference_count"] - before["nv_inference_count"]
        batches = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
        # One worker with one thread has at most one single-image request in flight: every batch
        # larger than one image held requests of both workers.
        assert images_in == 48
        assert batches < images_in, f"{batches} batches for {images_in} images: no batch mixed the workers"
        # ...and the scores are the model's own.
        expected = in_process(tiny_engine, images)
        assert probabilities == pytest.approx([expected[i % 8] for i in range(48)], abs=1e-6)
    finally:
        gunicorn.terminate()
        gunicorn.wait(30)


# ------------------------------------------------------------------ overload, down, hung
def test_a_full_tier_queue_is_503_with_retry_after(tmp_path, triton_tier):
    # The model stops computing; Triton keeps queueing: 8 requests wait, the rest are refused.
    engine = RemoteEngine(RemoteConfig(triton_tier.grpc_url, timeout_s=BOUND_S))
    engine.start()
    assert engine.wait_ready(30), engine.load_error
    app = make_app(tmp_path, engine, RATE_LIMIT_DEFAULT="1000000/minute")
    data = [image_bytes(seed=200 + i) for i in range(4)]
    results = triton_tier.burst(lambda i: predict(app.test_client(), data[i % 4]), 16)
    # Back to normal once Triton has dropped the requests whose deadline passed while they waited.
    deadline = time.monotonic() + 30
    while predict(app.test_client(), data[0]).status_code != 200:
        assert time.monotonic() < deadline, "the tier did not recover from the burst"
        time.sleep(0.3)
    engine.stop()
    assert [status for status, _, _, _ in results] == [503] * 16
    for _, retry_after, body, elapsed in results:
        assert int(retry_after) >= 1 and body["error"]["code"] == "unavailable"
        assert elapsed <= BOUND_S + SLACK_S
    overloaded = [body for _, _, body, _ in results if "overloaded" in body["error"]["message"]]
    # Requests beyond Triton's queue are refused at once. How many arrive while the queue is still full
    # depends on how fast 16 client threads reach it on this CPU, so only the kind is checked.
    assert overloaded, [body for _, _, body, _ in results]
    assert engine.stats()["queue_depth"] == 0
    assert predict(app.test_client(), data[0]).status_code == 503  # the engine was stopped


def test_a_frozen_tier_answers_503_within_the_bound_and_recovers(remote_client, triton_tier):
    assert predict(remote_client, image_bytes(seed=1)).status_code == 200
    triton_tier.pause()
    try:
        started = time.monotonic()
        response = predict(remote_client, image_bytes(seed=2))
        elapsed = time.monotonic() - started
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1, response.get_json()
        assert elapsed <= BOUND_S + SLACK_S, f"a frozen tier held the request for {elapsed:.1f} s"
        started = time.monotonic()
        health = remote_client.get("/health")
        assert time.monotonic() - started < 1.0  # /health never waits on the tier
        # The timed-out call made the engine look at the tier now: unanswered, it is marked down.
        deadline = time.monotonic() + BOUND_S + SLACK_S
        while "inference_tier" not in (health := remote_client.get("/health")).get_json()["down"]:
            assert time.monotonic() < deadline, health.get_json()
            time.sleep(0.1)
        assert health.status_code == 503
        body = health.get_json()
        assert body["systems"]["inference_tier"]["ok"] is False and body["systems"]["inference_tier"]["since"]
    finally:
        triton_tier.resume()
    deadline = time.monotonic() + 30
    while (response := predict(remote_client, image_bytes(seed=2))).status_code != 200:
        assert time.monotonic() < deadline, response.get_json()
        time.sleep(0.5)


def test_a_killed_tier_is_503_and_the_api_recovers_when_it_is_back(remote_client, triton_tier):
    assert predict(remote_client, image_bytes(seed=5)).status_code == 200
    triton_tier.kill()
    started = time.monotonic()
    response = predict(remote_client, image_bytes(seed=6))
    elapsed = time.monotonic() - started
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1, response.get_json()
    assert response.get_json()["error"]["code"] == "unavailable"
    assert elapsed <= BOUND_S + SLACK_S
    health = remote_client.get("/health")
    assert health.status_code == 503
    deadline = time.monotonic() + BOUND_S + SLACK_S
    while "inference_tier" not in (body := remote_client.get("/health").get_json())["down"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert "unavailable" in body["systems"]["inference_tier"]["error"]
    triton_tier.start()  # same ports; the API process is not touched
    deadline = time.monotonic() + 30
    while (response := predict(remote_client, image_bytes(seed=6))).status_code != 200:
        assert time.monotonic() < deadline, response.get_json()
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while (health := remote_client.get("/health")).status_code != 200:
        assert time.monotonic() < deadline, health.get_json()
        time.sleep(0.2)
    assert health.get_json()["systems"]["inference_tier"]["ok"] is True


def test_a_tier_that_never_was_is_503_not_a_hang(tmp_path):
    engine = RemoteEngine(RemoteConfig(f"grpc://127.0.0.1:{free_port()}", timeout_s=BOUND_S))
    engine.start()
    try:
        client = make_app(tmp_path, engine).test_client()
        started = time.monotonic()
        response = predict(client, image_bytes(seed=9))
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert time.monotonic() - started <= BOUND_S + SLACK_S
        body = client.get("/health").get_json()
        assert body["model"]["ready"] is False and "unavailable" in body["model"]["error"]
    finally:
        engine.stop()


def test_no_tier_leaves_files_behind():
    # Shared memory of the tiers above is gone once they stopped (kill included).
    live = {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
    stale = [p.name for p in Path("/dev/shm").glob("pytrtion*")  # noqa: S108
             if p.name[len("pytrtion"):].split("-", 1)[0] not in live and p.name not in SHM_BEFORE]
    assert stale == []


# ------------------------------------------------------------------ production on one host
TIER_UNIT = ROOT / "d3-inference.service"


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_tier_unit_is_hardened_like_the_api_and_the_api_waits_for_it(tmp_path):
    tier, api = directives(TIER_UNIT.read_text()), directives((ROOT / "d3-api.service").read_text())
    hardening = ("NoNewPrivileges", "CapabilityBoundingSet", "ProtectSystem", "ProtectHome", "PrivateTmp",
                 "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectKernelTunables", "ProtectKernelModules",
                 "RestrictNamespaces", "RestrictAddressFamilies", "SystemCallFilter", "LockPersonality",
                 "RemoveIPC", "User", "Group", "EnvironmentFile", "UMask")
    for key in hardening:
        assert tier[key] == api[key], key
    assert tier["ExecStart"] == ["/opt/d3-api/bin/d3 serve-inference"] and tier["Type"] == ["notify"]
    assert any("nvidiactl" in v for v in tier["DeviceAllow"])
    assert "d3-inference.service" in api["Wants"][0] and "d3-inference.service" in api["After"][0]
    # It verifies, pointed at a folder where what it runs exists.
    app = tmp_path / "app"
    for sub in ("instance", "logs", ".cache", "bin"):
        (app / sub).mkdir(parents=True)
    (app / "bin" / "d3").symlink_to(ROOT / ".venv" / "bin" / "d3")
    (app / "current").symlink_to(ROOT)
    (app / ".env").write_text("D3_INFERENCE_URL=grpc://127.0.0.1:8001\n")
    unit = tmp_path / "d3-inference.service"
    unit.write_text(TIER_UNIT.read_text().replace("/opt/d3-api", str(app)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def check_inference(tmp_path: Path, settings: dict[str, str]) -> dict:
    env_file = tmp_path / "check.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    result = subprocess.run(["bash", str(ROOT / "check_deployment.sh"), "--app-dir", str(ROOT), "--env-file",
                             str(env_file), "--json", "--only", "inference"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return report["checks"][0]


def test_check_deployment_checks_the_tier_and_its_model_version(tmp_path, triton_tier):
    settings = {**TINY_MODEL, "SECRET_KEY": "x" * 64, "INSTANCE_DIR": str(tmp_path / "instance")}
    assert check_inference(tmp_path, settings)["status"] == "PASS"  # not used at all
    good = check_inference(tmp_path, {**settings, "D3_INFERENCE_URL": triton_tier.grpc_url})
    assert good["status"] == "PASS" and "d3/d3-tiny/random:0/head-random:0/seed0/fp32" in good["message"], good
    other = check_inference(tmp_path, {**settings, "D3_INFERENCE_URL": triton_tier.http_url,
                                       "D3_HEAD_WEIGHTS": "random:1"})
    assert other["status"] == "FAIL" and "head-random:1" in other["message"] and other["hint"], other
    down = check_inference(tmp_path, {**settings, "D3_INFERENCE_URL": f"grpc://127.0.0.1:{free_port()}",
                                      "D3_INFERENCE_TIMEOUT_S": "2"})
    assert down["status"] == "WARN" and "does not answer" in down["message"] and down["hint"], down


# ------------------------------------------------------------------ the GPU script, on the CPU
def test_gpu_bench_script_runs_on_the_cpu():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**{k: v for k, v in os.environ.items()
                                                            if not k.startswith("D3_")}, "HF_HUB_OFFLINE": "1"})
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # Every figure the GPU run prints is there: per batch size, both precisions, the comparison with
    # fp32, the tier alone, and the API through the tier.
    assert out.count("| batch | latency per forward (ms) | images/s |") == 2
    assert "max |p_bf16 - p_fp32|" in out and "| tier alone: batch | images/s |" in out
    assert "| 1 |" in out.split("Paired rounds at the best batch", 1)[1]
    assert "share of the tier's best through the API: median" in out and "gpu.sh: done in" in out


def test_deploy_installs_the_tier_unit_when_the_url_is_on_this_host(tmp_path):
    from tests.test_deployment import clean_env, make_prefix_venv, source_snapshot

    prefix = tmp_path / "root"
    make_prefix_venv(prefix)
    app = prefix / "opt" / "d3-api"
    (app / ".env").write_text("".join(f"{k}={v}\n" for k, v in {
        **TINY_MODEL, "SECRET_KEY": "s" * 64, "INSTANCE_DIR": str(app / "instance"),
        "D3_CACHE_DIR": str(app / ".cache" / "d3"), "D3_INFERENCE_URL": "grpc://127.0.0.1:8001"}.items()))
    src = source_snapshot(tmp_path / "src")
    result = subprocess.run(["bash", str(src / "deploy.sh"), "--prefix", str(prefix), "--skip-weights", "--no-nginx",
                             "--no-preflight"], capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    unit = prefix / "etc" / "systemd" / "system" / "d3-inference.service"
    text = unit.read_text()
    assert f"ExecStart={app}/bin/d3 serve-inference" in text and "/opt/d3-api" not in text.replace(str(app), "")
    assert "d3-inference.service goes in too" in result.stdout and "(after d3-inference)" in result.stdout
    # Without the URL (the model in each worker) the tier unit is not installed.
    (app / ".env").write_text((app / ".env").read_text().replace("D3_INFERENCE_URL=grpc://127.0.0.1:8001\n", ""))
    unit.unlink()
    again = subprocess.run(["bash", str(src / "deploy.sh"), "--prefix", str(prefix), "--skip-weights", "--no-nginx",
                            "--no-preflight"], capture_output=True, text=True, timeout=600, env=clean_env())
    assert again.returncode == 0 and not unit.exists(), again.stdout[-3000:]
    assert "no d3-inference.service" in again.stdout
