"""Model throughput: images/s and latency per batch size, through the micro-batcher, GPU memory, precision.

Runs the real ViT-L/14 architecture (D3_BACKBONE default) on seeded random weights, so it needs no
checkpoint; `--tiny` uses the d3-tiny config instead (a smoke run). Prints a markdown report.

    python bench/model_throughput.py --device cuda --precision fp16           # the GPU figures
    python bench/model_throughput.py --device cpu --max-batch 2 --iters 1 --min-seconds 0 \
        --engine-seconds 0 --engine-batch 16 --compare bf16                  # a 2-core CPU, ~5 min
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.detector.config import (
    IMAGE_SIZE,  # noqa: E402
    DetectorConfig,  # noqa: E402
)
from api.detector.engine import InferenceEngine  # noqa: E402
from api.detector.factory import build_model, resolve_device, resolve_precision  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: torch.nn.Module, batch: int, device: torch.device, iters: int, min_seconds: float,
                 warm_up: bool) -> float:
    """Median seconds per forward of `batch` images (after a warm-up forward when asked)."""
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.inference_mode():
        if warm_up:
            model(x)
            sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            model(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gib(model: torch.nn.Module, batch: int, device: torch.device) -> float:
    """Peak GPU memory (weights + activations) of one forward at `batch`, in GiB."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def engine_throughput(config: DetectorConfig, model: torch.nn.Module, callers: int,
                      seconds: float) -> tuple[float, float, dict]:
    """(images/s, median call latency s, engine stats) for `callers` threads submitting one image at a time."""
    engine = InferenceEngine(config, model=model)
    engine.start()
    if not engine.wait_ready(600):
        raise SystemExit(f"engine failed: {engine.load_error}")
    images = [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(i))
              for i in range(callers)]
    barrier = threading.Barrier(callers + 1)
    latencies: list[float] = []
    done = [0] * callers
    deadline = [0.0]

    def caller(i: int) -> None:
        barrier.wait()
        while done[i] == 0 or time.perf_counter() < deadline[0]:  # every caller submits at least once
            t0 = time.perf_counter()
            engine.predict([images[i]], timeout=600)
            latencies.append(time.perf_counter() - t0)
            done[i] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    engine.stop()
    return sum(done) / elapsed, statistics.median(latencies), stats


def max_prob_diff(config: DetectorConfig, reference: torch.nn.Module, precision: str, n: int,
                  device: torch.device) -> float:
    """Max |p_precision - p_fp32| over n random images, same random weights."""
    other = build_model(DetectorConfig(**{**config.__dict__, "precision": precision}))
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123)).to(device)
    with torch.inference_mode():
        diff = (other(x) - reference(x)).abs().max().item()
    del other
    return diff


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--backbone", default="ViT-L-14-quickgelu")
    parser.add_argument("--tiny", action="store_true", help="use the d3-tiny backbone (smoke run)")
    parser.add_argument("--max-batch", type=int, default=128, help="largest batch size (powers of two from 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per batch size (at least)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each batch size at least this long")
    parser.add_argument("--callers", type=int, default=16, help="concurrent single-image callers")
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="how long the callers run")
    parser.add_argument("--engine-batch", type=int, default=32, help="the engine's max batch size")
    parser.add_argument("--compare", default="fp16,bf16", help="precisions to compare with fp32 ('' = none)")
    parser.add_argument("--compare-images", type=int, default=None, help="images for the comparison")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    backbone = "d3-tiny" if args.tiny else args.backbone
    config = DetectorConfig(backbone=backbone, clip_weights="random:0", head_weights="random:0",
                            device=str(device), precision=precision, max_batch_size=args.engine_batch,
                            max_wait_ms=5.0, queue_size=4096)
    t0 = time.perf_counter()
    model = build_model(config)
    build_s = time.perf_counter() - t0
    print(f"# Model throughput: {backbone}, {precision}, {machine(device)}", flush=True)
    print(f"\ntorch {torch.__version__}; model built in {build_s:.1f} s; version {model.model_version}\n")

    rows: list[tuple[int, float, float]] = []
    batch = 1
    while batch <= args.max_batch:
        try:
            # A GPU warms up per shape (kernel choice, allocator); a CPU only needs the very first call.
            warm_up = device.type == "cuda" or batch == 1
            seconds = time_forward(model, batch, device, args.iters, args.min_seconds, warm_up)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory", flush=True)
            break
        rows.append((batch, seconds, batch / seconds))
        print(f"batch {batch}: {seconds * 1000:.1f} ms/forward, {batch / seconds:.2f} images/s", file=sys.stderr,
              flush=True)
        batch *= 2
    print("| batch | latency per forward (ms) | images/s |\n|---:|---:|---:|")
    for b, seconds, ips in rows:
        print(f"| {b} | {seconds * 1000:.1f} | {ips:.2f} |")
    best_batch, _, best_ips = max(rows, key=lambda r: r[2])
    print(f"\nbest: {best_ips:.2f} images/s at batch {best_batch}")

    if device.type == "cuda":
        print(f"GPU peak memory at batch 64: {peak_memory_gib(model, 64, device):.2f} GiB "
              f"(weights alone: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB)")

    ips, latency, stats = engine_throughput(config, model, args.callers, args.engine_seconds)
    mean_batch = stats["images_processed"] / max(stats["batches_run"], 1)
    print(f"micro-batcher, {args.callers} concurrent single-image callers: {ips:.2f} images/s "
          f"({100 * ips / best_ips:.0f} % of best-batch throughput), median call latency {latency * 1000:.0f} ms, "
          f"mean batch {mean_batch:.1f}")

    compare = [p for p in args.compare.split(",") if p and p != "fp32"]
    if compare:
        n = args.compare_images or (64 if device.type == "cuda" else 1)
        reference = model if precision == "fp32" else build_model(DetectorConfig(**{**config.__dict__,
                                                                                    "precision": "fp32"}))
        for other in compare:
            try:
                diff = max_prob_diff(config, reference, other, n, device)
                print(f"max |p_{other} - p_fp32| over {n} random images (random weights): {diff:.2e}")
            except Exception as exc:  # e.g. a precision the device does not support
                print(f"{other} vs fp32: not measured ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
