"""Load benchmark of the HTTP API: requests/s and latency percentiles for /predict and /predict/batch.

Starts a real Gunicorn (gunicorn_config.py) on a free loopback port on the embedded defaults, drives
it with 1, 8 and 32 concurrent clients, and reads the service's own cost per single-image request
from the service's request log: duration_ms - model_ms (the time that request spent waiting on the
model), request by request. For comparison it also measures the model alone in this process, through
the engine and as a bare forward, and prints the service's time beyond each.

    .venv/bin/python bench/api_load.py --tiny                  # the service's own cost
    .venv/bin/python bench/api_load.py --requests 16 --concurrency 1 8   # real ViT-L/14 architecture

Prints a markdown table; nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(count: int, size: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_service(env: dict[str, str], workdir: Path, port: int) -> subprocess.Popen:
    subprocess.run([sys.executable, "-m", "api.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn_config.py", "api.app:app"],
                               env=env, cwd=ROOT, stdout=open(workdir / "gunicorn.log", "w"),  # noqa: SIM115 - lives with the process
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.RequestException:  # not listening yet, or still booting
            pass
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited; see {workdir / 'gunicorn.log'}")
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("service not ready in 600 s")


def drive(url: str, images: list[bytes], requests_total: int, concurrency: int, endpoint: str, batch: int) -> dict:
    session_per_thread: dict[int, requests.Session] = {}

    request_ids: list[str] = []

    def one(index: int) -> float:
        import threading

        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        started = time.perf_counter()
        if endpoint == "/predict":
            files = [("file", (f"{index}.jpg", images[index % len(images)], "image/jpeg"))]
        else:
            files = [("files", (f"{index}-{j}.jpg", images[(index + j) % len(images)], "image/jpeg"))
                     for j in range(batch)]
        response = session.post(url + endpoint, files=files, params={"reuse": "false"}, timeout=86400)
        response.raise_for_status()
        elapsed = (time.perf_counter() - started) * 1000.0
        request_ids.append(response.headers["X-Request-ID"])
        return elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests_total)))
    elapsed = time.perf_counter() - started
    return {"rps": requests_total / elapsed, "images_s": requests_total * batch / elapsed,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "request_ids": request_ids}


def server_timings(log_file: Path, request_ids: list[str]) -> tuple[list[float], list[float]]:
    """Per request, from the service's JSON request log (matched by request id): its whole time
    (duration_ms) and its own time beyond the model (duration_ms - model_ms)."""
    wanted, whole, own = set(request_ids), [], []
    for line in log_file.read_text().splitlines():
        if '"request_id"' not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("request_id") in wanted:
            whole.append(float(record["duration_ms"]))
            own.append(float(record["duration_ms"]) - float(record.get("model_ms", 0.0)))
    return whole, own


def engine_latency(env: dict[str, str], images: list[bytes], repeats: int) -> tuple[float, float]:
    """p50s of the model alone in this process, one image: (through the engine, the bare forward).

    Through the engine: preprocessed tensor in, probability out, so its batching window
    (D3_MAX_WAIT_MS) and thread hand-off count as the model's. The bare forward is the stricter
    baseline: the model's own computation and nothing else.
    """
    import torch

    from api.config import load_settings
    from api.detector import DetectorConfig, InferenceEngine, preprocess_image

    engine = InferenceEngine(DetectorConfig.from_settings(load_settings(env, environ={})))
    engine.start()
    if not engine.wait_ready(600):
        raise SystemExit(f"engine failed: {engine.load_error}")
    tensor = preprocess_image(Image.open(io.BytesIO(images[0])))
    through_engine, bare = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.predict([tensor])
        through_engine.append((time.perf_counter() - started) * 1000.0)
    engine.stop()
    batch = tensor.unsqueeze(0).to(engine.device)
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            engine.model(batch).float().cpu()
            bare.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(through_engine), statistics.median(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (the service's own cost)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=8, help="images per /predict/batch request")
    parser.add_argument("--max-wait-ms", help="D3_MAX_WAIT_MS, the batching window (default: the service's)")
    parser.add_argument("--max-batch-size", help="D3_MAX_BATCH_SIZE (default: the service's; on a CPU the best is 1)")
    parser.add_argument("--best-batch-images-s", type=float,
                        help="the engine's best-batch images/s from bench/model_throughput.py, to compare with")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--threads", default="32")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="d3-bench-"))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("D3_", "MINIO_"))},
           "BIND": f"127.0.0.1:{port}", "AUTH_REQUIRED": "false", "INSTANCE_DIR": str(workdir / "instance"),
           "GUNICORN_WORKERS": args.workers, "GUNICORN_THREADS": args.threads, "GUNICORN_LOG_DIR": str(workdir),
           "D3_BACKBONE": "d3-tiny" if args.tiny else "ViT-L-14-quickgelu", "D3_CLIP_WEIGHTS": "random:0",
           "D3_HEAD_WEIGHTS": "random:0", "D3_DEVICE": args.device, "D3_PRECISION": args.precision,
           "RATE_LIMIT_DEFAULT": "1000000/second", "LOG_LEVEL": "INFO"}
    if args.max_wait_ms is not None:
        env["D3_MAX_WAIT_MS"] = args.max_wait_ms
    if args.max_batch_size is not None:
        env["D3_MAX_BATCH_SIZE"] = args.max_batch_size
    if not args.tiny:  # ViT-L/14 on a CPU takes minutes per batch: never let the engine time out here
        env["D3_INFER_TIMEOUT_S"] = "86400"
    images = make_images(64)
    model_env = {k: env[k] for k in env if k.startswith("D3_")}
    engine_p50, forward_p50 = engine_latency(model_env, images, repeats=50 if args.tiny else 5)
    process = start_service(env, workdir, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        drive(url, images, min(10, args.requests), 1, "/predict", 1)  # warm the connections and the model
        for endpoint, batch in (("/predict", 1), ("/predict/batch", args.batch_size)):
            for concurrency in args.concurrency:
                total = max(concurrency, args.requests // (batch if batch > 1 else 1))
                rows.append((endpoint, concurrency, batch, drive(url, images, total, concurrency, endpoint, batch)))
    finally:
        process.terminate()
        process.wait(30)

    model = "d3-tiny (random)" if args.tiny else "ViT-L/14 architecture (random weights)"
    print(f"\nAPI load: {model}, device {args.device}, precision {args.precision}, "
          f"gunicorn {args.workers} worker(s) x {args.threads} threads; {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} CPUs\n")
    print(f"engine alone, one image, p50: {engine_p50:.1f} ms (bare forward: {forward_p50:.1f} ms)\n")
    print("| endpoint | clients | images/request | requests/s | images/s | p50 ms | p95 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for endpoint, concurrency, batch, r in rows:
        print(f"| {endpoint} | {concurrency} | {batch} | {num(r['rps'])} | {num(r['images_s'])} | {num(r['p50'])} | "
              f"{num(r['p95'])} | {num(r['p99'])} |")

    single = next((r for e, c, b, r in rows if e == "/predict" and c == 1), None)
    if single is not None:
        whole, own = server_timings(workdir / "error.log", single["request_ids"])
        server_p50 = percentile(whole, 50)
        print(f"\n/predict, one client, p50: the service's own time {percentile(own, 50):.1f} ms per request "
              f"(duration_ms - model_ms of its request log, request by request); server-side {server_p50:.1f} ms "
              f"= engine-alone + {server_p50 - engine_p50:.1f} ms = bare forward + {server_p50 - forward_p50:.1f} "
              f"ms; client-side {single['p50']:.1f} ms = engine-alone + {single['p50'] - engine_p50:.1f} ms")
    reference = args.best_batch_images_s or 1000.0 / engine_p50
    what = "the best batch given" if args.best_batch_images_s else "the engine alone one image at a time"
    for endpoint, concurrency, _, r in rows:
        if concurrency == max(args.concurrency):
            print(f"{endpoint}, {concurrency} clients: {num(r['images_s'])} images/s = "
                  f"{100 * r['images_s'] / reference:.0f} % of {what} ({num(reference)} images/s)")


def num(value: float) -> str:
    """Three significant figures for small values (CPU runs of the real model), one decimal otherwise."""
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


if __name__ == "__main__":
    main()
