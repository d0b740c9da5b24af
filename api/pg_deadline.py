"""A client-side deadline on every PostgreSQL round trip (psycopg2), connect included.

A frozen server (SIGSTOP, a stuck VM, a full disk) still has a kernel that completes the TCP
handshake and ACKs what we send, so neither libpq's `connect_timeout` (it only bounds blocking
connects, and not the startup exchange with a server that never answers) nor TCP keepalive /
tcp_user_timeout ever fire: a statement on a pooled connection waits forever. Server-side
timeouts (statement_timeout) need a server that runs.

psycopg2's wait callback (`psycopg2.extensions.set_wait_callback`) makes libpq non-blocking and
lets us wait on the socket ourselves with select() and a deadline. When the deadline passes we
raise `DeadlineExceeded` (an OperationalError): psycopg2 then closes the connection, SQLAlchemy
sees a closed DBAPI connection (a disconnect) and drops it from the pool. Hand-written because
neither psycopg2 nor SQLAlchemy ships a deadline for a server that stops answering; it follows
psycopg2.extras.wait_select.

The deadline belongs to the connection: `connection_factory(seconds)` gives the psycopg2
connection class `make_engine` passes (DB_TIMEOUT_S), one number for the connect and for each
statement (libpq's own connect_timeout takes whole seconds only). The callback is process-wide
(psycopg2 allows one); a connection made without such a class (migrations, scripts) waits as
long as it takes, as psycopg2 does by default.
"""

from __future__ import annotations

import functools
import select
import time

import psycopg2
from psycopg2 import extensions


class DeadlineExceeded(psycopg2.OperationalError):
    """PostgreSQL did not answer within the deadline; the connection has been closed."""


class _DeadlineConnection(extensions.connection):
    deadline_s: float | None = None


@functools.lru_cache(maxsize=32)
def connection_factory(seconds: float) -> type[extensions.connection]:
    """A psycopg2 connection class whose every round trip has `seconds` to complete."""
    return type(f"DeadlineConnection{seconds:g}s", (_DeadlineConnection,), {"deadline_s": float(seconds)})


def wait_with_deadline(conn: extensions.connection) -> None:
    """psycopg2 wait callback: poll the connection until done, within its deadline if it has one."""
    limit = getattr(conn, "deadline_s", None)
    deadline = time.monotonic() + limit if limit else None
    fd = conn.fileno()
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"PostgreSQL did not answer within {limit:g} s")
        if state == extensions.POLL_READ:
            select.select([fd], [], [], left)
        elif state == extensions.POLL_WRITE:
            select.select([], [fd], [], left)
        else:  # pragma: no cover - psycopg2 documents only the states above
            raise psycopg2.OperationalError(f"unexpected psycopg2 poll state {state}")


def install() -> None:
    """Idempotent: every psycopg2 connection of this process waits through wait_with_deadline."""
    if extensions.get_wait_callback() is not wait_with_deadline:
        extensions.set_wait_callback(wait_with_deadline)
