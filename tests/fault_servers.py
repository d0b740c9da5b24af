"""Real servers that tests can freeze (SIGSTOP) and thaw (SIGCONT), for fault tests.

A frozen server is the hard case: its kernel still completes TCP handshakes and ACKs requests,
so nothing on the client side notices unless the client has its own deadline. Each server here
runs in processes of its own so that it can be frozen without freezing the test:

- `FreezablePostgres`: a throwaway PostgreSQL cluster (tests/conftest.py's PostgresServer);
  freezing stops the postmaster and every backend/auxiliary process it forked.
- `MotoS3Process`: moto's S3 server started as the `moto_server` command (the in-process
  ThreadedMotoServer of conftest would freeze the test itself).
- `RedisProcess`: a real redis-server.

Fixtures (a test module lists this module in `pytest_plugins`): `freezable_postgres`, `moto_s3`,
`redis_proc`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for_port
from tests.servers import PostgresServer

VENV_BIN = Path(sys.executable).parent


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (PostgreSQL forks one level deep)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class Freezable:
    """Freeze/thaw the processes of `pids()`; `frozen()` always thaws, even when the test fails."""

    _frozen: list[int]

    def pids(self) -> list[int]:  # pragma: no cover - each server says
        raise NotImplementedError

    def freeze(self) -> None:
        # Parent first, so it cannot fork a child we would miss; then everything it has.
        self._frozen = self.pids()
        signal_all(self._frozen, signal.SIGSTOP)

    def thaw(self) -> None:
        signal_all(list(reversed(getattr(self, "_frozen", []))), signal.SIGCONT)
        self._frozen = []

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()


class FreezablePostgres(PostgresServer, Freezable):
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        master = self.postmaster_pid()
        return [master, *children_of(master)]

    def destroy(self) -> None:
        self.thaw()
        super().destroy()


class MotoS3Process(Freezable):
    """`moto_server` in its own process: an S3-protocol server over HTTP."""

    access_key = "test-access"
    secret_key = "test-secret-key"

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 60)
        # moto loads its S3 backend on the first request (seconds on a busy machine): do it now,
        # with a patient client, so tests with short deadlines measure the deadline, not the warm-up.
        import urllib3

        urllib3.PoolManager(timeout=60, retries=3).request("GET", f"http://{self.endpoint}/")

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *children_of(self.process.pid)]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def settings(self, suffix: str) -> dict[str, str]:
        return {"MINIO_ENDPOINT": self.endpoint, "MINIO_ACCESS_KEY": self.access_key,
                "MINIO_SECRET_KEY": self.secret_key, "MINIO_SECURE": "false",
                "BUCKET_RESULTS": f"res-{suffix}", "BUCKET_VIDEOS": f"vid-{suffix}", "BUCKET_FRAMES": f"frm-{suffix}"}


class RedisProcess(Freezable):
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: run scripts/install-test-deps.sh (make test does)")
        self.port = free_port()
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pids(self) -> list[int]:
        return [self.process.pid]

    def stop(self) -> None:
        self.thaw()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def freezable_postgres() -> Iterator[FreezablePostgres]:
    server = FreezablePostgres()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3Process]:
    server = MotoS3Process()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    server = RedisProcess()
    yield server
    server.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
