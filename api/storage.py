"""The object store: MinIO/S3 through the `minio` SDK, or a local folder when none is configured.

Both stores share one small interface so services never know which one they talk to. Keys are
always made by the service (date prefix + id); nothing here trusts a client-supplied name.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from api.breakers import Guard
from api.config import Settings
from api.exceptions import StoreUnavailable

__all__ = ["LocalObjectStore", "MinioObjectStore", "ObjectNotFound", "ObjectStore", "StoreError",
           "StoreUnavailable", "make_object_store", "object_key"]
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


# S3 error codes that mean "busy or briefly down, retry": the rest (AccessDenied, NoSuchBucket, ...) are
# configuration or code bugs, a 500 with the cause in the log, not a "retry shortly".
TRANSIENT_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                                "XMinioServerNotInitialized", "XMinioStorageFull"})


class StoreError(RuntimeError):
    """The object store refused an operation for a reason retrying will not fix."""


class ObjectNotFound(KeyError):
    """No object under that bucket and key."""


class PendingDeletes:
    """Objects that must go but could not be deleted yet (the store was failing): retried later.

    A put that timed out may still land when a frozen store wakes up, after our delete. So an
    entry is deleted again at every retry until SETTLE_S after its first successful delete;
    the reconciler (api/services/reconcile.py) catches whatever lands later still.
    """

    SETTLE_S = 15.0

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], float | None] = {}  # -> when first deleted

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, bucket: str, key: str) -> None:
        with self._lock:
            self._entries.setdefault((bucket, key), None)

    def retry(self) -> int:
        """Delete what is owed; returns how many entries are still owed."""
        with self._lock:
            entries = list(self._entries.items())
        now = time.monotonic()
        for (bucket, key), first_deleted in entries:
            try:
                self._store.delete(bucket, key)
            except (StoreUnavailable, ObjectNotFound, ValueError):
                continue
            with self._lock:
                if first_deleted is None:
                    self._entries[(bucket, key)] = now
                elif now - first_deleted >= self.SETTLE_S:
                    self._entries.pop((bucket, key), None)
        return len(self._entries)


def object_key(object_id: str, suffix: str, when: datetime | None = None) -> str:
    """A server-made key: `YYYY/MM/DD/<id><suffix>`."""
    when = when or datetime.now(timezone.utc)
    return f"{when:%Y/%m/%d}/{object_id}{suffix}"


def media_bucket(settings: Settings, media_type: str) -> str:
    """Where a prediction's kept input (`media_object`) lives: videos in their own bucket (a job's upload
    becomes the kept video), kept audio and texts (KEEP_AUDIO, KEEP_TEXTS) in the media bucket."""
    return settings.bucket_videos if media_type == "video" else settings.bucket_media


def _check_key(key: str) -> None:
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")


class ObjectStore(Protocol):
    buckets: tuple[str, ...]
    guard: Guard
    pending_deletes: PendingDeletes

    def ensure_buckets(self) -> None: ...
    def ping(self) -> bool: ...
    def missing_buckets(self) -> list[str]: ...
    def list_objects(self, bucket: str) -> Iterator[tuple[str, datetime]]: ...
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> None: ...
    def put_file(self, bucket: str, key: str, path: str | os.PathLike, content_type: str) -> None: ...
    def get_bytes(self, bucket: str, key: str) -> bytes: ...
    def download_file(self, bucket: str, key: str, path: str | os.PathLike) -> None: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def presigned_get_url(self, bucket: str, key: str, expires_s: int) -> str: ...


class LocalObjectStore:
    """Objects as files under `root/<bucket>/<key>`; URLs are HMAC-signed links to the API itself."""

    def __init__(self, root: str | os.PathLike, buckets: tuple[str, ...], signing_key: bytes,
                 url_prefix: str = "/objects") -> None:
        self.root = Path(root)
        self.buckets = buckets
        self._signing_key = signing_key
        self._url_prefix = url_prefix
        self.guard = Guard("object store", StoreUnavailable)  # a local disk: only for a uniform interface
        self.pending_deletes = PendingDeletes(self)

    def _path(self, bucket: str, key: str) -> Path:
        if bucket not in self.buckets:
            raise ObjectNotFound(f"{bucket}/{key}")
        _check_key(key)
        return self.root / bucket / key

    def ensure_buckets(self) -> None:
        try:
            for bucket in self.buckets:
                (self.root / bucket).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create local object store folders under {self.root}: {exc}") from exc

    def ping(self) -> bool:
        return all(os.access(self.root / b, os.W_OK) for b in self.buckets)

    def missing_buckets(self) -> list[str]:
        """Buckets whose folder is missing or not writable (probed by api/health_probe.py)."""
        return [b for b in self.buckets if not os.access(self.root / b, os.W_OK)]

    def list_objects(self, bucket: str) -> Iterator[tuple[str, datetime]]:
        """Every (key, last modified) in a bucket; half-written `.part-` files are not objects."""
        base = self.root / bucket
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(".part-"):
                with contextlib.suppress(FileNotFoundError):
                    yield (path.relative_to(base).as_posix(),
                           datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))

    def _write(self, bucket: str, key: str, writer) -> None:
        path = self._path(bucket, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half an object.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            with os.fdopen(fd, "wb") as out:
                writer(out)
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreUnavailable() from exc

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self._write(bucket, key, lambda out: out.write(data))

    def put_file(self, bucket: str, key: str, path: str | os.PathLike, content_type: str) -> None:
        def copy(out) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)

        self._write(bucket, key, copy)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        try:
            return self._path(bucket, key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{bucket}/{key}") from None
        except OSError as exc:
            raise StoreUnavailable() from exc

    def download_file(self, bucket: str, key: str, path: str | os.PathLike) -> None:
        try:
            shutil.copyfile(self._path(bucket, key), path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{bucket}/{key}") from None

    def exists(self, bucket: str, key: str) -> bool:
        return self._path(bucket, key).is_file()

    def delete(self, bucket: str, key: str) -> None:
        self._path(bucket, key).unlink(missing_ok=True)

    # -- signed links -------------------------------------------------
    # HMAC-SHA256 over bucket, key and expiry, by hand rather than itsdangerous: the link keeps the
    # shape of an S3 presigned URL (expires=, signature= in the query), the same as MinIO's.
    def _signature(self, bucket: str, key: str, expires: int) -> str:
        message = f"{bucket}\n{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def presigned_get_url(self, bucket: str, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        signature = self._signature(bucket, key, expires)
        return f"{self._url_prefix}/{bucket}/{quote(key)}?expires={expires}&signature={signature}"

    def verify_signature(self, bucket: str, key: str, expires: str, signature: str) -> bool:
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if expires_at < time.time():
            return False
        # Bytes, not str: compare_digest refuses non-ASCII strings (a hostile link must be a 404, not a 500).
        return hmac.compare_digest(self._signature(bucket, key, expires_at).encode(),
                                   (signature or "").encode("utf-8", "surrogateescape"))

    def read_signed(self, bucket: str, key: str, expires: str, signature: str) -> bytes:
        """The object behind a signed link; ObjectNotFound also for a bad or expired signature."""
        if not self.verify_signature(bucket, key, expires, signature):
            raise ObjectNotFound(f"{bucket}/{key}: no such object, or the link has expired")
        try:
            return self.get_bytes(bucket, key)
        except ValueError:  # a key outside the bucket's folder (../)
            raise ObjectNotFound(f"{bucket}/{key}") from None


class MinioObjectStore:
    """MinIO or any S3-protocol server."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, *, secure: bool, region: str,
                 buckets: tuple[str, ...], timeout_s: float = 3.0, retries: int = 1, fail_max: int = 3,
                 max_in_flight: int = 8) -> None:
        # Each attempt has `timeout_s` in all (connect + response), and only `retries` more attempts
        # follow: a call takes at most (retries + 1) * timeout_s (+ 0.1 s backoff), then 503. A
        # frozen store accepts connections (the kernel does) and never answers: the read deadline
        # is what ends the wait.
        self.timeout_s = timeout_s
        self.retries = retries
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=timeout_s, connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=retries, connect=retries, read=retries, status=retries,
                                  backoff_factor=0.1, backoff_max=1.0, status_forcelist=[502, 503, 504]),
            maxsize=32,
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http)
        self.buckets = buckets
        self.guard = Guard("object store", StoreUnavailable, fail_max=fail_max, max_in_flight=max_in_flight,
                           is_failure=lambda exc: isinstance(exc, StoreUnavailable))
        self.pending_deletes = PendingDeletes(self)

    @property
    def budget_s(self) -> float:
        """The longest one call can take before it fails."""
        return (self.retries + 1) * self.timeout_s + self.retries * 0.1

    def _call(self, what: str, fn, *args, **kwargs):
        with self.guard.call():
            return self._unguarded(what, fn, *args, **kwargs)

    def _unguarded(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(what) from None
            if exc.code in TRANSIENT_S3_CODES:
                raise StoreUnavailable() from exc
            raise StoreError(f"object store refused {what}: {exc.code}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StoreUnavailable() from exc

    def ensure_buckets(self) -> None:
        # Past the guard: the prober creates missing buckets as soon as the store is back.
        call = self._unguarded
        for bucket in self.buckets:
            if not call(f"bucket check {bucket}", self.client.bucket_exists, bucket):
                try:
                    call(f"create bucket {bucket}", self.client.make_bucket, bucket)
                except (StoreError, StoreUnavailable):
                    # Another worker may have created it between our check and our create.
                    if not call(f"bucket check {bucket}", self.client.bucket_exists, bucket):
                        raise

    def ping(self) -> bool:
        try:
            return not self.missing_buckets()
        except (StoreError, StoreUnavailable):
            return False

    def missing_buckets(self) -> list[str]:
        """Buckets that do not exist; past the guard (the prober calls it); StoreUnavailable if unreachable."""
        return [b for b in self.buckets
                if not self._unguarded(f"bucket check {b}", self.client.bucket_exists, b)]

    def list_objects(self, bucket: str) -> Iterator[tuple[str, datetime]]:
        listing = self._call(f"list {bucket}", self.client.list_objects, bucket, recursive=True)
        while True:
            item = self._call(f"list {bucket}", next, listing, None)
            if item is None:
                return
            if not item.is_dir:
                yield item.object_name, item.last_modified

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        _check_key(key)
        self._call(f"put {bucket}/{key}", self.client.put_object, bucket, key, io.BytesIO(data), len(data),
                   content_type=content_type)

    def put_file(self, bucket: str, key: str, path: str | os.PathLike, content_type: str) -> None:
        _check_key(key)
        self._call(f"put {bucket}/{key}", self.client.fput_object, bucket, key, str(path),
                   content_type=content_type)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {bucket}/{key}", read)

    def download_file(self, bucket: str, key: str, path: str | os.PathLike) -> None:
        self._call(f"get {bucket}/{key}", self.client.fget_object, bucket, key, str(path))

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._call(f"stat {bucket}/{key}", self.client.stat_object, bucket, key)
            return True
        except ObjectNotFound:
            return False

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"delete {bucket}/{key}", self.client.remove_object, bucket, key)

    def presigned_get_url(self, bucket: str, key: str, expires_s: int) -> str:
        return self._call(f"presign {bucket}/{key}", self.client.presigned_get_object, bucket, key,
                          expires=timedelta(seconds=expires_s))


def make_object_store(settings: Settings, signing_key: bytes) -> ObjectStore:
    """The store the settings ask for: MinIO when MINIO_ENDPOINT is set, else the local folder."""
    buckets = (settings.bucket_results, settings.bucket_videos, settings.bucket_frames, settings.bucket_media,
               settings.bucket_models)
    if settings.uses_minio:
        return MinioObjectStore(settings.minio_endpoint, settings.minio_access_key.get_secret_value(),
                                settings.minio_secret_key.get_secret_value(),
                                secure=settings.minio_secure, region=settings.minio_region, buckets=buckets,
                                timeout_s=settings.store_timeout_s, retries=settings.store_retries,
                                fail_max=settings.breaker_fail_max,
                                max_in_flight=settings.resolved_max_in_flight)
    return LocalObjectStore(settings.resolved_object_store_dir, buckets, signing_key)
