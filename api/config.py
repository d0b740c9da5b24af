"""Settings (pydantic-settings): defaults, then `.env`, then the process environment, then overrides.

Every setting is an upper-case environment variable of the same name as the field. Values are
parsed and validated once, at start-up; a bad value raises `ConfigError` naming the setting.
An empty value means "not set here", as .env.example says. `.env.example` documents each one.

To add a setting: add a field to `Settings` (type, default, bounds via Field, `description`),
document it in .env.example (tests/test_config.py checks), and read it as `settings.<name>`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INSTANCE_DIR = PROJECT_ROOT / "instance"

# -- the secret policy (the app here, check_deployment.sh and the log redaction all use it) -----------
SECRET_MIN_LENGTH = 16  # `openssl rand -hex 32` gives 64; shorter values would also scrub ordinary words in logs
# Values shipped in .env.example and other obvious placeholders; refused outside loopback.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change_me", "minioadmin", "secret", "password",
                                 "example", "todo", "placeholder"})


def secret_problem(value: str) -> str | None:
    """Why a value is not a real secret (None: it is one)."""
    lowered = value.strip().lower()
    if not lowered:
        return "it is empty"
    if lowered in PLACEHOLDER_SECRETS or lowered.startswith(("xxx", "your-")) or lowered.startswith("<"):
        return "it is a placeholder"
    if len(value) < SECRET_MIN_LENGTH:
        return f"it is shorter than {SECRET_MIN_LENGTH} characters"
    return None


class ConfigError(ValueError):
    """A setting is missing or has a value the service cannot use."""


# -- one parser for comma-separated lists ---------------------------------------------------------
def split_commas(raw: Any) -> Any:
    """'a, b,,c' -> ['a', 'b', 'c']; a list or tuple is taken as it is."""
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _network(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValueError(f"has an invalid network: {raw!r}") from None
    return raw


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
NetworkList = Annotated[tuple[Network, ...], NoDecode, BeforeValidator(split_commas)]
StringList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(split_commas)]
IntList = Annotated[tuple[Annotated[int, Field(ge=1)], ...], NoDecode, BeforeValidator(split_commas)]


def _lower(raw: Any) -> Any:
    return raw.strip().lower() if isinstance(raw, str) else raw


def _upper(raw: Any) -> Any:
    return raw.strip().upper() if isinstance(raw, str) else raw


Precision = Annotated[Literal["auto", "fp32", "fp16", "bf16"], BeforeValidator(_lower)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]

# The mapping load_settings reads as "the environment" (os.environ unless a test passes its own).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("d3_settings_environ", default=None)


class _MappingEnvSource(EnvSettingsSource):
    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        environ = os.environ if environ is None else environ
        return {k.lower(): v for k, v in environ.items() if v is not None and v.strip() != ""}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, env_ignore_empty=True,
                                      env_file=None, validate_default=False)

    # --- detector engine (see api/detector) ---
    d3_backbone: str = Field("ViT-L-14-quickgelu", description="open_clip model name of the backbone")
    d3_clip_weights: str = Field("openai", description="'openai' (open_clip tag, HF cache), a file, or random:<seed>")
    d3_head_weights: str = Field("", description="head checkpoint path, https URL, or random:<seed>")
    d3_shuffle_seed: int = Field(0, ge=0)
    d3_device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    d3_precision: Precision = "auto"
    d3_cache_dir: str = Field("", description="weights cache; default ~/.cache/d3")
    d3_max_batch_size: int = Field(32, ge=1, le=4096)
    d3_max_wait_ms: float = Field(2.0, ge=0, le=10_000, description="how long a batch waits for more images")
    d3_queue_size: int = Field(1024, ge=1)
    d3_infer_timeout_s: float = Field(120.0, ge=0.1)

    # --- inference tier (Triton; see api/detector/triton_server.py, api/detector/remote_engine.py) ---
    d3_inference_url: str = Field("", description="grpc://host:8001 or http://host:8000 of a Triton tier; "
                                                  "empty = the model in each worker")
    d3_inference_timeout_s: float = Field(5.0, ge=0.1, description="bound on one call to the tier (down or hung: 503)")
    d3_inference_model: str = Field("d3", description="model name on the tier")
    d3_inference_host: str = Field("127.0.0.1", description="address `d3 serve-inference` listens on")
    d3_inference_http_port: int = Field(8000, ge=1, le=65535)
    d3_inference_grpc_port: int = Field(8001, ge=1, le=65535)
    d3_inference_metrics_port: int = Field(8002, ge=1, le=65535)
    d3_triton_max_batch_size: int = Field(64, ge=1, le=4096, description="images per forward on the tier")
    d3_triton_preferred_batch_size: IntList = Field((), description="batch sizes Triton prefers; empty = largest")
    d3_triton_max_queue_delay_microseconds: int = Field(2000, ge=0, description="how long a batch waits for more")
    d3_triton_instances: int = Field(1, ge=1, le=16, description="model instances on the tier, one copy of the "
                                     "weights: one batch moves while another computes (2: see PERFORMANCE)")
    d3_triton_max_queue_size: int = Field(256, ge=0, description="requests waiting on the tier; more: 503")
    d3_triton_queue_timeout_microseconds: int = Field(0, ge=0, description="longer in the queue: 503; 0 = never")

    # --- speech detector: AASIST (api/detector/aasist.py, docs/AASIST.md) ---
    aasist_model: Literal["AASIST", "AASIST-L", "aasist-tiny"] = Field(
        "AASIST", description="architecture: the authors' AASIST or AASIST-L, or aasist-tiny (tests)")
    aasist_weights: str = Field("", description="checkpoint file, https URL, or random:<seed>; empty = "
                                                "<D3_CACHE_DIR>/aasist/<AASIST_MODEL>.pth")
    aasist_device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    aasist_max_batch_size: int = Field(8, ge=1, le=1024, description="windows per forward pass")
    audio_hop_seconds: float = Field(4.0375, gt=0, le=600, description="step between scoring windows "
                                                                       "(a window is 4.0375 s)")
    max_audio_bytes: int = Field(100 * 1024 * 1024, ge=1)
    max_audio_seconds: float = Field(600.0, ge=0.1)
    audio_async_seconds: float = Field(120.0, ge=0.1, description="recordings longer than this run async")
    keep_audio: bool = Field(False, description="keep uploaded audio in BUCKET_MEDIA")

    # --- text detector: Fast-DetectGPT (api/detector/fast_detectgpt.py, docs/FAST_DETECTGPT.md) ---
    text_scoring_model: str = Field("EleutherAI/gpt-neo-2.7B", description="Hugging Face name[@revision], "
                                                                           "model folder, or random:<seed>")
    text_sampling_model: str = Field("EleutherAI/gpt-j-6B@float16", description="the sampling (reference) model")
    text_calibration: str = Field("", description="criterion-to-probability constants; empty = from the pair")
    text_device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    text_precision: Precision = "auto"
    text_min_tokens: int = Field(32, ge=2)
    text_max_tokens: int = Field(16_384, ge=2)
    text_max_chars: int = Field(100_000, ge=1)
    text_chunk_tokens: int = Field(0, ge=0, description="tokens per chunk; 0 = the models' context length")
    text_max_batch_size: int = Field(4, ge=1, le=256, description="chunks per forward pass")
    max_text_bytes: int = Field(1024 * 1024, ge=1, description="largest text upload (file or JSON body)")
    keep_texts: bool = Field(False, description="keep submitted texts in BUCKET_MEDIA")

    # --- HTTP service ---
    bind: str = Field("127.0.0.1:6000", description="host:port Gunicorn binds (also decides auth rules)")
    secret_key: SecretStr = Field(SecretStr(""), description="signs local result URLs; generated per process if "
                                                             "empty")
    instance_dir: str = str(DEFAULT_INSTANCE_DIR)
    default_threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_batch_files: int = Field(64, ge=1, le=1024)
    result_url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    log_level: LogLevel = "INFO"

    # --- database ---
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in the instance folder")

    # --- object store ---
    minio_endpoint: str = Field("", description="host:port of MinIO/S3; empty = local folder store")
    minio_access_key: SecretStr = SecretStr("")
    minio_secret_key: SecretStr = SecretStr("")
    minio_secure: bool = True
    minio_region: str = "us-east-1"
    object_store_dir: str = Field("", description="local object store folder; default <instance>/objects")
    bucket_results: str = "d3-results"
    bucket_videos: str = "d3-videos"
    bucket_frames: str = "d3-frames"
    bucket_media: str = Field("d3-media", description="kept audio and text inputs (KEEP_AUDIO, KEEP_TEXTS)")
    bucket_models: str = Field("d3-models", description="heads and model cards of the model versions")

    # --- video ---
    max_video_bytes: int = Field(500 * 1024 * 1024, ge=1)
    max_video_seconds: float = Field(600.0, ge=0.1)
    default_video_frames: int = Field(32, ge=1)
    max_video_frames: int = Field(256, ge=1)
    keep_videos: bool = True
    # Provenance (C2PA + IPTC digital source type), reported beside the verdict: docs/PROVENANCE.md.
    c2pa_trust_anchors: str = Field("", description="PEM file of trusted C2PA root certificates (empty: none)")
    provenance_timeout_s: float = Field(5.0, gt=0, le=120)
    provenance_memory_mb: int = Field(512, ge=64, le=16384)
    provenance_max_xmp_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    video_async_bytes: int = Field(100 * 1024 * 1024, ge=1, description="uploads larger than this run async")
    video_async_seconds: float = Field(120.0, ge=0.1, description="videos longer than this run async")
    video_workers: int = Field(2, ge=1, le=64)
    video_decode_timeout_s: float = Field(120.0, ge=1)
    video_decode_memory_mb: int = Field(4096, ge=64)
    callback_allow_http: bool = False
    callback_allow_private: bool = False

    # --- video job queue (api/services/jobs.py, api/tasks.py, api/worker.py) ---
    celery_broker_url: SecretStr = Field(SecretStr(""), description="Celery broker; default REDIS_URL")
    video_executor: Annotated[Literal["auto", "threads", "celery"], BeforeValidator(_lower)] = Field(
        "auto", description="auto: Celery when a broker is set, else threads in the API process")
    job_max_attempts: int = Field(3, ge=1, le=100, description="claims of a job before it is failed")
    job_heartbeat_s: float = Field(20.0, ge=0.05, description="how often a running job says it is alive")
    job_stale_after_s: float = Field(300.0, ge=0.2, description="silence after which a running job is re-queued")
    celery_visibility_timeout_s: float = Field(3600.0, ge=1.0,
                                               description="unacknowledged messages go back to the queue after this")

    # --- access control and limits ---
    auth_required: bool = True
    rate_limit_default: str = "120/minute"
    rate_limit_video: str = "10/minute"
    redis_url: str = ""
    video_jobs_per_key: int = Field(2, ge=1)
    metrics_allow: NetworkList = Field(("127.0.0.0/8", "::1/128"), validate_default=True,
                                       description="comma-separated networks allowed to read /metrics")
    cors_origins: StringList = Field((), description="comma-separated allow-list; empty = CORS off")

    # --- outside systems: deadlines and failing fast (api/breakers.py, api/health_probe.py) ---
    db_timeout_s: float = Field(3.0, ge=0.1, le=600,
                                description="deadline of each database round trip (connect, each statement)")
    store_timeout_s: float = Field(3.0, ge=0.1, le=600,
                                   description="object store deadline per attempt (connect + response)")
    store_retries: int = Field(1, ge=0, le=10, description="object store retries of a failed attempt")
    redis_timeout_s: float = Field(0.5, ge=0.05, le=60, description="rate-limit Redis socket deadline")
    callback_timeout_s: float = Field(5.0, ge=0.1, le=120, description="webhook deadline per attempt")
    probe_interval_s: float = Field(1.0, ge=0.05, le=300, description="how often /health's prober checks")
    model_version_poll_s: float = Field(2.0, ge=0.05, le=300,
                                        description="how often a model-serving process reads the active version")
    probe_timeout_s: float = Field(2.0, ge=0.05, le=60, description="deadline of each probe")
    breaker_fail_max: int = Field(3, ge=1, description="failures in a row that open a system's breaker")
    max_in_flight_per_system: int = Field(
        0, ge=0, description="request threads of a worker that may wait on one outside system at once; "
                             "0 = half of GUNICORN_THREADS (at least 4) + VIDEO_WORKERS")
    reconcile_interval_s: float = Field(3600.0, ge=0, description="background store reconcile; 0 = off")
    reconcile_grace_s: float = Field(3600.0, ge=0, description="age before an object without a row is removed")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: overrides, then the environment, then .env; the field defaults last.
        return init_settings, _MappingEnvSource(settings_cls), dotenv_settings

    # -- single values --------------------------------------------------------------------------------
    @field_validator("d3_device", "aasist_device", "text_device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("d3_inference_url")
    @classmethod
    def _inference_url(cls, value: str) -> str:
        value = value.strip()
        if value and not (value.startswith(("grpc://", "http://", "https://")) and value.split("://", 1)[1].strip("/")):
            raise ValueError(f"must be grpc://host:port or http(s)://host:port, got {value!r}")
        return value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        value = value.strip()
        if ":" not in value:
            raise ValueError("must be host:port")
        if not value.rsplit(":", 1)[1].isdigit():
            raise ValueError("must end in a port number")
        return value

    # -- rules across fields ------------------------------------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_video_frames > self.max_video_frames:
            raise ValueError("DEFAULT_VIDEO_FRAMES must not exceed MAX_VIDEO_FRAMES")
        if self.video_executor == "celery" and not self.broker_url:
            raise ValueError("VIDEO_EXECUTOR=celery needs CELERY_BROKER_URL or REDIS_URL")
        if self.job_stale_after_s <= 2 * self.job_heartbeat_s:
            raise ValueError("JOB_STALE_AFTER_S must be more than twice JOB_HEARTBEAT_S")
        if self.uses_minio and not (self.minio_access_key.get_secret_value()
                                    and self.minio_secret_key.get_secret_value()):
            raise ValueError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required when MINIO_ENDPOINT is set")
        if not self.binds_loopback:
            if not self.auth_required:
                raise ValueError(
                    f"AUTH_REQUIRED=false is only allowed when BIND is a loopback address, not {self.bind!r}")
            secrets = [("SECRET_KEY", self.secret_key)]
            if self.uses_minio:
                secrets.append(("MINIO_SECRET_KEY", self.minio_secret_key))
            for name, value in secrets:
                problem = secret_problem(value.get_secret_value())
                if problem:
                    raise ValueError(f"{name} must be set to a real secret when BIND is not loopback ({problem})")
        return self

    # ------------------------------------------------------------------
    @property
    def bind_host(self) -> str:
        host = self.bind.rsplit(":", 1)[0]
        return host.strip("[]")

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
        """MAX_IN_FLIGHT_PER_SYSTEM, or half the worker's request threads (at least 4) plus its video job
        threads (they use the database and the store too): a frozen system never holds them all."""
        if self.max_in_flight_per_system:
            return self.max_in_flight_per_system
        try:
            threads = int(os.environ.get("GUNICORN_THREADS", "2"))
        except ValueError:
            threads = 2
        return max(4, threads // 2) + self.video_workers

    @property
    def uses_minio(self) -> bool:
        return bool(self.minio_endpoint)

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url.get_secret_value() or self.redis_url

    @property
    def uses_celery(self) -> bool:
        """Video jobs go to the Celery worker tier (else: threads in the API process)."""
        if self.video_executor == "auto":
            return bool(self.broker_url)
        return self.video_executor == "celery"

    def secret_values(self) -> list[str]:
        """Every configured secret value (for the log redaction)."""
        return [s.get_secret_value() for s in (self.secret_key, self.minio_access_key, self.minio_secret_key)]

    def public_view(self) -> dict[str, Any]:
        """Every setting, with secrets masked: safe to print or log."""
        view: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif isinstance(value, tuple):
                value = ",".join(str(item) for item in value)
            view[name.upper()] = value
        return view


_MESSAGES = {
    "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
}


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors(include_url=False)[0]
    kind, ctx, raw = first["type"], first.get("ctx", {}), first.get("input")
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    if not first.get("loc"):  # a rule across fields: its message names the settings itself
        return ConfigError(message)
    name = str(first["loc"][0]).upper()
    if kind in _MESSAGES:
        message = _MESSAGES[kind]
    elif kind == "greater_than_equal":
        message = f"must be at least {ctx['ge']}"
    elif kind == "less_than_equal":
        message = f"must be at most {ctx['le']}"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '')}"
    if name in ("METRICS_ALLOW", "CORS_ORIGINS") or kind == "value_error":
        return ConfigError(f"{name} {message}" + ("" if "got" in message or "network" in message
                                                   else f", got {raw!r}"))
    return ConfigError(f"{name} {message}, got {raw!r}")


def load_settings(overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                  env_file: str | os.PathLike | None = None) -> Settings:
    """Build validated settings; later sources win: defaults < .env < environment < overrides."""
    env_path = Path(env_file) if env_file else PROJECT_ROOT / ".env"
    given = {k.lower(): v for k, v in (overrides or {}).items() if v is not None and str(v).strip() != ""}
    token = _ENVIRON.set(environ)
    try:
        return Settings(_env_file=env_path if env_path.is_file() else None, **given)
    except ValidationError as exc:
        raise _config_error(exc) from None
    finally:
        _ENVIRON.reset(token)
