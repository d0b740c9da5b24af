"""Soak test: hours-long behaviour in minutes. Does memory level off, do files or descriptors leak?

Starts a real Gunicorn (gunicorn_config.py, 2 workers) on the tiny model with SQLite and the local
object store (or points at --url), then drives it for --minutes with --clients threads mixing
POST /predict (a new image each time), POST /predict/batch (4 images), GET /predictions and small
sync videos (POST /predict/video). Every --sample-s it samples each worker's RSS and open file
descriptors and counts temporary uploads left in the temp folder. At the end it prints:

- requests, errors by status, p50/p95/p99 latency per kind of request;
- each worker's RSS over time, and its slope in MiB per 1,000 requests (least squares over the
  second half of the run, after warm-up) with the level it settles at;
- open descriptors per worker over time; temporary uploads of its workers (d3-video-<pid>-*,
  d3-job-<pid>-*) in flight during the run and left after it.

    .venv/bin/python bench/soak.py                       # 20 minutes, 24 clients
    .venv/bin/python bench/soak.py --minutes 3 --clients 8

Nothing here asserts a target; record the figures in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY = {"D3_BACKBONE": "d3-tiny", "D3_CLIP_WEIGHTS": "random:0", "D3_HEAD_WEIGHTS": "random:0", "D3_DEVICE": "cpu"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def small_video(folder: Path, frames: int = 20) -> bytes:
    import cv2

    path = folder / "soak.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path.read_bytes()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def leftover_uploads(pids) -> int:
    """Temporary uploads of these worker pids (the names carry the pid; the temp folder may be shared)."""
    folder = tempfile.gettempdir()
    return sum(len(glob.glob(os.path.join(folder, f"d3-{kind}-{pid}-*.upload")))
               for pid in pids for kind in ("video", "job"))


def start_service(workdir: Path, port: int, workers: int, threads: int) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, **TINY, "BIND": f"127.0.0.1:{port}", "AUTH_REQUIRED": "false",
           "INSTANCE_DIR": str(workdir / "instance"), "SECRET_KEY": uuid.uuid4().hex * 2,
           "GUNICORN_WORKERS": str(workers), "GUNICORN_THREADS": str(threads),
           "GUNICORN_LOG_DIR": str(workdir / "logs"), "LOG_LEVEL": "WARNING", "GUNICORN_LOG_LEVEL": "info",
           "RATE_LIMIT_DEFAULT": "100000000/minute", "RATE_LIMIT_VIDEO": "100000000/minute",
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "api.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn_config.py", "api.app:app"],
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # /health from one worker says nothing of the others: a worker accepts no connection before its
    # model is ready (gunicorn_config.post_worker_init), and keep-alive clients that connect while one
    # worker is still loading would all stay on the other. Wait for every worker's "accepting" line.
    error_log = workdir / "logs" / "error.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            accepting = error_log.read_text(errors="replace").count("; accepting requests")
            if accepting >= workers and requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process, env
        except (OSError, requests.RequestException):
            pass
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited; see {workdir / 'logs' / 'error.log'}")
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("service not ready in 600 s")


class Soak:
    def __init__(self, url: str, clients: int, video: bytes) -> None:
        self.url = url
        self.clients = clients
        self.video = video
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter = Counter()
        self.total = 0
        self._seed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def next_seed(self) -> int:
        with self._lock:
            self._seed += 1
            return self._seed

    def request(self, session: requests.Session, count: int) -> tuple[str, requests.Response]:
        if count % 10 == 0:
            files = {"file": ("clip.avi", self.video, "video/x-msvideo")}
            return "video", session.post(self.url + "/predict/video", files=files, data={"frames": "8"}, timeout=300)
        if count % 5 == 0:
            files = [("files", (f"{i}.png", image(self.next_seed()), "image/png")) for i in range(4)]
            return "batch", session.post(self.url + "/predict/batch", files=files, timeout=300)
        if count % 3 == 0:
            return "list", session.get(self.url + "/predictions?limit=20", timeout=300)
        files = {"file": ("x.png", image(self.next_seed()), "image/png")}
        return "predict", session.post(self.url + "/predict", files=files, timeout=300)

    def client(self, index: int) -> None:
        session = requests.Session()
        count = index
        while not self._stop.is_set():
            count += 1
            started = time.perf_counter()
            try:
                kind, response = self.request(session, count)
                status: int | str = response.status_code
            except requests.RequestException as exc:
                kind, status = "error", type(exc).__name__
                session = requests.Session()
            took = time.perf_counter() - started
            with self._lock:
                self.latencies[kind].append(took)
                self.statuses[status] += 1
                self.total += 1

    def run(self, seconds: float, sample_s: float, master_pid: int | None) -> list[dict]:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        samples = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                time.sleep(min(sample_s, max(0.0, seconds - (time.monotonic() - started))))
                workers = children(master_pid) if master_pid else []
                with self._lock:
                    total = self.total
                samples.append({"t": time.monotonic() - started, "requests": total,
                                "rss": {pid: rss_mib(pid) for pid in workers},
                                "fds": {pid: open_fds(pid) for pid in workers},
                                "leftover": leftover_uploads(workers)})
                print(f"  {samples[-1]['t']:6.0f} s  {total:7d} requests  RSS "
                      + " ".join(f"{pid}:{v:.0f}MiB" for pid, v in samples[-1]["rss"].items() if v)
                      + f"  leftover uploads {samples[-1]['leftover']}", flush=True)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(330)
        return samples


def slope_per_1000(samples: list[dict], pid: int) -> tuple[float, float] | None:
    """(MiB per 1,000 requests over the second half, mean RSS over the last quarter)."""
    points = [(s["requests"], s["rss"].get(pid)) for s in samples if s["rss"].get(pid)]
    second_half = points[len(points) // 2:]
    if len(second_half) < 2 or second_half[-1][0] == second_half[0][0]:
        return None
    x = np.array([p[0] for p in second_half], float)
    y = np.array([p[1] for p in second_half], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 1000
    level = float(np.mean([p[1] for p in points[-max(1, len(points) // 4):]]))
    return slope, level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--sample-s", type=float, default=15.0, help="RSS/fd sampling period")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--url", help="drive a running service instead (RSS needs --master-pid)")
    parser.add_argument("--master-pid", type=int, help="Gunicorn master pid of --url, for per-worker RSS")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="d3-soak-"))
    process = None
    if args.url:
        url, master = args.url.rstrip("/"), args.master_pid
    else:
        port = free_port()
        process, _env = start_service(workdir, port, args.workers, args.threads)
        url, master = f"http://127.0.0.1:{port}", process.pid
    print(f"soak: {args.minutes:g} min, {args.clients} clients, {url}; machine: {platform.node()} "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    soak = Soak(url, args.clients, small_video(workdir))
    try:
        samples = soak.run(args.minutes * 60, args.sample_s, master)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    seconds = args.minutes * 60

    print(f"\n### Soak: {args.minutes:g} min, {args.clients} clients, {soak.total} requests "
          f"({soak.total / seconds:.1f}/s)\n")
    print("| status | count |\n| --- | --- |")
    for status, count in sorted(soak.statuses.items(), key=lambda item: str(item[0])):
        print(f"| {status} | {count} |")
    print("\n| request | count | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for kind, values in sorted(soak.latencies.items()):
        p50, p95, p99 = (np.percentile(values, q) * 1000 for q in (50, 95, 99))
        print(f"| {kind} | {len(values)} | {p50:.0f} | {p95:.0f} | {p99:.0f} |")
    pids = sorted({pid for s in samples for pid in s["rss"]})
    if pids:
        print("\n| worker | RSS first MiB | RSS last MiB | level (last quarter) MiB | slope MiB per 1,000 requests "
              "(second half) | fds first | fds last |\n| --- | --- | --- | --- | --- | --- | --- |")
        for pid in pids:
            rss = [s["rss"][pid] for s in samples if s["rss"].get(pid)]
            fds = [s["fds"][pid] for s in samples if s["fds"].get(pid)]
            fit = slope_per_1000(samples, pid)
            level, slope = (f"{fit[1]:.0f}", f"{fit[0]:+.2f}") if fit else ("-", "-")
            print(f"| {pid} | {rss[0]:.0f} | {rss[-1]:.0f} | {level} | {slope} | {fds[0]} | {fds[-1]} |")
        print("\nRSS over time (MiB):")
        for s in samples:
            print(f"  {s['t']:6.0f} s {s['requests']:7d} req  " + "  ".join(
                f"{pid}: {s['rss'].get(pid) or 0:.0f}" for pid in pids))
    # After the service stopped: whatever its workers left behind (in-flight ones are gone by now).
    print(f"\ntemporary uploads of its workers left after the run: {leftover_uploads(pids)} "
          f"(during the run, in flight, last sample: {samples[-1]['leftover'] if samples else '-'})")


if __name__ == "__main__":
    main()
