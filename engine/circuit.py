"""A circuit breaker in front of the backend. Plain Python: no backend, no event loop.

* Closed: requests pass. ``failures_to_open`` backend faults in a row open it; any success
  resets the count.
* Open: requests are refused at once (the caller tells the user to come back later) for
  ``reset_s``; waiting would only end in the same failure, slowly.
* Half-open: once the cool-down is over, one request is let through as a probe. Its success
  closes the circuit; a backend fault opens it again for another ``reset_s``. A probe that
  ends for a reason that says nothing about the backend (cancelled, a bad photo, a deadline
  in the queue) hands its turn to the next request.

Only the caller knows what counts as a backend fault; it reports outcomes here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive backend faults and decides whether new requests may pass."""

    def __init__(
        self, *, failures_to_open: int, reset_s: float, clock: Callable[[], float]
    ) -> None:
        if failures_to_open < 1 or reset_s <= 0:
            raise ValueError("failures_to_open must be at least 1 and reset_s positive")
        self.failures_to_open = failures_to_open
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None  # None while closed
        self._probing = False  # a half-open probe is in flight

    @property
    def state(self) -> CircuitState:
        """Closed, open, or half-open (the cool-down is over: a probe may pass)."""
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._probing or self._clock() >= self._opened_at + self.reset_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def retry_after_s(self) -> float:
        """How long until a request might pass: 0 when closed, else the cool-down left
        (a whole cool-down while a probe is out: its outcome is not known yet)."""
        if self._opened_at is None:
            return 0.0
        if self._probing:
            return self.reset_s
        return max(0.0, self._opened_at + self.reset_s - self._clock())

    def refusing(self) -> bool:
        """Whether a request would be refused now (nothing changes: see `allow`)."""
        state = self.state
        return state is CircuitState.OPEN or (state is CircuitState.HALF_OPEN and self._probing)

    def allow(self) -> bool:
        """Whether a request may pass now; in half-open the one that passes is the probe."""
        if self.refusing():
            return False
        if self.state is CircuitState.HALF_OPEN:
            self._probing = True
        return True

    @property
    def probing(self) -> bool:
        """Whether a half-open probe is in flight."""
        return self._probing

    def succeeded(self) -> None:
        """The backend answered: close the circuit."""
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> bool:
        """The backend failed a request; True when this opened the circuit (closed or
        half-open before), so the caller can fail what waits behind it."""
        self._failures += 1
        if self._opened_at is None and self._failures < self.failures_to_open:
            return False
        was_open = self.state is CircuitState.OPEN
        if not was_open:
            # A failed probe (or the Nth fault) starts a new cool-down; a straggler that
            # fails while open is part of the same outage and does not extend it.
            self._opened_at = self._clock()
        self._probing = False
        return not was_open

    def probe_abandoned(self) -> None:
        """The probe ended without telling anything about the backend: let another one pass."""
        self._probing = False
