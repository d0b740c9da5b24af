"""`d3 check`: the application-level deployment checks, made with the app's own code.

Each check says PASS, WARN ("works, but look at it", or "deploy.sh will take care of it") or FAIL
("deploying now would not work"), with a hint on what to do. They read the settings exactly as the
service does (api.config), load the weights as it does (api.detector.weights), and reach the
database and the object store through its own modules. check_deployment.sh runs them beside its
host checks (GPU, port, nginx, unit, disk). The only thing written is one small probe object per
bucket, deleted again.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from api.config import ConfigError, Settings, load_settings, secret_problem

CHECKS = ("settings", "weights", "inference", "database", "objectstore", "broker")
CREDENTIALS_HINT = ("a secret from 'openssl rand -hex 32' for SECRET_KEY, the real MinIO/PostgreSQL credentials "
               "for the others")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, WARN or FAIL
    message: str
    hint: str = ""


def is_placeholder(value: str) -> bool:
    """A value from an example file, not a credential (the app's own rule, without the length)."""
    return secret_problem(value) in ("it is empty", "it is a placeholder")


# -- the checks ---------------------------------------------------------------------------------------
def check_settings(settings: Settings) -> Check:
    """Secrets a deployment may not keep; the rest was validated by load_settings() already."""
    from sqlalchemy.engine import make_url

    # A deployment is judged by the rule the app applies outside loopback (api.config.secret_problem),
    # whatever BIND says: it is about to be served.
    # The MinIO keys are the store's to judge (it refuses wrong ones): only placeholders are caught here.
    problems = []
    problem = secret_problem(settings.secret_key.get_secret_value())
    if problem:
        problems.append(f"SECRET_KEY is not a real secret: {problem}")
    if settings.uses_minio:
        for name in ("minio_access_key", "minio_secret_key"):
            value = getattr(settings, name).get_secret_value()
            if is_placeholder(value):
                problems.append(f"{name.upper()} is {'a placeholder' if value else 'empty'}")
    if settings.database_url:
        try:
            password = make_url(settings.database_url).password
        except Exception:  # not a URL: load_settings accepted it, the database check says more
            password = None
        if password is not None and is_placeholder(str(password)):
            problems.append("DATABASE_URL has a placeholder password")
    if problems:
        return Check("settings", "FAIL", "; ".join(problems), CREDENTIALS_HINT)
    return Check("settings", "PASS", "the app accepts the settings and no secret is a placeholder")


def check_weights(settings: Settings) -> Check:
    from api.detector import DetectorConfig
    from api.detector.weights import verify_weights

    config = DetectorConfig.from_settings(settings)
    report = verify_weights(config)
    if all(entry.get("loadable") for entry in report.values()):
        random = any(entry.get("kind") == "random" for entry in report.values())
        identity = "/".join(str(entry.get("identity")) for entry in report.values())
        note = " (random, untrained: for tests only)" if random else ""
        return Check("weights", "PASS", f"{config.backbone} {identity} present and loadable{note}")
    fatal, later = [], []
    for part, entry in report.items():
        if entry.get("loadable"):
            continue
        setting, path = entry.get("setting"), entry.get("path")
        if not entry.get("present") and not (entry.get("kind") == "file" and entry.get("value")):
            later.append(f"{part} ({setting}={entry.get('value') or 'default'})")  # d3 fetch-weights gets it
        elif not entry.get("present"):
            fatal.append((f"{part} weights file not found: {path} ({setting})",
                          f"copy the checkpoint to {path} or correct {setting}"))
        else:
            fatal.append((f"{part} weights present but not loadable: {entry.get('error') or 'unknown error'}",
                          "damaged or of another model: run d3 fetch-weights again, or check the D3_* settings"))
    if fatal:
        return Check("weights", "FAIL", "; ".join(message for message, _ in fatal), fatal[0][1])
    return Check("weights", "WARN", f"not downloaded yet: {', '.join(later)} (cache {config.resolved_cache_dir})",
                 "deploy.sh runs d3 fetch-weights --if-missing; offline, copy the files into the cache by hand")


def check_database(settings: Settings) -> Check:
    from sqlalchemy.engine import make_url

    from api.database import current_revision, head_revision

    url = settings.resolved_database_url
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not os.path.exists(parsed.database):
        return Check("database", "WARN", f"{shown} does not exist yet",
                     "deploy.sh creates it with 'd3 db upgrade' (PostgreSQL is recommended in production: "
                     "DATABASE_URL)")
    try:
        current = current_revision(url)
    except Exception as exc:  # any failure to connect is this check's answer, not a crash
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("database", "FAIL", f"cannot connect to {shown}: {reason}",
                     "start PostgreSQL (systemctl start postgresql) and check DATABASE_URL: host, port, user, "
                     "password, database")
    head = head_revision()
    if current == head:
        return Check("database", "PASS", f"{shown} reachable, schema migrated (revision {head})")
    return Check("database", "WARN", f"{shown} reachable, schema at {current or 'none'}, not the newest ({head})",
                 "deploy.sh runs 'd3 db upgrade' (back up first: DEPLOYMENT.md)")


def check_objectstore(settings: Settings) -> Check:
    from api.storage import make_object_store

    where = (f"MinIO at {settings.minio_endpoint}" if settings.uses_minio
             else f"local folder {settings.resolved_object_store_dir}")
    hint = ("start MinIO and check MINIO_ENDPOINT / MINIO_SECURE and the keys; the keys need read/write on the "
            "buckets" if settings.uses_minio else "create the folder and make it writable by the service user")
    try:
        store = make_object_store(settings, b"d3-check")
        store.ensure_buckets()
        buckets = store.buckets  # every bucket the service writes to (results, videos, frames, media, models)
        key = f"d3-check-{uuid.uuid4().hex}.txt"
        for bucket in buckets:
            store.put_bytes(bucket, key, b"probe", "text/plain")
            if store.get_bytes(bucket, key) != b"probe":
                raise RuntimeError(f"read back a different object from {bucket}")
            store.delete(bucket, key)
    except Exception as exc:  # unreachable, refused, not writable: all this check's answer
        return Check("objectstore", "FAIL", f"{where}: {type(exc).__name__}: {exc}", hint)
    return Check("objectstore", "PASS", f"{where} reachable, buckets {', '.join(buckets)} writable")


def check_inference(settings: Settings) -> Check:
    """With D3_INFERENCE_URL: the tier answers and serves the model version the settings describe
    (same weights, seed and precision), so the API records the version it was configured for."""
    url = settings.d3_inference_url
    if not url:
        return Check("inference", "PASS", "D3_INFERENCE_URL not set: the model runs in each API worker")
    from api.detector.config import DetectorConfig
    from api.detector.remote_engine import RemoteConfig, RemoteEngine
    from api.detector.weights import resolve_weights

    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    local = host in ("localhost", "::1") or host.startswith("127.")
    engine = RemoteEngine(RemoteConfig.from_settings(settings))
    try:
        engine.connect(settings.d3_inference_timeout_s)
    except Exception as exc:  # a tier that does not answer is this check's answer
        hint = ("deploy.sh installs and starts d3-inference.service; then: journalctl -u d3-inference" if local
                else "start the tier on its host (d3-inference.service) and check the firewall")
        return Check("inference", "WARN" if local else "FAIL",
                     f"the inference tier at {url} does not answer: {type(exc).__name__}: {exc}", hint)
    tier = engine.tier_model
    precision = settings.d3_precision if settings.d3_precision != "auto" else tier.precision
    try:
        expected = resolve_weights(DetectorConfig.from_settings(settings), download=False).model_version(precision)
    except Exception as exc:  # the weights check says more
        return Check("inference", "FAIL", f"the tier answers, but the expected model version cannot be computed: "
                     f"{exc}", "see the weights check")
    if tier.model_version != expected:
        return Check("inference", "FAIL", f"the tier at {url} serves {tier.model_version}, the settings describe "
                     f"{expected}", "give the tier the same D3_* model settings (restart d3-inference), or point "
                     "D3_INFERENCE_URL at the right tier")
    kind = "trained" if tier.trained else "random, untrained: for tests only"
    return Check("inference", "PASS", f"the tier at {url} answers and serves {expected} ({kind}) on "
                 f"{tier.device or '?'}")


def check_broker(settings: Settings) -> Check:
    """With a job queue configured: its Redis broker answers."""
    if not settings.uses_celery:
        return Check("broker", "PASS", "no job queue configured: video jobs run in the API process "
                     "(d3-worker not needed)")
    from urllib.parse import urlsplit

    import redis

    url = settings.broker_url
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password in the output
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:  # a broker that does not answer is this check's answer
        return Check("broker", "FAIL", f"the job queue broker at {shown} does not answer: {type(exc).__name__}: {exc}",
                     "start Redis (systemctl start redis-server) and check CELERY_BROKER_URL / REDIS_URL")
    return Check("broker", "PASS", f"job queue broker at {shown} answers; video jobs go to d3-worker")


# -- running them --------------------------------------------------------------------------------------
def run_checks(names: Iterable[str] = CHECKS, overrides: dict[str, Any] | None = None) -> list[Check]:
    """The wanted checks, in CHECKS order."""
    wanted = [name for name in CHECKS if name in set(names)]
    try:
        settings = load_settings(overrides)
    except ConfigError as exc:
        refused = [Check("settings", "FAIL", f"the app refuses the settings: {exc}", "fix that setting; "
                         ".env.example documents each one")]
        return refused + [Check(name, "FAIL", "not checked: the settings are refused (see settings)",
                                "fix the settings first") for name in wanted if name != "settings"]
    runners: dict[str, Callable[[], Check | None]] = {
        "settings": lambda: check_settings(settings),
        "weights": lambda: check_weights(settings),
        "database": lambda: check_database(settings),
        "objectstore": lambda: check_objectstore(settings),
        "inference": lambda: check_inference(settings),
        "broker": lambda: check_broker(settings),
    }
    results = []
    for name in wanted:
        try:
            result = runners[name]()
        except Exception as exc:  # a check reports, it never takes the others down with it
            result = Check(name, "FAIL", f"the check itself failed: {type(exc).__name__}: {exc}",
                           "run `d3 check` by hand and report this")
        if result is not None:
            results.append(result)
    return results


def report(checks: list[Check]) -> dict[str, Any]:
    summary = {status.lower(): sum(1 for c in checks if c.status == status) for status in ("PASS", "WARN", "FAIL")}
    return {"ok": summary["fail"] == 0, "summary": summary, "checks": [asdict(c) for c in checks]}


def text_line(check: Check) -> str:
    line = f"{check.status:<4}  {check.name:<11} {check.message}"
    return f"{line} | hint: {check.hint}" if check.hint else line
