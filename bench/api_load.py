"""Load benchmark of the HTTP API: requests/s and latency percentiles for /predict and /predict/batch.

Starts a real Gunicorn (gunicorn_config.py) on a free loopback port on the embedded defaults, drives
it with 1, 8 and 32 concurrent clients, and reads the service's own cost per single-image request
from the service's request log: duration_ms - model_ms (the time that request spent waiting on the
model), request by request. For comparison it also measures the model alone in this process, through
the engine and as a bare forward, and prints the service's time beyond each.

    .venv/bin/python bench/api_load.py --tiny                  # the service's own cost
    .venv/bin/python bench/api_load.py --requests 16 --concurrency 1 8   # real ViT-L/14 architecture

With --inference-tier it also starts `d3 serve-inference` (Triton) on the same model, measures the
tier's own best-batch images/s with a tritonclient loop, then drives the API with D3_INFERENCE_URL
pointing at it (2+ Gunicorn workers sharing the one tier) beside the API with its in-process
engine, and prints the API-through-the-tier share of the tier's best rate (target >= 0.8):

    .venv/bin/python bench/api_load.py --inference-tier --backbone d3-mini --workers 2 --concurrency 32

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


def on_cpus(cpus: list[int] | None):
    """A Popen preexec_fn that keeps the child (and all it starts) on these CPUs; None: anywhere."""
    return None if not cpus else (lambda: os.sched_setaffinity(0, cpus))


def start_service(env: dict[str, str], workdir: Path, port: int, cpus: list[int] | None = None) -> subprocess.Popen:
    subprocess.run([sys.executable, "-m", "api.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn_config.py", "api.app:app"],
                               env=env, cwd=ROOT, stdout=open(workdir / "gunicorn.log", "w"),  # noqa: SIM115 - lives with the process
                               stderr=subprocess.STDOUT, preexec_fn=on_cpus(cpus))
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


# ---------------------------------------------------------------- the inference tier
def start_tier(model_env: dict[str, str], workdir: Path, max_batch: int, queue_delay_us: int,
               cpus: list[int] | None = None) -> dict:
    """`d3 serve-inference` on free loopback ports; returns its process and addresses once ready."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("D3_")}, **model_env,
           "D3_TRITON_MAX_BATCH_SIZE": str(max_batch), "D3_TRITON_MAX_QUEUE_DELAY_MICROSECONDS": str(queue_delay_us),
           "D3_TRITON_MAX_QUEUE_SIZE": "0", "PYTRITON_HOME": str(workdir / "pytriton")}
    argv = [sys.executable, "-m", "api.cli", "serve-inference", "--host", "127.0.0.1", "--http-port",
            str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])]
    log = open(workdir / "tier.log", "w")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=on_cpus(cpus))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the inference tier exited; see {workdir / 'tier.log'}")
        try:
            if requests.get(f"http://127.0.0.1:{ports['http']}/v2/models/d3/ready", timeout=2).status_code == 200:
                return {**ports, "process": process, "grpc": f"127.0.0.1:{ports['grpc']}"}
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_tier({"process": process})
    raise SystemExit("the inference tier was not ready in 900 s")


def stop_tier(tier: dict) -> None:
    import signal

    process = tier["process"]
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def tier_best_batch(address: str, batch_sizes: list[int], seconds: float, clients: int) -> list[tuple[int, float]]:
    """images/s of the tier alone per batch size: `clients` tritonclient loops sending preprocessed
    batches back to back (two keep the next batch queued while one computes)."""
    import threading

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    rows = []
    for batch in batch_sizes:
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        done = [0] * clients
        stop_at = [0.0]

        def loop(i: int, x=x, done=done, stop_at=stop_at, batch=batch) -> None:
            while done[i] == 0 or time.perf_counter() < stop_at[0]:
                request = grpcclient.InferInput("images", list(x.shape), "FP32")
                request.set_data_from_numpy(x)
                client.infer("d3", [request], client_timeout=3600)
                done[i] += batch

        loop(0)  # warm this shape
        done[0] = 0
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        stop_at[0] = started + seconds
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows.append((batch, sum(done) / (time.perf_counter() - started)))
        print(f"tier alone, batch {batch}: {rows[-1][1]:.2f} images/s", file=sys.stderr, flush=True)
    client.close()
    return rows


def wait_all_workers(url: str, image: bytes, workers: int, timeout: float = 900) -> None:
    """/health answered by one worker says nothing of the others' models: wait until enough
    predictions in a row succeed that every worker has served one (503 = still loading)."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 4 * workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"the API's workers were not all ready in {timeout} s")
        response = requests.post(url + "/predict", files={"file": ("w.jpg", image, "image/jpeg")},
                                 params={"reuse": "false"}, timeout=3600)
        streak = streak + 1 if response.status_code == 200 else 0
        if response.status_code != 200:
            time.sleep(1)


def tier_metrics(metrics_port: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text.splitlines():
        if line.startswith("nv_inference_") and 'model="d3"' in line:
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def run_api(env: dict[str, str], workdir: Path, mode: str, workers: int, tier: dict | None = None,
            cpus: list[int] | None = None):
    """Gunicorn in `mode` ("tier": D3_INFERENCE_URL at the tier; "in-process": a model per worker),
    every worker ready and the connections warm; returns (process, url)."""
    port = free_port()
    mode_env = {**env, "BIND": f"127.0.0.1:{port}", "INSTANCE_DIR": str(workdir / f"instance-{mode}"),
                "GUNICORN_LOG_DIR": str(workdir / f"logs-{mode}")}
    if tier is not None:
        mode_env.update({"D3_INFERENCE_URL": f"grpc://{tier['grpc']}", "D3_INFERENCE_TIMEOUT_S": "3600"})
    process = start_service(mode_env, workdir, port, cpus)
    url = f"http://127.0.0.1:{port}"
    wait_all_workers(url, make_images(1)[0], workers)
    return process, url


def run_tier_comparison(args: argparse.Namespace, env: dict[str, str], workdir: Path, images: list[bytes]) -> None:
    """API through the tier vs the tier's best batch, and the API with its in-process engine beside it.

    This CPU's speed drifts by up to 2x within minutes, so the share is measured in paired rounds:
    the tier alone at its best batch, then the API through it, right after each other.

    With --tier-cpus/--api-cpus the tier runs on its own CPUs and the API, its workers and this load
    generator on others, as on a GPU host, where the model does not compete with the API's work."""
    model_env = {k: v for k, v in env.items() if k.startswith("D3_")}
    if args.api_cpus:
        os.sched_setaffinity(0, args.api_cpus)  # this process: the load generator and the tier-alone client
    tier = start_tier(model_env, workdir, args.tier_max_batch, args.tier_queue_delay_us, args.tier_cpus)
    rounds: list[tuple[float, dict]] = []
    in_process: list[tuple[int, dict]] = []
    concurrency = max(args.concurrency)
    total = max(concurrency * 2, args.requests)
    try:
        best_rows = tier_best_batch(tier["grpc"], args.tier_batch_sizes, args.tier_seconds, args.tier_clients)
        best_batch = max(best_rows, key=lambda r: r[1])[0]
        process, url = run_api(env, workdir, "tier", int(args.workers), tier, args.api_cpus)
        try:
            drive(url, images, 4, 2, "/predict", 1)
            for _ in range(args.rounds):
                [(_, alone)] = tier_best_batch(tier["grpc"], [best_batch], args.tier_seconds, args.tier_clients)
                before = tier_metrics(tier["metrics"])
                result = drive(url, images, total, concurrency, "/predict", 1)
                after = tier_metrics(tier["metrics"])
                images_in = after["nv_inference_count"] - before["nv_inference_count"]
                batches = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                result["tier_batch"] = images_in / max(1.0, batches)
                rounds.append((alone, result))
                print(f"round {len(rounds)}: tier alone {alone:.2f}, API {result['images_s']:.2f} images/s",
                      file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(60)
        if not args.no_in_process:
            process, url = run_api(env, workdir, "in-process", int(args.workers), cpus=args.tier_cpus)
            try:
                drive(url, images, 4, 2, "/predict", 1)
                in_process.append((concurrency, drive(url, images, total, concurrency, "/predict", 1)))
            finally:
                process.terminate()
                process.wait(60)
    finally:
        stop_tier(tier)

    print(f"\nInference tier: {env['D3_BACKBONE']} (random weights), device {args.device}; Triton max batch "
          f"{args.tier_max_batch}, {env.get('D3_TRITON_INSTANCES', 'default')} instance(s); API gunicorn "
          f"{args.workers} worker(s) x {args.threads} threads, {concurrency} clients, {total} requests a round; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{cpu_layout(args)}\n")
    print("| tier alone: batch | images/s |\n| --- | --- |")
    for batch, ips in best_rows:
        print(f"| {batch} | {num(ips)} |")
    print(f"\nPaired rounds at the best batch ({best_batch}):\n")
    print("| round | tier alone, images/s | API via the tier, images/s | share | p50 ms | p95 ms | mean tier batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    shares = []
    for index, (alone, r) in enumerate(rounds, 1):
        shares.append(r["images_s"] / alone)
        print(f"| {index} | {num(alone)} | {num(r['images_s'])} | {shares[-1]:.2f} | {num(r['p50'])} | "
              f"{num(r['p95'])} | {r['tier_batch']:.1f} |")
    median_alone = statistics.median(alone for alone, _ in rounds)
    print(f"\nshare of the tier's best through the API: median {statistics.median(shares):.2f} "
          f"(min {min(shares):.2f}, max {max(shares):.2f}; target >= 0.8)")
    for clients, r in in_process:
        print(f"in-process API (a model per worker), {clients} clients: {num(r['images_s'])} images/s = "
              f"{r['images_s'] / median_alone:.2f} of the tier alone's median ({num(median_alone)}); "
              f"p50 {num(r['p50'])} ms, p95 {num(r['p95'])} ms")


def cpu_layout(args: argparse.Namespace) -> str:
    if not args.tier_cpus and not args.api_cpus:
        return "the tier, the API and the load generator share every CPU"
    return (f"the tier on CPUs {args.tier_cpus or 'any'}, the API and the load generator on CPUs "
            f"{args.api_cpus or 'any'} (the in-process API: on the tier's CPUs)")


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
    parser.add_argument("--backbone", help="D3_BACKBONE (default: d3-tiny with --tiny, else ViT-L-14-quickgelu)")
    tier = parser.add_argument_group("inference tier")
    tier.add_argument("--inference-tier", action="store_true",
                      help="API through a Triton tier vs the tier's own best batch (and the in-process API)")
    tier.add_argument("--tier-batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    tier.add_argument("--tier-seconds", type=float, default=5.0, help="tritonclient loop time per batch size")
    tier.add_argument("--tier-clients", type=int, default=2, help="concurrent tritonclient loops")
    tier.add_argument("--tier-max-batch", type=int, default=32, help="D3_TRITON_MAX_BATCH_SIZE of the tier")
    tier.add_argument("--tier-queue-delay-us", type=int, default=2000,
                      help="D3_TRITON_MAX_QUEUE_DELAY_MICROSECONDS of the tier")
    tier.add_argument("--rounds", type=int, default=3, help="paired rounds: the tier alone, then the API through it")
    tier.add_argument("--tier-instances", type=int, help="D3_TRITON_INSTANCES of the tier (default: the setting's)")
    tier.add_argument("--tier-cpus", type=int, nargs="+", help="CPUs of the tier (default: all)")
    tier.add_argument("--api-cpus", type=int, nargs="+", help="CPUs of the API and this load generator (default: all)")
    tier.add_argument("--no-in-process", action="store_true", help="skip the in-process API run")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="d3-bench-"))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("D3_", "MINIO_"))},
           "BIND": f"127.0.0.1:{port}", "AUTH_REQUIRED": "false", "INSTANCE_DIR": str(workdir / "instance"),
           "GUNICORN_WORKERS": args.workers, "GUNICORN_THREADS": args.threads, "GUNICORN_LOG_DIR": str(workdir),
           "D3_BACKBONE": args.backbone or ("d3-tiny" if args.tiny else "ViT-L-14-quickgelu"),
           "D3_CLIP_WEIGHTS": "random:0",
           "D3_HEAD_WEIGHTS": "random:0", "D3_DEVICE": args.device, "D3_PRECISION": args.precision,
           "RATE_LIMIT_DEFAULT": "1000000/second", "LOG_LEVEL": "INFO"}
    if args.max_wait_ms is not None:
        env["D3_MAX_WAIT_MS"] = args.max_wait_ms
    if args.max_batch_size is not None:
        env["D3_MAX_BATCH_SIZE"] = args.max_batch_size
    if not args.tiny:  # ViT-L/14 on a CPU takes minutes per batch: never let the engine time out here
        env["D3_INFER_TIMEOUT_S"] = "86400"
    if args.tier_instances is not None:
        env["D3_TRITON_INSTANCES"] = str(args.tier_instances)
    images = make_images(64)
    if args.inference_tier:
        run_tier_comparison(args, env, workdir, images)
        return
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
