"""A real inference tier for tests: `d3 serve-inference` (PyTriton's Triton server) on loopback ports.

Started as its own process group, so a test can kill it (SIGKILL: the tier is gone) or freeze it
(SIGSTOP: the tier hangs, sockets open) with Triton's own server process and model stub included,
then bring it back on the same ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


SHM = "/dev/shm"  # noqa: S108 - where POSIX shared memory lives


def _mapped_shared_memory() -> set[str]:
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            names.update(line.rsplit("/", 1)[1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
    return names


class TritonTier:
    def __init__(self, model_env: dict[str, str], **tier_env: str) -> None:
        from tests.helpers import free_port

        self.model_env = model_env
        self.tier_env = tier_env
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="d3-tier-"))
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.start_seconds = 0.0
        self._shm_before: set[str] = set()

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_file(self) -> Path:
        return self.dir / f"tier-{self.starts}.log"

    def start(self, timeout: float = 180.0) -> None:
        self.starts += 1
        self._shm_before = set(os.listdir(SHM))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("D3_", "LD_LIBRARY_PATH"))}
        env.update(self.model_env)
        env.update(self.tier_env)
        env["PYTRITON_HOME"] = str(self.dir / "pytriton")  # its workspace, removed with self.dir
        argv = [sys.executable, "-m", "api.cli", "serve-inference", "--host", "127.0.0.1",
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port)]
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the tier exited ({self.process.returncode}):\n{self.log_tail()}")
            # Ready = Triton says so and the command has printed where it listens (just after).
            if "d3 inference tier ready" in self.output() and self.is_ready():
                self.start_seconds = time.monotonic() - (deadline - timeout)
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the tier was not ready in {timeout} s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            return requests.get(f"{self.http_url}/v2/models/d3/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None or not self.is_ready():
            self.stop()
            self.start()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    # -- failures ---------------------------------------------------------------------------
    def _signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def pause(self) -> None:
        """Freeze the whole tier: its sockets stay open and nothing answers (a hung host)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def pause_model(self) -> None:
        """Freeze only the model: PyTriton runs it in the command's own process, so Triton keeps
        accepting and queueing requests while none finishes (a GPU saturated by a burst)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume_model(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def burst(self, send: Callable[[int], Any], count: int) -> list[tuple[int, str | None, Any, float]]:
        """send(0..count-1) all at once while the model is frozen (Triton keeps queueing): each
        answer's (status, Retry-After, JSON body, seconds)."""
        def one(number: int) -> tuple[int, str | None, Any, float]:
            started = time.monotonic()
            response = send(number)
            return (response.status_code, response.headers.get("Retry-After"), response.get_json(),
                    time.monotonic() - started)

        self.pause_model()
        try:
            with ThreadPoolExecutor(count) as pool:
                return list(pool.map(one, range(count)))
        finally:
            self.resume_model()

    def kill(self) -> None:
        """SIGKILL the whole tier (no clean-up by it: what a crash or an OOM kill leaves)."""
        if self.process is None:
            return
        pids = self._group_pids()
        with contextlib.suppress(ProcessLookupError):
            self._signal(signal.SIGKILL)
        self.process.wait(30)
        self._wait_group_gone(pids)
        self._remove_shared_memory(pids)
        self.process = None

    def stop(self) -> None:
        """SIGTERM: the tier stops Triton and exits; SIGKILL for what is left after 30 s."""
        if self.process is None:
            return
        pids = self._group_pids()
        with contextlib.suppress(ProcessLookupError):
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):
            self._signal(signal.SIGKILL)
        self._wait_group_gone(pids)
        self._remove_shared_memory(pids)
        self.process = None

    def destroy(self) -> None:
        self.kill()  # quicker than Triton's orderly exit, and leaves nothing either
        shutil.rmtree(self.dir, ignore_errors=True)

    def _group_pids(self) -> set[int]:
        assert self.process is not None
        pids = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[2]) == self.process.pid:  # field 5: pgrp
                        pids.add(int(entry.name))
        return pids

    @staticmethod
    def _wait_group_gone(pids: set[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)

    def _remove_shared_memory(self, pids: set[int]) -> None:
        # A killed tier cannot unlink its buffers: PyTriton's tensor store (named after the pid
        # that made it) and the multiprocessing segments (psm_*) made while it ran and that no
        # live process maps any more.
        pattern = re.compile(r"^pytrtion(\d+)-")
        mapped = _mapped_shared_memory()
        for name in set(os.listdir(SHM)):
            match = pattern.match(name)
            ours = (match and int(match.group(1)) in pids) or (
                name.startswith("psm_") and name not in self._shm_before and name not in mapped)
            if ours:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM, name))

    # -- observation ------------------------------------------------------------------------
    def metrics(self, model: str = "d3") -> dict[str, float]:
        """Triton's Prometheus counters of one model, e.g. nv_inference_count, summed over labels."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("nv_inference_") and f'model="{model}"' in line:
                name = line.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values
