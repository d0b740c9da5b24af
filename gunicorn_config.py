"""Gunicorn settings for d3-api (`gunicorn --config gunicorn_config.py api.app:app`).

Every knob comes from the environment (systemd passes the deployment's `.env` through
`EnvironmentFile=`); when a variable is not in the environment, the `.env` beside this file is
read too, so a hand-started Gunicorn in the app directory behaves like the service.

    BIND                       host:port to listen on (the app's own setting; default 127.0.0.1:6000)
    GUNICORN_WORKERS           worker processes, each with its own copy of the model (default 2)
    GUNICORN_THREADS           threads per worker, gthread worker class (default 2)
    GUNICORN_TIMEOUT           seconds a request may run before the worker is killed (default 600)
    GUNICORN_GRACEFUL_TIMEOUT  seconds in-flight requests get to finish on stop/restart (default 120)
    GUNICORN_KEEPALIVE         seconds an idle keep-alive connection from nginx is kept (default 75)
    GUNICORN_MAX_REQUESTS      recycle a worker after this many requests; 0 = never (default 0)
    MALLOC_ARENA_MAX           glibc malloc arenas per process (default 2; 0 = glibc's own): keeps RSS level
    GUNICORN_LOG_DIR           folder of access.log and error.log (default logs/ beside this file)
    GUNICORN_ACCESS_LOG        access log file, or "-" for stdout (overrides the two rules above)
    GUNICORN_ERROR_LOG         error log file, or "-" for stderr
    GUNICORN_LOG_LEVEL         Gunicorn's own log level (default: LOG_LEVEL, else info)
    FORWARDED_ALLOW_IPS        proxies whose X-Forwarded-* headers are trusted (default 127.0.0.1,::1)
    PROMETHEUS_MULTIPROC_DIR   where workers' metrics are added up (default: a fresh temporary folder)

(`make run` / `make demo` set BIND=127.0.0.1:8000: browsers refuse port 6000, which is fine behind nginx.)

Logs: under systemd (INVOCATION_ID or JOURNAL_STREAM in the environment) both logs go to
stdout/stderr and so to the journal (`journalctl -u d3-api`); otherwise to logs/access.log and
logs/error.log. The access log line ends with the request time in milliseconds and the
X-Request-ID the app answered with (nginx's, when nginx set one), so a slow request can be found in
nginx's, Gunicorn's and the app's logs alike.

How many workers fit on one GPU
-------------------------------
`preload_app` is off: the app, and with it the model and the CUDA context, is created in each
worker *after* the fork. A CUDA context cannot survive fork(), so loading in the master would
break every worker; it also means every worker holds its own copy of the model in GPU memory:

    per worker ~= CUDA context (~0.5 GB) + weights (ViT-L/14 backbone + head: ~0.9 GB fp16,
                  ~1.8 GB fp32) + activations for one batch (D3_MAX_BATCH_SIZE images,
                  ~1-3 GB at 32 images fp16)  ~= 3-5 GB

    workers per GPU = floor((GPU memory - 10 % headroom) / per-worker memory)

A 24 GB card fits 4, a 16 GB card 3, an 8 GB card 1 or 2 (lower D3_MAX_BATCH_SIZE). More
workers than that end in "CUDA out of memory". More workers do not make one GPU faster: within
a worker, requests on its threads are batched together (D3_MAX_BATCH_SIZE / D3_MAX_WAIT_MS),
which uses the GPU better than several workers competing for it. Two workers (the default) keep
the service answering while one is busy with a long video or being restarted. Threads mostly
wait on uploads, decoding and the database, so 2-4 per worker is enough. With several GPUs, run
one service per GPU (CUDA_VISIBLE_DEVICES / D3_DEVICE=cuda:N) on different ports behind the
same nginx upstream; see DEPLOYMENT.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gunicorn.util

HERE = Path(__file__).resolve().parent


def _dotenv() -> dict[str, str]:
    path = HERE / ".env"
    if not path.is_file():
        return {}
    try:
        from dotenv import dotenv_values
    except ImportError:  # pragma: no cover - python-dotenv is a runtime requirement
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


_FILE_ENV = _dotenv()


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    if value is None:
        value = _FILE_ENV.get(name)
    value = (value or "").strip()
    return value or default


def _int(name: str, default: int, minimum: int) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"gunicorn_config: {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SystemExit(f"gunicorn_config: {name} must be at least {minimum}, got {value}")
    return value


def under_systemd() -> bool:
    """True when started by systemd (it sets INVOCATION_ID; JOURNAL_STREAM when stdout is the journal)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def limit_malloc_arenas(default: int = 2) -> int | None:
    """Cap glibc's malloc arenas (MALLOC_ARENA_MAX, default 2) in the master, before any worker forks.

    glibc gives each request thread its own arena (up to 8 per core); with gthread workers the
    arenas fragment and a worker's RSS creeps up for as long as it serves (bench/soak.py; figures
    in docs/PERFORMANCE.md). glibc reads MALLOC_ARENA_MAX only at process start, so the cap is set
    here with mallopt(M_ARENA_MAX), which forked workers inherit. 0 leaves glibc's default; not
    glibc (musl, macOS): nothing to do. Returns the cap that was set.
    """
    arenas = _int("MALLOC_ARENA_MAX", default, 0)
    if arenas == 0 or not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_arena_max = -8  # glibc's malloc.h
    return arenas if mallopt(m_arena_max, arenas) == 1 else None


MALLOC_ARENAS = limit_malloc_arenas()

# --- socket ---------------------------------------------------------------------------------
bind = [_env("BIND", "127.0.0.1:6000")]
backlog = 256

# --- workers --------------------------------------------------------------------------------
worker_class = "gthread"
workers = _int("GUNICORN_WORKERS", 2, 1)
threads = _int("GUNICORN_THREADS", 2, 1)
# Never load the app in the master: the model and the CUDA context must be created after fork.
preload_app = False
timeout = _int("GUNICORN_TIMEOUT", 600, 1)  # long videos: nginx's proxy_read_timeout matches
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 120, 1)
keepalive = _int("GUNICORN_KEEPALIVE", 75, 0)  # longer than nginx's upstream keepalive_timeout
max_requests = _int("GUNICORN_MAX_REQUESTS", 0, 0)  # each new worker reloads the model: keep off
max_requests_jitter = max_requests // 10
# Heartbeat files on tmpfs, so a slow disk never makes the master think a worker hangs.
# gunicorn creates them unlinked (mkstemp + unlink), so a shared folder is safe here.
_SHM = "/dev/shm"  # noqa: S108
worker_tmp_dir = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None

# --- requests Gunicorn refuses itself ---------------------------------------------------------
# A request line or headers Gunicorn cannot parse never reach the app, and Gunicorn answers them
# with an HTML page. Every error of this API is JSON {"error": {"code", "message"}}, so its error
# writer is replaced by one that writes that. Gunicorn has no setting or hook for the body of these
# answers: the writer (gunicorn.util.write_error, called by Worker.handle_error) is the one place.
def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    code = reason.lower().replace(" ", "_") or "bad_request"
    message = (mesg or reason)[:300]  # the message may quote a whole request line
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    gunicorn.util.write_nonblock(sock, head + body)


gunicorn.util.write_error = write_json_error
# The longest request line Gunicorn takes (its maximum; the default is 4094): as long as nginx's
# (large_client_header_buffers 8k), so a URL nginx passes is never refused behind it.
limit_request_line = 8190

# --- proxy ----------------------------------------------------------------------------------
# nginx on the same host is the one trusted hop (X-Forwarded-Proto decides https URLs).
forwarded_allow_ips = _env("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
proc_name = "d3-api"

# --- logging --------------------------------------------------------------------------------
if under_systemd():
    _access_default, _error_default = "-", "-"
else:
    _log_dir = Path(_env("GUNICORN_LOG_DIR", str(HERE / "logs")))
    _access_default, _error_default = str(_log_dir / "access.log"), str(_log_dir / "error.log")

accesslog = _env("GUNICORN_ACCESS_LOG", _access_default)
errorlog = _env("GUNICORN_ERROR_LOG", _error_default)
# Only a log file needs its folder: with both logs on stdout/stderr (containers, a read-only
# root filesystem) nothing is created.
for _log in {accesslog, errorlog} - {"-"}:
    Path(_log).parent.mkdir(parents=True, exist_ok=True)
loglevel = _env("GUNICORN_LOG_LEVEL", _env("LOG_LEVEL", "info")).lower()
capture_output = not under_systemd()  # stray prints land in error.log (the journal has them anyway)
# client, time, request line, status, bytes, referer, user agent, request time in ms, request id.
# The id is the response's X-Request-ID: the app always sets it (nginx's id when nginx sent one, else
# its own), where the request header is missing whenever nobody sits in front of Gunicorn.
access_log_format = ('%(h)s %(t)s "%(r)s" %(s)s %(B)s "%(f)s" "%(a)s" '
                     "rt_ms=%(M)s rid=%({x-request-id}o)s pid=%(p)s")


# --- metrics --------------------------------------------------------------------------------
# Prometheus multiprocess mode: each worker writes its samples under this folder and /metrics
# adds them up. Without PROMETHEUS_MULTIPROC_DIR, the master makes a fresh folder of its own in the
# temporary directory (removed when it exits), so /metrics counts every worker however Gunicorn
# was started (make run, make demo, by hand). prometheus_client reads os.environ when a worker
# imports it, so the folder is exported in on_starting, before any worker forks.
PROMETHEUS_DIR = _env("PROMETHEUS_MULTIPROC_DIR", "")
_OWN_PROMETHEUS_PREFIX = "d3-prometheus-"


def _own_prometheus_dir(path: str) -> bool:
    folder = Path(path)
    return folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(_OWN_PROMETHEUS_PREFIX)


# --- hooks ----------------------------------------------------------------------------------
def on_starting(server) -> None:
    global PROMETHEUS_DIR
    if PROMETHEUS_DIR:  # samples left by a previous run would be counted again
        shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)
        os.makedirs(PROMETHEUS_DIR, exist_ok=True)
    else:
        PROMETHEUS_DIR = tempfile.mkdtemp(prefix=_OWN_PROMETHEUS_PREFIX)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_DIR


def on_exit(server) -> None:
    if PROMETHEUS_DIR and _own_prometheus_dir(PROMETHEUS_DIR):
        shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)


def child_exit(server, worker) -> None:
    if PROMETHEUS_DIR:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # drop the dead worker's live gauges


def when_ready(server) -> None:
    server.log.info("d3-api: %d worker(s) x %d thread(s) on %s, timeout %ss, logs: %s",
                    workers, threads, ", ".join(bind), timeout, accesslog)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.cuda, "is_initialized", lambda: False)():
        server.log.warning("CUDA was initialised in the Gunicorn master; workers cannot use it after fork")


def post_fork(server, worker) -> None:
    server.log.info("worker %s started; it loads the model now", worker.pid)


MODEL_WAIT_TICK_S = 1.0


def post_worker_init(worker) -> None:
    """Accept no connection before the model is ready (or has failed to load).

    Gunicorn calls this after the worker imported the app and before it starts accepting. While a
    respawned worker loads its model, the listening socket's connections go to the workers that
    can serve them, instead of being answered 503 "model is still loading" here. The master's
    heartbeat is kept up meanwhile, so a slow load is not mistaken for a hung worker.
    """
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None) or {}
    services = extensions.get("d3")
    engine = getattr(services, "engine", None)
    if engine is None or not hasattr(engine, "wait_ready"):
        return
    started = time.monotonic()
    while not engine.wait_ready(MODEL_WAIT_TICK_S):
        if engine.load_error:
            break
        worker.notify()
    if engine.ready:
        worker.log.info("worker %s: model ready after %.1f s; accepting requests", worker.pid,
                        time.monotonic() - started)
    else:
        worker.log.error("worker %s: model failed to load (%s); serving 503s and /health", worker.pid,
                         engine.load_error)


def worker_abort(worker) -> None:
    worker.log.error("worker %s timed out after %ss (GUNICORN_TIMEOUT); the request was aborted",
                     worker.pid, timeout)
