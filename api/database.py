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
from sqlalchemy.pool import NullPool

from api import pg_deadline
from api.breakers import Guard
from api.exceptions import DatabaseUnavailable

__all__ = ["Database", "DatabaseUnavailable", "SchemaNotMigrated"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


# Connection-level failures: the server is down, unreachable, restarting, or (SQLite) locked. Every
# other SQLAlchemyError (IntegrityError, ProgrammingError, ...) is a bug and propagates as itself.
CONNECTION_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


class SchemaNotMigrated(RuntimeError):
    """The database schema is missing or older than this code expects."""


def make_engine(url: str, timeout_s: float | None = None, *, pooled: bool = True) -> Engine:
    """The engine for `url`; with `timeout_s`, every PostgreSQL round trip has that deadline."""
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
    connect_args: dict = {"connect_timeout": 5}
    if timeout_s is not None and parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg2":
        # A frozen server answers nothing and no socket option notices: the deadline is ours
        # (api/pg_deadline.py). The server gives up on the same statement too, so an abandoned
        # query or lock wait does not keep running there.
        pg_deadline.install()
        ms = max(1, int(timeout_s * 1000))
        connect_args = {"connect_timeout": max(1, round(timeout_s)),
                        "connection_factory": pg_deadline.connection_factory(timeout_s),
                        "options": f"-c statement_timeout={ms} -c lock_timeout={ms}"}
    if not pooled:
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         pool_timeout=timeout_s or 30, connect_args=connect_args)


def is_outage(exc: BaseException) -> bool:
    """Did the database fail (unreachable, timed out), rather than the caller's code?"""
    return isinstance(exc, (DatabaseUnavailable, *CONNECTION_ERRORS))


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
    """Owns the engine; hands out sessions that commit on success and roll back on error.

    With `timeout_s` every round trip has that deadline, and a guard (api/breakers.py) fails
    sessions fast once the database is seen failing.
    """

    def __init__(self, url: str, timeout_s: float | None = None, *, fail_max: int = 3,
                 max_in_flight: int = 8) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.engine = make_engine(url, timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.guard = Guard("database", DatabaseUnavailable, fail_max=fail_max, max_in_flight=max_in_flight,
                           is_failure=is_outage)
        self._probe_engines: dict[float, Engine] = {}

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.guard.call():
            session = self._sessions()
            committing = False
            try:
                yield session
                session.flush()
                committing = True  # from here a lost answer leaves the outcome unknown
                session.commit()
            except CONNECTION_ERRORS as exc:
                session.rollback()
                error = DatabaseUnavailable()
                error.commit_unknown = committing
                raise error from exc
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    def probe(self, timeout_s: float) -> None:
        """One fresh connection and SELECT 1 within `timeout_s`, past the guard; raises DatabaseUnavailable."""
        engine = self._probe_engines.get(timeout_s)
        if engine is None:
            engine = self._probe_engines[timeout_s] = make_engine(self.url, timeout_s, pooled=False)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:160]
            raise DatabaseUnavailable(f"{exc.__class__.__name__}: {detail}") from exc

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
        for engine in self._probe_engines.values():
            engine.dispose()
