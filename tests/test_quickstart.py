"""The quick-start as a new user meets it (issue 16, "what a new user tripped over").

`make demo` and `make run` are read with `make -n` and their own command lines run for real:
Gunicorn with gunicorn_config.py, two workers, the tiny model, a real browser (chromium) opening
/docs. Checked: a port browsers open, one log line per request in the terminal, the request id
in the access log, /metrics adding up every worker, the README and docs a user reads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.deploy_helpers import stop_process, wait_for
from tests.helpers import ROOT, free_port

README = ROOT / "README.md"
# Chromium's restricted ports (net/base/port_util.cc, kRestrictedPorts): a page on one of them
# fails with ERR_UNSAFE_PORT. Firefox refuses the same list.
BROWSER_UNSAFE_PORTS = frozenset({
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103, 104,
    109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514, 515,
    526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049,
    3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080})


def make_commands(target: str) -> list[str]:
    """The shell lines `make TARGET` runs (setup taken as done)."""
    # Run from `make test` too: a sub-make would print "Entering directory" lines among the commands.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed",
                             "-o", "web/dist/index.html", "-o", "web/node_modules/.installed", target],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def quickstart_bind(target: str) -> str:
    [serve] = [line for line in make_commands(target) if "gunicorn" in line]
    match = re.search(r"BIND=\$\{BIND:-([^}]+)\}", serve)
    assert match, serve
    return match.group(1)


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium not found: run scripts/install-test-deps.sh (make test does)")
    return binary


def browse(url: str, budget_ms: int = 0) -> tuple[str, str]:
    """(DOM after load, browser log) of a real headless chromium opening `url`."""
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"d3-chromium-{uuid.uuid4().hex}"
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={profile}", *([f"--virtual-time-budget={budget_ms}"] if budget_ms else []),
            "--dump-dom", url]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return result.stdout, result.stderr


@pytest.mark.parametrize("target", ["run", "demo"])
def test_quickstart_serves_on_a_port_browsers_open(target):
    bind = quickstart_bind(target)
    host, port = bind.rsplit(":", 1)
    assert host == "127.0.0.1"  # loopback: the only place running without keys is allowed
    assert int(port) not in BROWSER_UNSAFE_PORTS, f"make {target} serves on {bind}: browsers refuse that port"
    # A real browser agrees: nothing may be listening there, but it must at least try (connection
    # refused), not refuse the port itself as it does for 6000.
    _, log = browse(f"http://{bind}/docs")
    assert "ERR_UNSAFE_PORT" not in log
    assert f"http://{bind}/docs" in README.read_text()  # the README sends users to that address


def test_the_browser_check_can_fail():
    _, log = browse("http://127.0.0.1:6000/docs")
    assert "ERR_UNSAFE_PORT" in log


def test_readme_is_what_a_new_user_can_follow():
    text = README.read_text()
    assert not re.search(r"^\s*open http", text, re.M)  # macOS only
    assert "../shared" not in text  # a clone has no such folder
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README links {link}, which is not in the repository"
    assert "docs/MODEL.md" in text and (ROOT / "docs" / "MODEL.md").is_file()
    assert "reuse=false" in text and "reused" in text  # the same bytes return the stored record
    assert "next_cursor" in text and "EXIF" in text and "16-bit" in text


def test_model_spec_is_in_the_projects_own_docs():
    spec = (ROOT / "docs" / "MODEL.md").read_text()
    for must in ("convert(\"RGB\")", "224", "bilinear", "0.48145466", "0.26862954", "randperm(256",
                 "ViT-L-14-quickgelu", "QuickGELU", "ln_post", "1024", "dim=1", "sigmoid", "p > 0.5",
                 "classifier.pth", "weights_only=True", "EXIF", "16-bit", "D3_SHUFFLE_SEED"):
        assert must in spec, must


# ---------------------------------------------------------------- `make demo`, run for real
class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output: list[str] = []
        self.process: subprocess.Popen | None = None

    def terminal(self) -> str:
        return "".join(self.output)

    def access_log(self) -> str:
        path = self.root / "logs" / "access.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo`'s own commands, with only the port, the instance folder and the log folder moved."""
    root = tmp_path_factory.mktemp("demo")
    d = Demo(root)
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(BIND=f"127.0.0.1:{d.port}", INSTANCE_DIR=str(root / "instance"), GUNICORN_LOG_DIR=str(root / "logs"),
               D3_DEVICE="cpu", HF_HUB_OFFLINE="1", TMPDIR=str(root))
    *prepare, serve = make_commands("demo")
    for line in prepare:
        done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, line + done.stdout + done.stderr
    d.process = subprocess.Popen(["bash", "-c", f"exec env {serve}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: d.output.extend(iter(d.process.stdout.readline, "")), daemon=True)
    reader.start()

    def ready() -> bool:
        assert d.process.poll() is None, d.terminal()
        try:  # both workers load their own model: ready when many fresh connections find it ready
            return all(requests.get(d.url + "/health", timeout=5).status_code == 200 for _ in range(20))
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 240, "make demo's /health")
        yield d
    finally:
        stop_process(d.process, timeout=90)  # workers still loading finish that first
        reader.join(10)
        # Its own Prometheus folder (it set none) is gone with it.
        assert not list(root.glob("d3-prometheus-*")), list(root.glob("d3-prometheus-*"))


def test_demo_docs_open_in_a_real_browser(demo):
    dom, log = browse(demo.url + "/docs", budget_ms=15000)
    assert "Page load failed" not in log, log[-2000:]
    assert "swagger-ui" in dom and "/predict" in dom, dom[:2000]


def test_demo_logs_each_request_once_with_its_id(demo):
    given = f"qs-{uuid.uuid4().hex[:12]}"
    assert requests.get(demo.url + "/health", headers={"X-Request-ID": given}, timeout=10).status_code == 200
    made = requests.get(demo.url + "/health", timeout=10).headers["X-Request-ID"]  # the app's own id
    wait_for(lambda: made in demo.terminal() and f"rid={made}" in demo.access_log(), 15, "the log lines")
    time.sleep(0.5)
    for request_id in (given, made):
        lines = [line for line in demo.terminal().splitlines() if request_id in line]
        assert len(lines) == 1, lines  # the app's JSON line, not a second one from Gunicorn's access log
        assert f'"request_id": "{request_id}"' in lines[0]
        # Gunicorn's access log (logs/access.log) names the same id, not "-", nginx or not.
        assert f"rid={request_id} " in demo.access_log()
    assert "rid=- " not in demo.access_log()


def test_demo_metrics_add_up_every_worker(demo):
    def access_lines() -> str:  # Gunicorn's access log, wherever the quick-start sends it
        return demo.access_log() + demo.terminal()

    def served_by() -> set[str]:
        return set(re.findall(r'"GET /health[^"]*" .* pid=(\S+)', access_lines()))

    marker = f"/health?m={uuid.uuid4().hex}"
    sent = 0
    while sent < 200 and (sent < 20 or len(served_by()) < 2):
        requests.get(demo.url + marker, timeout=10, headers={"Connection": "close"})
        sent += 1
    wait_for(lambda: len(served_by()) >= 2, 10, "both workers to have answered")
    wait_for(lambda: access_lines().count(marker) == sent, 10, "the access log lines")

    def health_total(text: str) -> float:
        return sum(float(v) for v in re.findall(
            r'^d3_http_requests_total\{[^}]*endpoint="health\.health"[^}]*\} (\S+)', text, re.M))

    totals = set()
    before = health_total(requests.get(demo.url + "/metrics", timeout=10).text)
    for _ in range(6):  # fresh connections: the scrapes land on both workers
        text = requests.get(demo.url + "/metrics", timeout=10, headers={"Connection": "close"}).text
        totals.add(health_total(text))
    assert len(totals) == 1, totals  # every worker reports the same sum ...
    assert totals.pop() == before >= sent  # ... of every worker's requests


def test_413_says_the_limit(client):
    limit = client.application.config["SETTINGS"].max_image_bytes
    body = b"x" * (limit + 128 * 1024)
    response = client.post("/predict", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert str(error["limit_bytes"]) in error["message"] and "MiB" in error["message"]
    assert error["limit_bytes"] >= limit

