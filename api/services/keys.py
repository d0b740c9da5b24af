"""API keys: create, list, revoke, and verify a presented key. Only a hash of each key is stored.

A key reads `d3_<id>_<secret>`: the id is public (listings, logs, the `owner` of predictions) and
finds the row; the secret is 256 random bits. Because the secret is random (not a password), one
SHA-256 is the right hash: nothing to brute-force, and verification costs microseconds. The
comparison is constant-time, and an unknown id costs the same work as a wrong secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum

from sqlalchemy import select

from api.database import Database
from api.exceptions import InvalidInput, NotFound
from api.models import ApiKey

PREFIX = "d3"
ID_HEX_CHARS = 16
SECRET_BYTES = 32
# The whole shape of a key: anything else is refused before the database is asked.
KEY_PATTERN = re.compile(r"^d3_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")
# Any key-shaped text, for scrubbing logs (see api/request_log.py).
KEY_LIKE = re.compile(r"d3_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}")
MAX_NAME_LENGTH = 128
# last_used_at is a hint for operators, not an audit trail: write it at most this often per key.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_DUMMY_HASH = "sha256:" + "0" * 64


class KeyProblem(str, Enum):
    """Why a presented key was refused (the 401 message says it; the secret itself never)."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown"  # unknown id or wrong secret: indistinguishable to the caller
    REVOKED = "revoked"


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed and as the request sees its caller: never the secret, never the hash."""

    id: str
    name: str
    is_admin: bool
    created_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Verification:
    key: KeyInfo | None
    problem: KeyProblem | None = None


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(id=row.id, name=row.name, is_admin=bool(row.is_admin), created_at=_utc(row.created_at),
                   revoked_at=_utc(row.revoked_at), last_used_at=_utc(row.last_used_at))


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite hands back naive UTC
        return value.replace(tzinfo=timezone.utc)
    return value


class KeyService:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- administration (the `d3 keys` commands) ---------------------------------------
    def create(self, name: str, is_admin: bool = False) -> tuple[KeyInfo, str]:
        """A new key; the returned plaintext is the only copy that will ever exist."""
        name = name.strip()
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidInput(f"key name must be 1-{MAX_NAME_LENGTH} printable characters", parameter="name")
        key_id = secrets.token_hex(ID_HEX_CHARS // 2)
        plaintext = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        assert KEY_PATTERN.match(plaintext)
        row = ApiKey(id=key_id, name=name, key_hash=hash_key(plaintext), is_admin=is_admin,
                     created_at=datetime.now(timezone.utc))
        with self.db.session() as session:
            session.add(row)
        return _info(row), plaintext

    def list(self, include_revoked: bool = True) -> list[KeyInfo]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self.db.session() as session:
            return [_info(row) for row in session.scalars(query)]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke by public id; revoking twice keeps the first revocation time."""
        with self.db.session() as session:
            row = session.get(ApiKey, key_id.strip())
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(timezone.utc)
            return _info(row)

    # -- per request -----------------------------------------------------------------
    def verify(self, presented: str) -> Verification:
        """Check a presented key. Raises DatabaseUnavailable only when the database cannot answer."""
        match = KEY_PATTERN.match(presented)
        if match is None:
            return Verification(None, KeyProblem.MALFORMED)
        with self.db.session() as session:
            row = session.get(ApiKey, match["id"])
            stored = row.key_hash if row is not None else _DUMMY_HASH
            # Same work whether or not the id exists: hash, then a constant-time compare.
            valid = hmac.compare_digest(stored.encode(), hash_key(presented).encode()) and row is not None
            if not valid:
                return Verification(None, KeyProblem.UNKNOWN)
            assert row is not None
            if row.revoked_at is not None:
                return Verification(None, KeyProblem.REVOKED)
            now = datetime.now(timezone.utc)
            last = _utc(row.last_used_at)
            if last is None or now - last >= LAST_USED_RESOLUTION:
                row.last_used_at = now
            return Verification(_info(row))
