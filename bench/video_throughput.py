"""Video throughput: probe, sample, preprocess and infer, for a 30 s 1080p and a 10 min 720p clip.

Makes its own clips in a temporary folder (OpenCV's MPEG-4 writer; H.264 copies with libx264 when an
`ffmpeg` command is installed, since real uploads are mostly H.264 with long GOPs), then measures:

- probe: a child-process probe of the file (warm spare decoder), median of 3;
- sample n = 32 and 128 frames with each decoding strategy of api/utils/video_probe.py: `seek`
  (CAP_PROP_POS_FRAMES per sampled frame), `sequential` (grab every frame, retrieve only the sampled
  ones) and `auto` (the cost model the service uses), frames squashed to 224 px in the child;
- preprocess: `preprocess_image` in the parent for the sampled frames;
- infer: the tiny model (d3-tiny) and the real ViT-L/14 architecture on random weights (`--real`,
  32 frames: on a CPU one frame costs seconds), through the batching InferenceEngine;
- end to end: POST /predict/video on the app (sync, tiny model, embedded store), 32 and 128 frames.

    .venv/bin/python bench/video_throughput.py --real                  # everything (~15 min on 2 cores)
    .venv/bin/python bench/video_throughput.py --long-minutes 1         # a quicker smoke run
    .venv/bin/python bench/video_throughput.py --real --device cuda     # the GPU figures

Prints markdown tables; nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.detector import DetectorConfig, InferenceEngine, preprocess_image  # noqa: E402
from api.detector.config import IMAGE_SIZE  # noqa: E402
from api.utils.video_probe import VideoReader, sample_indices  # noqa: E402

TINY = {"backbone": "d3-tiny", "clip_weights": "random:0", "head_weights": "random:0"}
REAL = {"backbone": "ViT-L-14-quickgelu", "clip_weights": "random:0", "head_weights": "random:0"}
LIMITS = {"timeout_s": 3600.0, "memory_mb": 8192}


# -- clips ----------------------------------------------------------------------------------------------
def make_clip(path: Path, width: int, height: int, fps: float, seconds: float) -> float:
    """A textured, moving picture (so the codec has real work): a shifting noise texture, a gradient,
    a bouncing square. Returns seconds spent writing."""
    rng = np.random.default_rng(0)
    # Smooth blobs (noise upscaled 8x): detail a codec must encode, yet compressible like camera footage.
    coarse = rng.integers(0, 64, ((height + 7) // 8, (width + 256 + 7) // 8), dtype=np.uint8)
    texture = cv2.resize(coarse, ((width + 256 + 7) // 8 * 8, (height + 7) // 8 * 8),
                         interpolation=cv2.INTER_LINEAR)[:height, :width + 256]
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = ((xx * 255) // max(1, width - 1)).astype(np.uint8)
    frame = np.empty((height, width, 3), np.uint8)
    started = time.perf_counter()
    partial = path.with_name(path.stem + ".part.mp4")  # renamed when complete: a killed run leaves no clip
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write mp4v here")
    count = int(round(fps * seconds))
    side = height // 6
    for i in range(count):
        shift = (i * 3) % 256
        tex = texture[:, shift:shift + width]
        frame[..., 0] = gradient // 2 + tex
        frame[..., 1] = gradient // 3 + tex + np.uint8(i % 64)  # uint8 arithmetic wraps by itself
        frame[..., 2] = 255 - gradient // 2
        x = (i * 7) % (width - side)
        y = (i * 5) % (height - side)
        frame[y:y + side, x:x + side] = (i * 11) % 256
        writer.write(frame)
    writer.release()
    partial.rename(path)
    return time.perf_counter() - started


def to_h264(source: Path, target: Path) -> float | None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    started = time.perf_counter()
    partial = target.with_name(target.stem + ".part.mp4")
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(source), "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", str(partial)], check=True)
    partial.rename(target)
    return time.perf_counter() - started


# -- measurements ---------------------------------------------------------------------------------------------
def probe_seconds(path: Path) -> tuple[float, object]:
    times, info = [], None
    for _ in range(3):
        started = time.perf_counter()
        with VideoReader(path, **LIMITS) as reader:
            info = reader.probe()
        times.append(time.perf_counter() - started)
    return statistics.median(times), info


def decode(path: Path, indices: list[int], strategy: str) -> tuple[float, list, dict]:
    with VideoReader(path, **LIMITS) as reader:
        reader.probe()
        started = time.perf_counter()
        frames = list(reader.frames(indices, IMAGE_SIZE, strategy))
        elapsed = time.perf_counter() - started
        return elapsed, frames, reader.stats


def preprocess(frames: list) -> tuple[float, list]:
    started = time.perf_counter()
    tensors = [preprocess_image(Image.frombytes("RGB", (f.width, f.height), f.rgb)) for f in frames if f.rgb]
    return time.perf_counter() - started, tensors


def start_engine(spec: dict, device: str, precision: str, batch: int) -> tuple[InferenceEngine, float]:
    started = time.perf_counter()
    engine = InferenceEngine(DetectorConfig(device=device, precision=precision, max_batch_size=batch,
                                            infer_timeout_s=3600, **spec))
    engine.start()
    if not engine.wait_ready(1800):
        raise SystemExit(f"model failed to load: {engine.load_error}")
    return engine, time.perf_counter() - started


def infer(engine: InferenceEngine, tensors: list) -> float:
    started = time.perf_counter()
    engine.predict(tensors, timeout=3600)
    return time.perf_counter() - started


def end_to_end(path: Path, frames: int, engine: InferenceEngine, workdir: Path) -> tuple[float, dict]:
    from api import create_app
    from api.database import upgrade_schema

    instance = workdir / f"instance-{path.stem}-{frames}"
    upgrade_schema(f"sqlite:///{instance / 'd3.sqlite'}")
    app = create_app({"INSTANCE_DIR": str(instance), "AUTH_REQUIRED": "false", "SECRET_KEY": "bench-secret",
                      "RATE_LIMIT_VIDEO": "1000/minute", "MAX_VIDEO_BYTES": str(4 * 1024 ** 3),
                      "MAX_VIDEO_SECONDS": "3600", "VIDEO_ASYNC_SECONDS": "3600",
                      "VIDEO_ASYNC_BYTES": str(4 * 1024 ** 3), "MAX_VIDEO_FRAMES": "256"}, engine=engine)
    client = app.test_client()
    data = path.read_bytes()
    started = time.perf_counter()
    response = client.post("/predict/video", data={"file": (io.BytesIO(data), path.name), "frames": str(frames)},
                           content_type="multipart/form-data")
    elapsed = time.perf_counter() - started
    body = response.get_json()
    if response.status_code != 200:
        raise SystemExit(f"end-to-end request failed: {response.status_code} {body}")
    return elapsed, body


# -- report ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of the 720p clip (default 10)")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--real", action="store_true", help="also infer with the real ViT-L/14 architecture")
    parser.add_argument("--real-frames", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-h264", action="store_true", help="skip the H.264 copies even if ffmpeg exists")
    parser.add_argument("--workdir", help="keep clips here instead of a temporary folder")
    args = parser.parse_args()

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="d3-video-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    clips: list[tuple[str, str, Path]] = []
    notes: list[str] = []
    for label, width, height, fps, seconds in [("30 s 1080p", 1920, 1080, 30.0, 30.0),
                                               (f"{args.long_minutes:g} min 720p", 1280, 720, 24.0,
                                                args.long_minutes * 60)]:
        path = workdir / f"{width}x{height}-{int(seconds)}s.mp4"
        if not path.exists():
            spent = make_clip(path, width, height, fps, seconds)
            notes.append(f"wrote {label} MPEG-4 ({path.stat().st_size / 1e6:.0f} MB) in {spent:.0f} s")
        clips.append((label, "MPEG-4 (mp4v)", path))
        if not args.no_h264:
            h264 = path.with_name(path.stem + "-h264.mp4")
            spent = 0.0 if h264.exists() else to_h264(path, h264)
            if spent is not None:
                clips.append((label, "H.264 (libx264, GOP 250)", h264))
                notes.append(f"H.264 copy of {label} ({h264.stat().st_size / 1e6:.0f} MB) in {spent:.0f} s")
            else:
                notes.append("no ffmpeg command: H.264 rows skipped")

    tiny, _ = start_engine(TINY, args.device, args.precision, 32)
    decode_rows, pipeline_rows = [], []
    kept_tensors = None
    for label, codec, path in clips:
        probe_s, info = probe_seconds(path)
        for n in args.frames:
            indices = sample_indices(info.frame_count, n)
            results = {}
            for strategy in ("auto", "seek", "sequential"):
                results[strategy] = decode(path, indices, strategy)
                print(f"  {label} {codec} n={n} {strategy}: {results[strategy][0]:.2f} s {results[strategy][2]}",
                      file=sys.stderr, flush=True)
            auto_s, frames, stats = results["auto"]
            decode_rows.append((label, codec, n, probe_s, results["seek"][0], results["sequential"][0], auto_s,
                                stats.get("seeks"), stats.get("grabs")))
            pre_s, tensors = preprocess(frames)
            if kept_tensors is None or len(tensors) > len(kept_tensors):
                kept_tensors = tensors
            infer_s = infer(tiny, tensors)
            pipeline_rows.append((label, codec, n, probe_s, auto_s, pre_s, infer_s))

    e2e_rows = []
    for label, codec, path in clips:
        for n in args.frames:
            elapsed, body = end_to_end(path, n, tiny, workdir)
            e2e_rows.append((label, codec, n, elapsed, body["timings_ms"], body["decoding"]))
            print(f"  end-to-end {label} {codec} n={n}: {elapsed:.2f} s", file=sys.stderr, flush=True)

    real_row = None
    if args.real:
        engine, load_s = start_engine(REAL, args.device, args.precision, 32)
        tensors = (kept_tensors * 4)[:args.real_frames]
        real_row = (len(tensors), infer(engine, tensors), load_s, engine.device, engine.precision)
        engine.stop()
    tiny.stop()

    print(f"\n### Video throughput ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch "
          f"{torch.__version__}, OpenCV {cv2.__version__}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f} at the end.\n")
    print("Decoding n sampled frames (child process, squashed to 224 px), seconds:\n")
    print("| clip | codec | n | probe | seek | sequential | auto (kept) | auto seeks / grabs |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for label, codec, n, probe_s, seek_s, seq_s, auto_s, seeks, grabs in decode_rows:
        print(f"| {label} | {codec} | {n} | {probe_s:.2f} | {seek_s:.2f} | {seq_s:.2f} | {auto_s:.2f} | "
              f"{seeks} / {grabs} |")
    print("\nPipeline with the kept strategy and the tiny model, seconds (frames/s = n / (probe + decode + "
          "preprocess + infer)):\n")
    print("| clip | codec | n | probe | decode | preprocess | infer (tiny) | total | frames/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, codec, n, probe_s, decode_s, pre_s, infer_s in pipeline_rows:
        total = probe_s + decode_s + pre_s + infer_s
        print(f"| {label} | {codec} | {n} | {probe_s:.2f} | {decode_s:.2f} | {pre_s:.3f} | {infer_s:.3f} | "
              f"{total:.2f} | {n / total:.1f} |")
    print("\nEnd to end, POST /predict/video (sync, tiny model, SQLite + local store; includes the upload, "
          "storing the video and the timeline), seconds:\n")
    print("| clip | codec | n | request | decode+infer (overlapped) | inference | frames/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, codec, n, elapsed, timings, _decoding in e2e_rows:
        print(f"| {label} | {codec} | {n} | {elapsed:.2f} | {timings['decode_and_infer_ms'] / 1000:.2f} | "
              f"{timings['inference_ms'] / 1000:.3f} | {n / elapsed:.1f} |")
    if real_row is not None:
        count, seconds, load_s, device, precision = real_row
        print(f"\nReal ViT-L/14 architecture (random weights) on {device} ({precision}): {count} frames inferred in "
              f"{seconds:.1f} s = {count / seconds:.2f} frames/s (model load {load_s:.0f} s).")
    print("\nNotes: " + "; ".join(notes) + ".")


if __name__ == "__main__":
    main()
