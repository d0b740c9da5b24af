"""Async video jobs: 202 + status, same result as sync, restarts, per-caller limit, callbacks and SSRF rules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import update

from api.exceptions import InvalidInput
from api.models import Prediction
from api.services.callbacks import check_callback_url, deliver_callback
from api.services.queries import Filters
from tests.helpers import make_app
from tests.video_clips import VIDEO_APP_SETTINGS, clip_bytes, make_brightness_engine, post_video


@pytest.fixture(scope="module")
def brightness_engine():
    engine = make_brightness_engine()
    yield engine
    engine.stop()


def wait_for(client, prediction_id: str, statuses=("done", "failed"), timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/predictions/{prediction_id}").get_json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {prediction_id} still {body['status']} after {timeout} s")


def clip(tmp_path, count: int = 40, name: str = "clip") -> bytes:
    levels = [51] * (count // 4) + [230] * (count // 4) + [51] * (count // 4) + [204] * (count - 3 * (count // 4))
    return clip_bytes(tmp_path, "MJPG", 10, levels, name=name)


def jobs_of(app):
    """The in-process executor (threads) of an app on the embedded defaults."""
    return app.extensions["d3"].video_jobs


# -- async ---------------------------------------------------------------------------------------------------
def test_async_job_gives_the_same_result_as_sync(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)
    client = app.test_client()
    data = clip(tmp_path)
    sync = post_video(client, data, frames="8", aggregation="vote", threshold="0.4").get_json()
    response = post_video(client, data, frames="8", aggregation="vote", threshold="0.4", **{"async": "true"})
    assert response.status_code == 202
    queued = response.get_json()
    assert queued["status"] in ("queued", "running") and queued["prediction"] is None
    assert response.headers["Location"] == queued["status_url"] == f"http://localhost/predictions/{queued['id']}"
    assert queued["progress"]["total"] == 8 and queued["duration_s"] == pytest.approx(4.0)
    done = wait_for(client, queued["id"])
    assert done["status"] == "done", done
    assert done["progress"] == {"done": 8, "total": 8}
    for key in ("prediction", "confidence", "fake_probability", "aggregates", "aggregation", "frames", "segments",
                "top_frames", "frames_analyzed", "duration_s", "fps", "width", "height", "threshold",
                "model_version", "sha256"):
        assert done[key] == sync[key], key
    assert done["id"] != sync["id"] and done["result_url"] and done["timeline_url"]
    assert client.get(f"/predictions/{queued['id']}/timeline.png").status_code == 200
    # The job's upload became the kept video; no upload is left waiting.
    s = app.extensions["d3"]
    row = s.queries.get(queued["id"], None, True)
    assert row.video.upload_object is None
    assert s.store.get_bytes(s.settings.bucket_videos, row.media_object) == data


def test_long_videos_go_async_by_themselves(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, VIDEO_ASYNC_SECONDS="3", **VIDEO_APP_SETTINGS)
    client = app.test_client()
    assert post_video(client, clip(tmp_path, 20, "short"), frames="4").status_code == 200  # 2 s
    response = post_video(client, clip(tmp_path, 40, "long"), frames="4")  # 4 s
    assert response.status_code == 202
    assert wait_for(client, response.get_json()["id"])["status"] == "done"


def test_failed_job_reports_its_error(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, KEEP_VIDEOS="false", **VIDEO_APP_SETTINGS)
    client = app.test_client()
    jobs_of(app).stop()  # hold the job while its upload is damaged
    response = post_video(client, clip(tmp_path), **{"async": "true"})
    job_id = response.get_json()["id"]
    s = app.extensions["d3"]
    row = s.queries.get(job_id, None, True)
    s.store.put_bytes(s.settings.bucket_videos, row.video.upload_object, b"RIFF\x00\x00\x00\x00AVI garbage", "x")
    jobs = jobs_of(app)
    jobs._stopped = False
    jobs.notify()
    failed = wait_for(client, job_id)
    assert failed["status"] == "failed" and failed["prediction"] is None
    assert "could not be opened as a video" in failed["error"]
    assert failed["result_url"] is None and failed["timeline_url"] is None
    assert client.get(f"/predictions/{job_id}/timeline.png").status_code == 404
    assert not any((s.settings.resolved_object_store_dir / s.settings.bucket_videos).rglob("*.avi"))


def test_per_caller_job_limit(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, VIDEO_JOBS_PER_KEY="1", **VIDEO_APP_SETTINGS)
    client = app.test_client()
    jobs_of(app).stop()  # jobs stay queued
    data = clip(tmp_path, 12)
    assert post_video(client, data, **{"async": "true"}).status_code == 202
    response = post_video(client, data, **{"async": "true"})
    assert response.status_code == 429
    error = response.get_json()["error"]
    assert error["code"] == "too_many_jobs" and "limit 1" in error["message"]
    assert post_video(client, data, frames="2").status_code == 200  # sync requests are not jobs


# -- restarts -----------------------------------------------------------------------------------------------
def dead_worker() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:gone"


def interrupted_job(tmp_path, engine, data: bytes) -> tuple[str, object]:
    """A job that was running in a process that died: its row says running, nobody works on it."""
    first = make_app(tmp_path, engine, **VIDEO_APP_SETTINGS)
    jobs_of(first).stop()
    job_id = post_video(first.test_client(), data, frames="8", **{"async": "true"}).get_json()["id"]
    s = first.extensions["d3"]
    row = s.queries.get(job_id, None, True)
    with s.db.session() as session:
        session.execute(update(Prediction).where(Prediction.id == row.id).values(status="running"))
        video = session.get(type(row.video), row.id)
        video.worker = dead_worker()
        video.progress_done = 3
    return job_id, s


def test_restart_requeues_an_interrupted_job_and_it_finishes(tmp_path, brightness_engine):
    data = clip(tmp_path)
    job_id, _ = interrupted_job(tmp_path, brightness_engine, data)
    restarted = make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)  # same database and store
    client = restarted.test_client()
    done = wait_for(client, job_id)
    assert done["status"] == "done" and done["frames_analyzed"] == 8
    assert done["progress"] == {"done": 8, "total": 8}
    row = restarted.extensions["d3"].queries.get(job_id, None, True)
    assert row.video.requeued == 1


def test_restart_fails_a_job_whose_upload_is_gone(tmp_path, brightness_engine):
    job_id, s = interrupted_job(tmp_path, brightness_engine, clip(tmp_path))
    row = s.queries.get(job_id, None, True)
    s.store.delete(s.settings.bucket_videos, row.video.upload_object)
    restarted = make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)
    body = restarted.test_client().get(f"/predictions/{job_id}").get_json()
    assert body["status"] == "failed"
    assert "interrupted by a restart" in body["error"] and "no longer stored" in body["error"]


def test_a_live_workers_job_is_left_alone(tmp_path, brightness_engine):
    job_id, s = interrupted_job(tmp_path, brightness_engine, clip(tmp_path))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with s.db.session() as session:
            row = session.get(Prediction, uuid.UUID(job_id))
            row.video.worker = f"{socket.gethostname()}:{alive.pid}:busy"
            row.video.heartbeat_at = datetime.now(timezone.utc)
        restarted = make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)
        assert restarted.test_client().get(f"/predictions/{job_id}").get_json()["status"] == "running"
    finally:
        alive.kill()
        alive.wait()


# -- callbacks ---------------------------------------------------------------------------------------------
class Receiver:
    """A real HTTP server on 127.0.0.1 that fails its first `failures` POSTs with 503."""

    def __init__(self, failures: int = 1) -> None:
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                status = 503 if len(receiver.bodies) <= failures else 200
                receiver.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/d3?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_callback_is_retried_until_delivered(tmp_path, brightness_engine):
    receiver = Receiver(failures=1)
    try:
        app = make_app(tmp_path, brightness_engine, CALLBACK_ALLOW_HTTP="true", CALLBACK_ALLOW_PRIVATE="true",
                       **VIDEO_APP_SETTINGS)
        app.extensions["d3"].callbacks.backoff_s = 0.2
        client = app.test_client()
        response = post_video(client, clip(tmp_path), frames="8", callback_url=receiver.url)
        assert response.status_code == 202  # a callback implies a job
        job_id = response.get_json()["id"]
        assert wait_for(client, job_id)["status"] == "done"
        deadline = time.monotonic() + 20
        while len(receiver.statuses) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.statuses == [503, 200]
        delivered = receiver.bodies[-1]
        assert delivered["id"] == job_id and delivered["status"] == "done"
        assert len(delivered["frames"]) == 8 and delivered["aggregates"]["mean"] > 0
        assert delivered["timeline_url"].startswith("http://localhost/objects/")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            body = client.get(f"/predictions/{job_id}").get_json()
            if body["callback"]["status"] != "sending":
                break
            time.sleep(0.05)
        assert body["callback"] == {"url": receiver.url, "status": "delivered: HTTP 200 (attempt 2)"}
    finally:
        receiver.close()


def test_callbacks_to_private_hosts_or_plain_http_are_refused_by_default(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)
    client = app.test_client()
    data = clip(tmp_path, 12)
    for url, words in [("https://127.0.0.1:8443/hook", "loopback"), ("https://localhost/hook", "loopback"),
                       ("https://10.1.2.3/hook", "private"), ("https://169.254.169.254/latest", "link-local"),
                       ("https://[::1]/x", "loopback"), ("http://example.com/hook", "must use https"),
                       ("https://user:pw@example.com/", "credentials"), ("javascript:alert(1)", "https URL"),
                       ("https://[::1/x", "not a valid URL"), ("https://1.1.1.1/\x00", "NUL")]:
        response = post_video(client, data, callback_url=url)
        assert response.status_code == 400, url
        error = response.get_json()["error"]
        assert error["parameter"] == "callback_url" and words in error["message"], (url, error)
    _, total, _ = app.extensions["d3"].queries.list(Filters(), 10, 0, None, None, True)
    assert total == 0  # nothing queued for a refused callback


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-public"),
    ("224.0.0.1", "multicast"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("240.0.0.1", "reserved"),
])
def test_every_resolved_address_is_checked(address, reason):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(InvalidInput) as caught:
        check_callback_url(f"https://{host}/hook", allow_http=False, allow_private=False)
    assert reason in caught.value.message
    target = check_callback_url(f"https://{host}:9443/hook?a=1", allow_http=False, allow_private=True)
    assert target.port == 9443 and target.path == "/hook?a=1" and target.addresses == (address,)


class RebindingDNS:
    """A real DNS server on a loopback UDP port whose answer for one name changes between queries,
    as a DNS-rebinding attacker's does: answers[0] first, then answers[1], ... (the last repeats)."""

    def __init__(self, name: str, answers: list[str]) -> None:
        self.name, self.answers, self.queries = name.rstrip(".") + ".", answers, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RebindingDNS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rrset

        while not self._stop.is_set():
            try:
                wire, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            reply = dns.message.make_response(query)
            question = query.question[0]
            if question.name.to_text() == self.name and question.rdtype == dns.rdatatype.A:
                address = self.answers[min(self.queries, len(self.answers) - 1)]
                self.queries += 1
                reply.answer.append(dns.rrset.from_text(self.name, 0, "IN", "A", address))
            elif question.name.to_text() != self.name:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), client)

    def resolver(self):
        """The service's resolver hook, answered by this server over DNS (no cache, as the service's)."""
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, 5.0

        def resolve(host: str, port: int) -> list[str]:
            try:
                return [record.address for record in resolver.resolve(host, "A")]
            except dns.exception.DNSException as exc:
                raise socket.gaierror(str(exc)) from None

        return resolve


def test_public_addresses_pass_and_delivery_rechecks():
    target = check_callback_url("https://93.184.215.14/cb", allow_http=False, allow_private=False)
    assert target.addresses == ("93.184.215.14",) and target.host_header == "93.184.215.14"
    # A name that resolves to a public address when the job is submitted and to a private one when
    # the callback is delivered (DNS rebinding) is refused at delivery: the host is resolved again.
    with RebindingDNS("hook.rb.test", ["93.184.215.14", "127.0.0.1"]) as server:
        resolve = server.resolver()
        submitted = check_callback_url("https://hook.rb.test/cb", allow_http=False, allow_private=False,
                                       resolve=resolve)
        assert submitted.addresses == ("93.184.215.14",) and server.queries == 1
        status = deliver_callback("https://hook.rb.test/cb", {"id": "x"}, allow_http=False, allow_private=False,
                                  attempts=2, backoff_s=0.01, resolve=resolve)
        assert server.queries == 2  # resolved again at delivery, not the submission's answer reused
        assert status.startswith("refused: callback_url host 'hook.rb.test' resolves to 127.0.0.1")
        # A name that does not resolve at all is refused as such.
        with pytest.raises(InvalidInput) as caught:
            check_callback_url("https://gone.rb.test/cb", allow_http=False, allow_private=False, resolve=resolve)
        assert "does not resolve" in caught.value.message


def test_delivery_gives_up_after_its_attempts():
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    status = deliver_callback(f"http://127.0.0.1:{port}/cb", {"id": "x"}, allow_http=True, allow_private=True,
                              attempts=3, backoff_s=0.05, timeout_s=2)
    assert status == "failed: NewConnectionError after 3 attempts"
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s


@pytest.mark.parametrize("backend", ["postgres", "s3"])
def test_sync_and_async_on_real_backends(request, tmp_path, brightness_engine, backend):
    """PostgreSQL (claims, JSON params) and an S3-protocol store (upload kept for the job, signed links)."""
    overrides = dict(VIDEO_APP_SETTINGS)
    if backend == "postgres":
        overrides["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    else:
        overrides.update(request.getfixturevalue("s3_server")["settings"])
    app = make_app(tmp_path, brightness_engine, **overrides)
    client = app.test_client()
    data = clip(tmp_path)
    sync = post_video(client, data, frames="8").get_json()
    queued = post_video(client, data, frames="8", **{"async": "true"}).get_json()
    done = wait_for(client, queued["id"])
    assert done["status"] == "done"
    assert done["frames"] == sync["frames"] and done["aggregates"] == sync["aggregates"]
    s = app.extensions["d3"]
    for body in (sync, done):
        row = s.queries.get(body["id"], None, True)
        assert s.store.get_bytes(s.settings.bucket_videos, row.media_object) == data
        frames = json.loads(s.store.get_bytes(s.settings.bucket_frames, row.video.frames_object))["frames"]
        assert frames == body["frames"]
    if backend == "s3":
        import urllib.request

        with urllib.request.urlopen(done["timeline_url"]) as fetched:
            assert fetched.read().startswith(b"\x89PNG")


def test_a_callback_cut_off_by_a_restart_is_sent_again(tmp_path, brightness_engine):
    receiver = Receiver(failures=0)
    try:
        settings = dict(VIDEO_APP_SETTINGS, CALLBACK_ALLOW_HTTP="true", CALLBACK_ALLOW_PRIVATE="true")
        first = make_app(tmp_path, brightness_engine, **settings)
        job_id = post_video(first.test_client(), clip(tmp_path, 12), frames="4").get_json()["id"]
        s = first.extensions["d3"]
        with s.db.session() as session:  # the process died while it was sending the callback
            video = session.get(Prediction, uuid.UUID(job_id)).video
            video.callback_url, video.callback_status = receiver.url, "sending"
        with s.db.session() as session:
            session.execute(update(type(video)).where(type(video).prediction_id == uuid.UUID(job_id))
                            .values(updated_at=datetime.now(timezone.utc) - timedelta(hours=1)))
        restarted = make_app(tmp_path, brightness_engine, **settings)
        deadline = time.monotonic() + 10
        while not receiver.statuses and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.statuses == [200] and receiver.bodies[0]["id"] == job_id
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = restarted.test_client().get(f"/predictions/{job_id}").get_json()["callback"]["status"]
            if status.startswith("delivered"):
                break
            time.sleep(0.05)
        assert status == "delivered: HTTP 200 (attempt 1)"
    finally:
        receiver.close()
