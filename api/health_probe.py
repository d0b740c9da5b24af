"""The background prober: checks every outside system on its own thread, so /health never waits.

Each check (database, object store with its buckets, Redis, an inference tier, ...) runs every
PROBE_INTERVAL_S on a thread of its own, so one frozen system never delays the verdict on the
others. A check that has not answered within PROBE_TIMEOUT_S counts as down at that moment, even
while its call is still stuck (the call itself ends at the system's own deadline). `/health`
reads `snapshot()`: the latest verdicts, no I/O.

Each verdict also drives the system's circuit breaker (api/breakers.py): down (twice in a row)
opens it (requests fail fast instead of waiting out their deadlines), up closes it again at once. `on_ok` hooks run
after every successful check (e.g. deletes the object store still owes).

Who owns a system registers its check with `add()`; an inference tier (a remote model server)
registers its own the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.breakers import Guard

if TYPE_CHECKING:  # annotations only: the checks reach these through their own methods
    from api.database import Database
    from api.detector.interface import Engine
    from api.storage import ObjectStore

log = logging.getLogger(__name__)

Check = Callable[[], dict[str, Any] | None]  # raises when the system is down; may return details
# One slow answer on a busy machine is not an outage: the breaker opens on the second failed
# probe in a row (requests that fail open it sooner themselves). /health says "down" at once.
OPEN_AFTER_FAILED_PROBES = 2


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    since: float  # wall clock: when the system entered this state
    checked_at: float
    latency_ms: float | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, "since": _iso(self.since), "checked_at": _iso(self.checked_at),
                                "latency_ms": self.latency_ms}
        if self.error:
            body["error"] = self.error
        body.update(self.details)
        return body


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


@dataclass
class _Probe:
    name: str
    check: Check
    guard: Guard | None
    on_ok: list[Callable[[], None]]
    on_change: list[Callable[[bool], None]]
    verdict: Verdict | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    failures: int = 0  # failed checks in a row


class HealthProber:
    def __init__(self, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._probes: dict[str, _Probe] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, name: str, check: Check, *, guard: Guard | None = None,
            on_ok: Callable[[], None] | None = None, on_change: Callable[[bool], None] | None = None) -> None:
        """Probe `name` with `check`; its verdicts open/close `guard`. Add before start()."""
        probe = _Probe(name, check, guard, [on_ok] if on_ok else [], [on_change] if on_change else [])
        self._probes[name] = probe
        if guard is not None:  # a failure seen by a request: probe at once rather than at the next round
            guard.on_failure.append(probe.wake.set)

    # -- reading --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Verdict]:
        with self._lock:
            return {name: probe.verdict for name, probe in self._probes.items() if probe.verdict is not None}

    def down(self) -> list[str]:
        return [name for name, verdict in self.snapshot().items() if not verdict.ok]

    def verdict(self, name: str) -> Verdict | None:
        with self._lock:
            probe = self._probes.get(name)
            return probe.verdict if probe else None

    # -- running --------------------------------------------------------------------------------
    def start(self, wait_first: bool = True) -> None:
        """One thread per system; with `wait_first`, return once each has a first verdict (at most the timeout)."""
        for probe in self._probes.values():
            thread = threading.Thread(target=_loop, args=(weakref.ref(self), probe), daemon=True,
                                      name=f"d3-probe-{probe.name}")
            thread.start()
            self._threads.append(thread)
        if wait_first:
            deadline = time.monotonic() + self.timeout_s + 0.2
            while time.monotonic() < deadline and len(self.snapshot()) < len(self._probes):
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for probe in self._probes.values():
            probe.wake.set()

    def probe_now(self, name: str) -> Verdict:
        """Run one check synchronously (tests, the `d3` command); records its verdict."""
        probe = self._probes[name]
        with ThreadPoolExecutor(1) as pool:
            self._run_once(probe, pool)
        return probe.verdict  # type: ignore[return-value]

    def _run_once(self, probe: _Probe, pool: ThreadPoolExecutor) -> None:
        started = time.monotonic()
        try:
            future: Future = pool.submit(probe.check)
        except RuntimeError:  # the interpreter is shutting down
            self._stop.set()
            return
        try:
            details = future.result(timeout=self.timeout_s) or {}
        except FutureTimeout:
            self._record(probe, False, None, f"no answer within {self.timeout_s:g} s", {})
            # Wait for the stuck call to end at its own deadline before probing again; its
            # failure is already recorded as down.
            with contextlib.suppress(Exception):
                future.result()
            return
        except Exception as exc:  # noqa: BLE001 - any failure of a check means "down", with its reason
            self._record(probe, False, (time.monotonic() - started) * 1000, _reason(exc), {})
            return
        self._record(probe, True, (time.monotonic() - started) * 1000, None, details)
        for hook in probe.on_ok:
            try:
                hook()
            except Exception:
                log.exception("health probe %s: on_ok hook failed", probe.name)

    def _record(self, probe: _Probe, ok: bool, latency_ms: float | None, error: str | None,
                details: dict[str, Any]) -> None:
        now = time.time()
        with self._lock:
            previous = probe.verdict
            changed = previous is None or previous.ok != ok
            since = now if changed else previous.since
            verdict = Verdict(probe.name, ok, since, now, None if latency_ms is None else round(latency_ms, 1),
                              error, details)
            probe.verdict = verdict
        probe.failures = 0 if ok else probe.failures + 1
        if probe.guard is not None:
            if ok:
                probe.guard.mark_up()
            elif probe.failures >= OPEN_AFTER_FAILED_PROBES:
                probe.guard.mark_down(error or "down")
        if changed:
            if previous is not None or not ok:
                log_fn = log.info if ok else log.error
                log_fn("health: %s is %s%s", probe.name, "up" if ok else "DOWN", f" ({error})" if error else "")
            for hook in probe.on_change:
                try:
                    hook(ok)
                except Exception:
                    log.exception("health probe %s: on_change hook failed", probe.name)


def _loop(prober_ref: weakref.ref[HealthProber], probe: _Probe) -> None:
    """One system's probe rounds. Holds the prober weakly: a process (or test) that drops its app
    and prober ends these threads too."""
    # The check runs in a pool of one, so a stuck call is noticed at the probe's timeout while it
    # is still stuck; the next round starts only once it has come back.
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"d3-probe-{probe.name}-call")
    try:
        while True:
            prober = prober_ref()
            if prober is None or prober._stop.is_set():  # noqa: SLF001 - the prober's own loop
                return
            started = time.monotonic()
            probe.wake.clear()
            prober._run_once(probe, pool)  # noqa: SLF001
            interval = prober.interval_s
            del prober
            probe.wake.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        pool.shutdown(wait=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:  # e.g. StoreUnavailable from urllib3's ReadTimeoutError
        reason += f" ({type(cause).__name__})"
    return reason[:300]


# -- the checks of the systems this service talks to -----------------------------------------------
def database_check(db: Database, timeout_s: float) -> Check:
    def check() -> dict[str, Any]:
        db.probe(timeout_s)
        return {"backend": db.backend}

    return check


def store_check(store: ObjectStore) -> Check:
    """Reachable and every bucket there; a missing bucket is created (the store may have lost it)."""
    def check() -> dict[str, Any]:
        missing = store.missing_buckets()
        if missing:
            log.warning("object store: bucket(s) %s missing; creating them", ", ".join(missing))
            store.ensure_buckets()
            missing = store.missing_buckets()
            if missing:
                raise RuntimeError(f"bucket(s) missing: {', '.join(missing)}")
        return {"buckets": list(store.buckets)}

    return check


def inference_tier_check(engine: Engine, timeout_s: float) -> Check:
    """The remote inference tier (api/detector/remote_engine.py): ready, and which model it serves."""
    def check() -> dict[str, Any]:
        return engine.probe(timeout_s)

    return check


def redis_check(url: str, timeout_s: float) -> Check:
    import redis

    client = redis.Redis.from_url(url, **redis_options(timeout_s))

    def check() -> dict[str, Any]:
        client.ping()
        return {}

    return check


def redis_options(timeout_s: float) -> dict[str, Any]:
    """redis-py options for a call that ends at `timeout_s`: no retries (redis-py retries 3 times by default)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry_on_timeout": False,
            "retry": Retry(NoBackoff(), 0)}
