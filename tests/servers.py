"""Real servers the tests start: a throwaway PostgreSQL cluster and moto's S3 server over HTTP.

Shared by tests/conftest.py's fixtures and by helpers that build on them (tests/fault_servers.py,
tests/k8s_topology.py).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for_port


def _pg_bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if not candidates:
        pytest.fail(f"PostgreSQL binary {name} not found: run scripts/install-test-deps.sh (make test does)")
    return candidates[0]


class PostgresServer:
    """A throwaway cluster on a loopback port, trust auth, removed at the end of the session."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="d3-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:  # PostgreSQL refuses to run as root
            shutil.chown(self.dir, self.user)
        self._run([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "d3", "--no-sync"])
        self.start()

    def _run(self, argv: list[str]) -> None:
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c full_page_writes=off"
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
                   str(self.dir / "log"), "start"])

    def stop(self) -> None:
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://d3@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="d3", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.start()

    def start(self) -> None:
        self._server.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self._server.stop()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"
