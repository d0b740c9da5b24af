"""Settings: defaults, then `.env`, then the process environment, then explicit overrides.

Every setting is an upper-case environment variable of the same name as the field. Values are
parsed and validated once, at start-up; a bad value raises `ConfigError` naming the setting.
`.env.example` documents each one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from api.utils.parsing import bool_word

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INSTANCE_DIR = PROJECT_ROOT / "instance"

# Values shipped in .env.example; refused outside loopback so nobody deploys them by mistake.
EXAMPLE_SECRETS = frozenset({"change-me", "minioadmin", "changeme", ""})


class ConfigError(ValueError):
    """A setting is missing or has a value the service cannot use."""


def _bool(name: str, raw: str) -> bool:
    value = bool_word(raw)
    if value is None:
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    return value


def _number(kind: type, name: str, raw: str, minimum: float | None, maximum: float | None) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {raw!r}")
    return value


def setting(default: Any, *, minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] | None = None, secret: bool = False, doc: str = "") -> Any:
    """A dataclass field with the validation rules of one setting."""
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices, "secret": secret, "doc": doc}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # --- detector engine (see api/detector) ---
    d3_backbone: str = setting("ViT-L-14-quickgelu", doc="open_clip model name of the backbone")
    d3_clip_weights: str = setting("openai", doc="'openai' (open_clip tag, HF cache), a file, or random:<seed>")
    d3_head_weights: str = setting("", doc="head checkpoint path, https URL, or random:<seed>")
    d3_shuffle_seed: int = setting(0, minimum=0)
    d3_device: str = setting("auto", doc="auto, cpu, cuda or cuda:N")
    d3_precision: str = setting("auto", choices=("auto", "fp32", "fp16", "bf16"))
    d3_cache_dir: str = setting("", doc="weights cache; default ~/.cache/d3")
    d3_max_batch_size: int = setting(32, minimum=1, maximum=4096)
    d3_max_wait_ms: float = setting(2.0, minimum=0, maximum=10_000, doc="how long a batch waits for more images")
    d3_queue_size: int = setting(1024, minimum=1)
    d3_infer_timeout_s: float = setting(120.0, minimum=0.1)

    # --- HTTP service ---
    bind: str = setting("127.0.0.1:6000", doc="host:port Gunicorn binds (also decides auth rules)")
    secret_key: str = setting("", secret=True, doc="signs local result URLs; generated per process if empty")
    instance_dir: str = setting(str(DEFAULT_INSTANCE_DIR))
    default_threshold: float = setting(0.5, minimum=0.0, maximum=1.0)
    max_image_bytes: int = setting(20 * 1024 * 1024, minimum=1)
    max_image_pixels: int = setting(50_000_000, minimum=1)
    max_batch_files: int = setting(64, minimum=1, maximum=1024)
    result_url_expiry_s: int = setting(3600, minimum=1, maximum=7 * 24 * 3600)
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # --- database ---
    database_url: str = setting("", doc="SQLAlchemy URL; default SQLite in the instance folder")

    # --- object store ---
    minio_endpoint: str = setting("", doc="host:port of MinIO/S3; empty = local folder store")
    minio_access_key: str = setting("", secret=True)
    minio_secret_key: str = setting("", secret=True)
    minio_secure: bool = setting(True)
    minio_region: str = setting("us-east-1")
    object_store_dir: str = setting("", doc="local object store folder; default <instance>/objects")
    bucket_results: str = setting("d3-results")
    bucket_videos: str = setting("d3-videos")
    bucket_frames: str = setting("d3-frames")

    # --- video ---
    max_video_bytes: int = setting(500 * 1024 * 1024, minimum=1)
    max_video_seconds: float = setting(600.0, minimum=0.1)
    default_video_frames: int = setting(32, minimum=1)
    max_video_frames: int = setting(256, minimum=1)
    keep_videos: bool = setting(True)
    video_async_bytes: int = setting(100 * 1024 * 1024, minimum=1, doc="uploads larger than this run async")
    video_async_seconds: float = setting(120.0, minimum=0.1, doc="videos longer than this run async")
    video_workers: int = setting(2, minimum=1, maximum=64)
    video_decode_timeout_s: float = setting(120.0, minimum=1)
    video_decode_memory_mb: int = setting(4096, minimum=64)
    callback_allow_http: bool = setting(False)
    callback_allow_private: bool = setting(False)

    # --- access control and limits ---
    auth_required: bool = setting(True)
    rate_limit_default: str = setting("120/minute")
    rate_limit_video: str = setting("10/minute")
    redis_url: str = setting("")
    video_jobs_per_key: int = setting(2, minimum=1)
    metrics_allow: str = setting("127.0.0.0/8,::1/128", doc="comma-separated networks allowed to read /metrics")
    cors_origins: str = setting("", doc="comma-separated allow-list; empty = CORS off")

    # --- outside systems: deadlines and failing fast (api/breakers.py, api/health_probe.py) ---
    db_timeout_s: float = setting(3.0, minimum=0.1, maximum=600,
                                  doc="deadline of each database round trip (connect, each statement)")
    store_timeout_s: float = setting(3.0, minimum=0.1, maximum=600,
                                     doc="object store deadline per attempt (connect, then each read)")
    store_retries: int = setting(1, minimum=0, maximum=10, doc="object store retries of a failed attempt")
    redis_timeout_s: float = setting(0.5, minimum=0.05, maximum=60, doc="rate-limit Redis socket deadline")
    callback_timeout_s: float = setting(5.0, minimum=0.1, maximum=120, doc="webhook deadline per attempt")
    probe_interval_s: float = setting(1.0, minimum=0.05, maximum=300, doc="how often /health's prober checks")
    probe_timeout_s: float = setting(2.0, minimum=0.05, maximum=60, doc="deadline of each probe")
    breaker_fail_max: int = setting(3, minimum=1, doc="failures in a row that open a system's breaker")
    max_in_flight_per_system: int = setting(
        0, minimum=0, doc="request threads of a worker that may wait on one outside system at once; "
                          "0 = half of GUNICORN_THREADS")
    reconcile_interval_s: float = setting(3600.0, minimum=0, doc="background store reconcile; 0 = off")
    reconcile_grace_s: float = setting(3600.0, minimum=0, doc="age before an object without a row is removed")

    # ------------------------------------------------------------------
    @property
    def bind_host(self) -> str:
        host = self.bind.rsplit(":", 1)[0]
        return host.strip("[]")

    @property
    def bind_port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])

    @property
    def binds_loopback(self) -> bool:
        host = self.bind_host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.instance_dir) / 'd3.sqlite'}"

    @property
    def resolved_object_store_dir(self) -> Path:
        return Path(self.object_store_dir or Path(self.instance_dir) / "objects")

    @property
    def resolved_max_in_flight(self) -> int:
        """MAX_IN_FLIGHT_PER_SYSTEM, or half the worker's threads: a frozen system never holds them all."""
        if self.max_in_flight_per_system:
            return self.max_in_flight_per_system
        try:
            threads = int(os.environ.get("GUNICORN_THREADS", "2"))
        except ValueError:
            threads = 2
        return max(1, threads // 2)

    @property
    def uses_minio(self) -> bool:
        return bool(self.minio_endpoint)

    def public_view(self) -> dict[str, Any]:
        """Every setting, with secrets masked: safe to print or log."""
        view = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            view[f.name.upper()] = "***" if f.metadata.get("secret") and value else value
        return view


def _parse(f: dataclasses.Field, raw: Any) -> Any:
    name = f.name.upper()
    meta = f.metadata
    if not isinstance(raw, str):
        raw = str(raw)
    if f.type in ("bool", bool):
        return _bool(name, raw)
    if f.type in ("int", int):
        return _number(int, name, raw, meta["minimum"], meta["maximum"])
    if f.type in ("float", float):
        return _number(float, name, raw, meta["minimum"], meta["maximum"])
    value = raw.strip()
    choices = meta.get("choices")
    if choices:
        value = value.upper() if name == "LOG_LEVEL" else value.lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def load_settings(overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                  env_file: str | os.PathLike | None = None) -> Settings:
    """Build validated settings; later sources win: defaults < .env < environment < overrides."""
    environ = os.environ if environ is None else environ
    env_path = Path(env_file) if env_file else PROJECT_ROOT / ".env"
    layers = [dotenv_values(env_path) if env_path.is_file() else {}, environ,
              {k.upper(): v for k, v in (overrides or {}).items()}]
    sources: dict[str, Any] = {}
    for layer in layers:
        # An empty value means "not set here", as .env.example says.
        sources.update({k: v for k, v in layer.items() if v is not None and str(v).strip() != ""})

    values = {}
    for f in dataclasses.fields(Settings):
        name = f.name.upper()
        if name in sources:
            values[f.name] = _parse(f, sources[name])
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Cross-field rules that a single value cannot express."""
    if ":" not in settings.bind:
        raise ConfigError(f"BIND must be host:port, got {settings.bind!r}")
    try:
        settings.bind_port  # noqa: B018 - parse check
    except ValueError:
        raise ConfigError(f"BIND must end in a port number, got {settings.bind!r}") from None
    device = settings.d3_device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"D3_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")
    if settings.default_video_frames > settings.max_video_frames:
        raise ConfigError("DEFAULT_VIDEO_FRAMES must not exceed MAX_VIDEO_FRAMES")
    if settings.uses_minio and not (settings.minio_access_key and settings.minio_secret_key):
        raise ConfigError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required when MINIO_ENDPOINT is set")
    if not settings.binds_loopback:
        if not settings.auth_required:
            raise ConfigError(
                f"AUTH_REQUIRED=false is only allowed when BIND is a loopback address, not {settings.bind!r}")
        for name in ("secret_key", "minio_secret_key"):
            value = getattr(settings, name)
            if name == "minio_secret_key" and not settings.uses_minio:
                continue
            if value in EXAMPLE_SECRETS:
                raise ConfigError(f"{name.upper()} must be set to a real secret when BIND is not loopback")
    for network in filter(None, (n.strip() for n in settings.metrics_allow.split(","))):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"METRICS_ALLOW has an invalid network: {network!r}") from None
