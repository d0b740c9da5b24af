"""Background work for video jobs: a bounded pool of workers, recovery after restarts, callbacks.

The database is the queue. A job is a `predictions` row (media_type video, status queued) with its
`video_predictions` row; the upload waits in the videos bucket (`upload_object`). Workers claim a
job with a conditional UPDATE (queued -> running), so several Gunicorn workers, or hosts, never
run the same job twice. At most VIDEO_WORKERS threads per process run jobs; they start when work
arrives and stop when there is none, so an idle process polls nothing.

Nothing stays `running` forever: a claim records the worker (host:pid:token) and the job's
`updated_at` is its heartbeat. At start-up (and at most once a minute when jobs are submitted)
jobs whose worker is gone (same host, process dead) or silent for STALE_AFTER_S are re-queued if
their upload is still stored, or marked failed with the reason.

Callbacks: when a job with `callback_url` ends (done or failed), its final JSON is POSTed there,
with retries and exponential backoff. Only https unless CALLBACK_ALLOW_HTTP; the host is resolved
and every address checked (private, loopback, link-local, reserved, multicast, not global: refused
unless CALLBACK_ALLOW_PRIVATE), and the request goes to the checked address itself, so a DNS answer
that changes between the check and the connection (rebinding) cannot redirect it. Redirects are
not followed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import urllib3
from sqlalchemy import select, update

from api.database import DatabaseUnavailable
from api.exceptions import InvalidInput
from api.models import Prediction, VideoPrediction
from api.storage import StoreUnavailable

if TYPE_CHECKING:
    from flask import Flask

    from api.services.videos import VideoService

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
STALE_AFTER_S = 300.0
REAP_EVERY_S = 60.0
ENGINE_WAIT_S = 1.0
CALLBACK_ATTEMPTS = 5
CALLBACK_BACKOFF_S = 1.0  # then 2, 4, 8 s
CALLBACK_TIMEOUT_S = 10.0


# -- callbacks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallbackTarget:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a callback may not go to this address (None: it may)."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):  # specific first
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:  # e.g. 100.64.0.0/10 shared address space
        return "non-public"
    return None


def check_callback_url(url: str, allow_http: bool, allow_private: bool) -> CallbackTarget:
    """Validate a callback URL and resolve its host; InvalidInput (parameter callback_url) if refused."""
    def refuse(message: str) -> InvalidInput:
        return InvalidInput(f"callback_url {message}", parameter="callback_url")

    if len(url) > 2000:
        raise refuse("is longer than 2000 characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise refuse("must be an https URL")
    if scheme == "http" and not allow_http:
        raise refuse("must use https (plain http is not allowed on this server)")
    if parts.username or parts.password:
        raise refuse("must not carry credentials")
    host = parts.hostname
    if not host:
        raise refuse("has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise refuse("has an invalid port") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise refuse(f"host {host!r} does not resolve") from None
    addresses = tuple(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    if not allow_private:
        for address in addresses:
            reason = _refusal(ipaddress.ip_address(address))
            if reason:
                raise refuse(f"host {host!r} resolves to {address}, a {reason} address; refused")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CallbackTarget(url=url, scheme=scheme, host=host, port=port, path=path, addresses=addresses)


def _post(target: CallbackTarget, body: bytes, timeout_s: float) -> int:
    """POST to the first checked address, TLS verified against the URL's host name."""
    address = target.addresses[0]
    timeout = urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s)
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, target.port, timeout=timeout, retries=False,
                                           cert_reqs="CERT_REQUIRED", server_hostname=target.host,
                                           assert_hostname=target.host)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)
    try:
        response = pool.urlopen("POST", target.path, body=body, redirect=False, retries=False,
                                headers={"Host": target.host_header, "Content-Type": "application/json",
                                         "User-Agent": "d3-api-callback/1"})
        return response.status
    finally:
        pool.close()


def deliver_callback(url: str, payload: dict[str, Any], allow_http: bool, allow_private: bool,
                     attempts: int = CALLBACK_ATTEMPTS, backoff_s: float = CALLBACK_BACKOFF_S,
                     timeout_s: float = CALLBACK_TIMEOUT_S) -> str:
    """POST `payload` with retries; returns a short status for `video_predictions.callback_status`.

    Retried: connection errors, timeouts, 408, 429 and 5xx. Not retried: other answers, refusals.
    """
    body = json.dumps(payload).encode()
    last = "not attempted"
    for attempt in range(1, attempts + 1):
        try:  # resolved and checked again at every attempt: DNS may have changed
            target = check_callback_url(url, allow_http, allow_private)
        except InvalidInput as exc:
            return f"refused: {exc.message}"[:64]
        try:
            status = _post(target, body, timeout_s)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            last = type(exc).__name__
        else:
            if 200 <= status < 300:
                return f"delivered: HTTP {status} (attempt {attempt})"
            last = f"HTTP {status}"
            if status < 500 and status not in (408, 429):
                return f"failed: {last} (attempt {attempt})"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return f"failed: {last} after {attempts} attempts"[:64]


# -- the worker pool ----------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=timezone.utc)
    return value


class VideoJobs:
    """At most `workers` job threads in this process; the database decides who runs what."""

    def __init__(self, videos: VideoService, workers: int) -> None:
        self.videos = videos
        self.db = videos.db
        self.settings = videos.settings
        self.workers = workers
        self.host = socket.gethostname()
        self.token = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.callback_attempts = CALLBACK_ATTEMPTS
        self.callback_backoff_s = CALLBACK_BACKOFF_S
        self._lock = threading.Lock()
        self._active = 0
        self._dirty = False
        self._stopped = False
        self._last_reap = time.monotonic()

    # ---------------------------------------------------------------- lifecycle
    def notify(self) -> None:
        """There may be queued jobs: make sure workers are running (up to the pool size)."""
        if time.monotonic() - self._last_reap > REAP_EVERY_S:
            self._last_reap = time.monotonic()
            self.recover(startup=False)
        with self._lock:
            if self._stopped:
                return
            self._dirty = True
            missing = self.workers - self._active
            self._active += missing
        for _ in range(missing):
            threading.Thread(target=self._loop, name="d3-video-job", daemon=True).start()

    def stop(self) -> None:
        """Let running jobs finish but start no new ones (tests; a stopping process)."""
        with self._lock:
            self._stopped = True

    def _loop(self) -> None:
        db_errors = 0
        try:
            while True:
                with self._lock:
                    self._dirty = False
                    if self._stopped:
                        return
                engine = self.videos.engine
                if not engine.ready:
                    # A restart re-queues jobs while the model loads; they wait for it (queued).
                    time.sleep(ENGINE_WAIT_S)
                    with self._lock:
                        self._dirty = True
                    continue
                try:
                    job_id = self.claim()
                except DatabaseUnavailable as exc:
                    db_errors += 1
                    log.warning("video jobs: cannot claim a job (%s)", exc)
                    if db_errors >= 3:
                        return
                    time.sleep(2.0 * db_errors)
                    continue
                db_errors = 0
                if job_id is None:
                    with self._lock:
                        if self._dirty and not self._stopped:
                            continue  # work arrived while we looked
                        return
                self._run(job_id)
        except Exception:
            log.exception("video job worker stopped")
        finally:
            with self._lock:
                self._active -= 1

    # ---------------------------------------------------------------- claiming and running
    def claim(self) -> uuid.UUID | None:
        """Take the oldest queued job: queued -> running, atomically across processes."""
        with self.db.session() as session:
            candidates = list(session.scalars(
                select(Prediction.id).where(Prediction.media_type == "video", Prediction.status == "queued")
                .order_by(Prediction.created_at).limit(10)))
        for job_id in candidates:
            with self.db.session() as session:
                result = session.execute(update(Prediction).where(Prediction.id == job_id,
                                                                  Prediction.status == "queued")
                                         .values(status="running"))
                if result.rowcount != 1:
                    continue  # another worker was quicker
                video = session.get(VideoPrediction, job_id)
                video.params = {**(video.params or {}), "worker": self.token,
                                "claimed_at": datetime.now(timezone.utc).isoformat()}
                video.progress_done = 0
                video.updated_at = datetime.now(timezone.utc)
            return job_id
        return None

    def _run(self, job_id: uuid.UUID) -> None:
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_id, stop), daemon=True, name="d3-video-beat")
        heartbeat.start()
        try:
            row = self.videos.run_job(job_id, self.token)
        finally:
            stop.set()
            heartbeat.join()
        if row is not None:
            log.info("video job %s %s", job_id, row.status)
            if row.video is not None and row.video.callback_url:
                self.send_callback(job_id)

    def _heartbeat(self, job_id: uuid.UUID, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(DatabaseUnavailable), self.db.session() as session:
                session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id)
                                .values(updated_at=datetime.now(timezone.utc)))

    # ---------------------------------------------------------------- callbacks
    def send_callback(self, job_id: uuid.UUID) -> None:
        """Deliver in a thread of its own, so retries never hold a job worker."""
        threading.Thread(target=self._deliver, args=(job_id,), daemon=True, name="d3-video-callback").start()

    def _deliver(self, job_id: uuid.UUID) -> None:
        try:
            with self.db.session() as session:  # claim the delivery: pending -> sending, once
                result = session.execute(update(VideoPrediction)
                                         .where(VideoPrediction.prediction_id == job_id,
                                                VideoPrediction.callback_status == "pending")
                                         .values(callback_status="sending"))
                if result.rowcount != 1:
                    return
            row = self.videos.load(job_id)
            payload = self.final_body(row)
            status = deliver_callback(row.video.callback_url, payload, self.settings.callback_allow_http,
                                      self.settings.callback_allow_private, attempts=self.callback_attempts,
                                      backoff_s=self.callback_backoff_s)
            with self.db.session() as session:
                session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id)
                                .values(callback_status=status[:64]))
            log.info("callback for video job %s: %s", job_id, status)
        except DatabaseUnavailable as exc:
            log.warning("callback for video job %s not recorded: %s", job_id, exc)
        except Exception:
            log.exception("callback for video job %s failed", job_id)

    def final_body(self, row: Prediction) -> dict[str, Any]:
        """What GET /predictions/<id> shows, with links made absolute against the submitting request."""
        from api.services.predictions import serialize_prediction

        body = serialize_prediction(row, self.videos.store, self.settings)
        body.update(self.videos.detail(row))
        base = (row.video.params or {}).get("base_url")
        for name in ("result_url", "timeline_url"):
            if base and isinstance(body.get(name), str) and body[name].startswith("/"):
                body[name] = urljoin(base, body[name])
        body.pop("callback", None)
        return body

    # ---------------------------------------------------------------- recovery
    def _orphaned(self, row: Prediction, now: datetime) -> bool:
        """Is this running job's worker gone?"""
        worker = (row.video.params or {}).get("worker") if row.video is not None else None
        if not worker:
            return True
        host, _, rest = worker.partition(":")
        pid_text, _, _token = rest.partition(":")
        if worker == self.token:
            return False
        if host == self.host and pid_text.isdigit():
            pid = int(pid_text)
            if pid == os.getpid() or not _pid_alive(pid):
                return True  # an earlier process with this pid, or a dead one
        beat = _aware(row.video.updated_at) or _aware(row.created_at)
        return beat is None or now - beat > timedelta(seconds=STALE_AFTER_S)

    def recover(self, startup: bool = True) -> dict[str, int]:
        """Re-queue interrupted jobs whose upload is still stored; fail those whose upload is gone."""
        counts = {"requeued": 0, "failed": 0, "callbacks": 0}
        now = datetime.now(timezone.utc)
        try:
            with self.db.session() as session:
                # A delivery whose process died mid-way ("sending", silent since) is due again.
                session.execute(update(VideoPrediction)
                                .where(VideoPrediction.callback_status == "sending",
                                       VideoPrediction.updated_at < now - timedelta(seconds=STALE_AFTER_S))
                                .values(callback_status="pending"))
                rows = list(session.scalars(select(Prediction).where(
                    Prediction.media_type == "video", Prediction.status.in_(("queued", "running")))))
                pending_callbacks = list(session.scalars(
                    select(VideoPrediction.prediction_id).join(Prediction)
                    .where(Prediction.status.in_(("done", "failed")), VideoPrediction.callback_status == "pending")))
        except DatabaseUnavailable as exc:
            log.warning("video job recovery skipped: %s", exc)
            return counts
        for row in rows:
            if row.status == "running" and not self._orphaned(row, now):
                continue
            upload = row.video.upload_object if row.video is not None else None
            try:
                stored = bool(upload) and self.videos.store.exists(self.settings.bucket_videos, upload)
            except (StoreUnavailable, ValueError):
                log.warning("video job %s: object store unavailable, recovery postponed", row.id)
                continue
            try:
                if stored:
                    if row.status == "running" and self._requeue(row):
                        counts["requeued"] += 1
                else:
                    reason = ("interrupted by a restart, and its uploaded video is no longer stored; resubmit it"
                              if row.status == "running" else "its uploaded video is no longer stored; resubmit it")
                    if self.videos.fail_job(row.id, None, reason) is not None:
                        counts["failed"] += 1
                        if row.video is not None and row.video.callback_url:
                            pending_callbacks.append(row.id)
            except DatabaseUnavailable as exc:
                log.warning("video job %s not recovered: %s", row.id, exc)
        for job_id in dict.fromkeys(pending_callbacks):
            self.send_callback(job_id)
            counts["callbacks"] += 1
        if any(counts.values()):
            log.info("video job recovery (%s): %s", "start-up" if startup else "periodic", counts)
        has_queued = counts["requeued"] or any(row.status == "queued" for row in rows)
        if startup and has_queued:
            self.notify()
        return counts

    def _requeue(self, row: Prediction) -> bool:
        with self.db.session() as session:
            result = session.execute(update(Prediction).where(Prediction.id == row.id, Prediction.status == "running")
                                     .values(status="queued"))
            if result.rowcount != 1:
                return False
            video = session.get(VideoPrediction, row.id)
            params = dict(video.params or {})
            params.pop("worker", None)
            params["requeued"] = int(params.get("requeued", 0)) + 1
            video.params = params
            video.progress_done = 0
        return True


def init_app(app: Flask) -> VideoJobs:
    """Start-up recovery of interrupted jobs; the service and its pool are built in api/context.py."""
    jobs = app.extensions["d3"].video_jobs
    jobs.recover(startup=True)
    return jobs
