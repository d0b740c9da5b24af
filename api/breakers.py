"""Fail fast once an outside system is seen failing: a circuit breaker and a bulkhead per system.

Each outside system (database, object store, Redis, the inference tier) owns one `Guard`. Every
call to it goes through `guard.call()`:

- the circuit breaker (pybreaker) opens after `fail_max` failures in a row, or at once when the
  background prober (api/health_probe.py) sees the system down; while open, calls fail at once
  instead of each waiting out its deadline. The prober closes it again as soon as it sees the
  system answer, so recovery does not wait for a timer (`reset_timeout` is only a backstop for
  processes without a prober, e.g. the `d3` command);
- the bulkhead bounds how many threads may wait on the system at once (`max_in_flight`): a frozen
  system can hold at most that many of a worker's request threads, the others fail fast (after
  waiting SLOT_WAIT_S for a slot) and stay free for /health and for requests that do not need it.

Only failures of the system count (timeouts, refused connections), never a caller's own error:
`is_failure` decides. A refused call raises the `unavailable` exception the guard was made with,
so callers see the same error as for a failed call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pybreaker

# Without a prober, an open breaker lets one trial call through after this long.
BACKSTOP_RESET_S = 30.0
# A healthy system's calls take milliseconds: a short wait for a slot absorbs contention, while
# slots held by a frozen system (for its whole deadline) make the others fail fast.
SLOT_WAIT_S = 0.5


class Guard:
    def __init__(self, name: str, unavailable: Callable[[str], Exception], *, fail_max: int = 3,
                 max_in_flight: int = 4, is_failure: Callable[[BaseException], bool] = lambda exc: True,
                 reset_timeout_s: float = BACKSTOP_RESET_S) -> None:
        self.name = name
        self._unavailable = unavailable
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout_s, name=name, throw_new_error_on_trip=False,
            exclude=[lambda exc: not is_failure(exc)])
        self.opened_at: float | None = None  # wall clock, for /health's "since"
        self.reason: str | None = None
        self.on_failure: list[Callable[[], None]] = []  # the prober's "look now"
        self.breaker.add_listener(_Listener(self))

    @property
    def is_open(self) -> bool:
        return self.breaker.current_state == pybreaker.STATE_OPEN

    @contextmanager
    def call(self) -> Iterator[None]:
        """Run the body as one call to the system, or refuse at once (breaker open, bulkhead full)."""
        if not self._slots.acquire(timeout=SLOT_WAIT_S):
            raise self._unavailable(f"the {self.name} is not answering ({self.max_in_flight} calls are already "
                                    "waiting on it); retry shortly")
        try:
            try:
                with self.breaker.calling():
                    yield
            except pybreaker.CircuitBreakerError:
                # The reason (self.reason) is for the logs and /health, not for every client.
                raise self._unavailable(f"the {self.name} is unavailable (failing fast until it answers "
                                        "again); retry shortly") from None
        finally:
            self._slots.release()

    # -- the prober's verdicts ------------------------------------------------------------------
    def mark_down(self, reason: str) -> None:
        self.reason = reason
        if not self.is_open:
            self.breaker.open()

    def mark_up(self) -> None:
        if self.breaker.current_state != pybreaker.STATE_CLOSED:
            self.breaker.close()
        self.reason = None


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.guard.opened_at = time.time()
        elif new_state.name == pybreaker.STATE_CLOSED:
            self.guard.opened_at = None

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.guard.reason = str(exc)[:200] or type(exc).__name__
        for hook in self.guard.on_failure:
            hook()
