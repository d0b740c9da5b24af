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

CHECKS = ("settings", "weights", "database", "objectstore", "inference")
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
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from api.database import head_revision, make_engine

    url = settings.resolved_database_url
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not os.path.exists(parsed.database):
        return Check("database", "WARN", f"{shown} does not exist yet",
                     "deploy.sh creates it with 'd3 db upgrade' (PostgreSQL is recommended in production: "
                     "DATABASE_URL)")
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:  # any failure to connect is this check's answer, not a crash
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("database", "FAIL", f"cannot connect to {shown}: {reason}",
                     "start PostgreSQL (systemctl start postgresql) and check DATABASE_URL: host, port, user, "
                     "password, database")
    finally:
        engine.dispose()
    head = head_revision()
    if current == head:
        return Check("database", "PASS", f"{shown} reachable, schema migrated (revision {head})")
    return Check("database", "WARN", f"{shown} reachable, schema at {current or 'none'}, not the newest ({head})",
                 "deploy.sh runs 'd3 db upgrade' (back up first: DEPLOYMENT.md)")


def check_objectstore(settings: Settings) -> Check:
    from api.storage import make_object_store

    buckets = (settings.bucket_results, settings.bucket_videos, settings.bucket_frames)
    where = (f"MinIO at {settings.minio_endpoint}" if settings.uses_minio
             else f"local folder {settings.resolved_object_store_dir}")
    hint = ("start MinIO and check MINIO_ENDPOINT / MINIO_SECURE and the keys; the keys need read/write on the "
            "buckets" if settings.uses_minio else "create the folder and make it writable by the service user")
    try:
        store = make_object_store(settings, b"d3-check")
        store.ensure_buckets()
        key = f"d3-check-{uuid.uuid4().hex}.txt"
        for bucket in buckets:
            store.put_bytes(bucket, key, b"probe", "text/plain")
            if store.get_bytes(bucket, key) != b"probe":
                raise RuntimeError(f"read back a different object from {bucket}")
            store.delete(bucket, key)
    except Exception as exc:  # unreachable, refused, not writable: all this check's answer
        return Check("objectstore", "FAIL", f"{where}: {type(exc).__name__}: {exc}", hint)
    return Check("objectstore", "PASS", f"{where} reachable, buckets {', '.join(buckets)} writable")


def check_inference(url: str, timeout_s: float = 5.0) -> Check:
    """The inference tier (D3_INFERENCE_URL): its readiness endpoint (KServe v2 / Triton) answers 200."""
    import urllib3

    ready = url.rstrip("/") + "/v2/health/ready"
    hint = "start the inference tier (DEPLOYMENT.md) or correct D3_INFERENCE_URL"
    try:
        response = urllib3.request("GET", ready, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                   retries=False, redirect=False)
    except urllib3.exceptions.HTTPError as exc:
        return Check("inference", "FAIL", f"{ready} unreachable: {type(exc).__name__}", hint)
    if response.status == 200:
        return Check("inference", "PASS", f"{ready} answers 200 (ready)")
    return Check("inference", "FAIL", f"{ready} answers HTTP {response.status}: not ready", hint)


# -- running them --------------------------------------------------------------------------------------
def _inference_url(settings: Settings) -> str:
    return str(getattr(settings, "d3_inference_url", "") or "")  # the setting comes with the inference tier


def run_checks(names: Iterable[str] = CHECKS, overrides: dict[str, Any] | None = None) -> list[Check]:
    """The wanted checks, in CHECKS order; inference only when D3_INFERENCE_URL is set."""
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
        "inference": lambda: check_inference(_inference_url(settings)) if _inference_url(settings) else None,
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
