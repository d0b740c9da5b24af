"""Helpers of tests/test_deployment.py: rendering the shipped nginx site and systemd unit for a
test machine, a throwaway nginx, a self-signed certificate, free ports, waiting for servers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
NGINX_SITE = REPO / "d3-api-nginx.conf"
UNIT_FILE = REPO / "d3-api.service"
INSTALL_DEPS = REPO / "scripts" / "install-test-deps.sh"

_deps_checked = False


def ensure_system_deps() -> None:
    """Run scripts/install-test-deps.sh once per session (a no-op when everything is there)."""
    global _deps_checked
    if _deps_checked:
        return
    needed = ("nginx", "openssl", "systemd-analyze", "curl")
    if not all(_which(tool) for tool in needed):
        result = subprocess.run(["bash", str(INSTALL_DEPS)], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"install-test-deps.sh failed:\n{result.stdout}\n{result.stderr}"
    missing = [tool for tool in needed if not _which(tool)]
    assert not missing, f"still missing after scripts/install-test-deps.sh: {missing}"
    _deps_checked = True


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def nginx_bin() -> str:
    path = _which("nginx")
    assert path, "nginx is not installed (scripts/install-test-deps.sh installs it)"
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def self_signed_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert, key


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"d3-api-nginx.conf no longer contains {old!r}; update tests/deploy_helpers.py"
    return text.replace(old, new)


def render_nginx_site(*, http_port: int, https_port: int, upstream_port: int, cert: Path, key: Path,
                      log_dir: Path, acme_root: Path, body_limit: str | None = None) -> str:
    """The shipped site with loopback test ports, a test certificate and folders of the test."""
    text = NGINX_SITE.read_text()
    text = _replace(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = _replace(text, "listen [::]:80;", "")
    text = _replace(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    text = _replace(text, "listen [::]:443 ssl http2;", "")
    text = _replace(text, "server 127.0.0.1:6000", f"server 127.0.0.1:{upstream_port}")
    text = _replace(text, "/etc/letsencrypt/live/d3.example.com/fullchain.pem", str(cert))
    text = _replace(text, "/etc/letsencrypt/live/d3.example.com/privkey.pem", str(key))
    text = _replace(text, "https://$host$request_uri", f"https://$host:{https_port}$request_uri")
    text = _replace(text, "/var/log/nginx/", f"{log_dir}/")
    text = _replace(text, "/var/www/letsencrypt", str(acme_root))
    if body_limit is not None:
        text, count = re.subn(r"client_max_body_size \S+;", f"client_max_body_size {body_limit};", text)
        assert count >= 1, "client_max_body_size not found in d3-api-nginx.conf"
    return text


class Nginx:
    """A throwaway nginx with its own prefix, pid, logs and temp folders, in the foreground."""

    def __init__(self, root: Path, site_text: str):
        self.root = root
        for sub in ("logs", "tmp", "acme"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "d3-api.conf").write_text(site_text)
        temp = root / "tmp"
        user = "user root root;\n" if os.geteuid() == 0 else ""
        self.conf = root / "nginx.conf"
        self.conf.write_text(
            f"{user}worker_processes 1;\n"
            f"pid {root}/nginx.pid;\n"
            f"error_log {root}/logs/error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {root}/logs/access.log;\n"
            f"    client_body_temp_path {temp}/body;\n"
            f"    proxy_temp_path {temp}/proxy;\n"
            f"    fastcgi_temp_path {temp}/fastcgi;\n"
            f"    uwsgi_temp_path {temp}/uwsgi;\n"
            f"    scgi_temp_path {temp}/scgi;\n"
            f"    include {root}/d3-api.conf;\n"
            "}\n")
        self.proc: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        return [nginx_bin(), "-p", f"{self.root}/", "-c", str(self.conf), "-e", f"{self.root}/logs/error.log",
                *extra]

    def test_config(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=60)

    def start(self, ports: list[int]) -> None:
        self.proc = subprocess.Popen(self.command("-g", "daemon off;"), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: self.proc.poll() is not None or all(port_open(p) for p in ports), 20, "nginx")
        finally:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise AssertionError(f"nginx exited ({self.proc.returncode}):\n{out}\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.root / "logs" / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def render_unit(app_dir: Path) -> str:
    """The shipped unit with /opt/d3-api replaced, for systemd-analyze verify on a test machine."""
    text = UNIT_FILE.read_text()
    assert "/opt/d3-api" in text
    return text.replace("/opt/d3-api", str(app_dir))


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values
