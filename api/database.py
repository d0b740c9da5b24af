"""The database: one SQLAlchemy engine per process, sessions, schema migrations (Alembic)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from api.exceptions import DatabaseUnavailable

__all__ = ["Database", "DatabaseUnavailable", "SchemaNotMigrated"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


# Connection-level failures: the server is down, unreachable, restarting, or (SQLite) locked. Every
# other SQLAlchemyError (IntegrityError, ProgrammingError, ...) is a bug and propagates as itself.
CONNECTION_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


class SchemaNotMigrated(RuntimeError):
    """The database schema is missing or older than this code expects."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # WAL lets readers run beside the writer
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable enough, no fsync per commit
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Short connect timeout: a dead database should turn into a quick 503, not a hung worker.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args={"connect_timeout": 5})


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config("")).get_current_head()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade_schema(url: str, revision: str = "head") -> None:
    command.upgrade(_alembic_config(url), revision)


class Database:
    """Owns the engine; hands out sessions that commit on success and roll back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except CONNECTION_ERRORS as exc:
            session.rollback()
            raise DatabaseUnavailable() from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def require_migrated(self) -> None:
        """Refuse to serve on a database whose schema is not at this code's head revision."""
        try:
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {exc.__class__.__name__}: {exc}") from exc
        head = head_revision()
        if current != head:
            raise SchemaNotMigrated(
                f"the database schema is at revision {current or 'none'}, this code needs {head}: "
                "run `d3 db upgrade` first")

    def dispose(self) -> None:
        self.engine.dispose()
