"""The bounded, fair queue in front of the model. Plain Python: no backend, no event loop.

* Admission is bounded: at most ``max_pending`` requests wait in all (`QueueFull`) and a key
  (a user) has at most ``max_pending_per_key`` requests waiting or running (`TooManyPending`).
* Dispatch is fair across keys (start-time fair queuing with unit cost): each key has a
  virtual clock that advances by one per request served, the waiting key with the lowest
  clock goes next, and a key that starts waiting joins at the current virtual time. So keys
  take turns round-robin, a user who was just served several times goes behind users who
  arrive after them, and nobody banks credit by staying idle: one user's twenty photos cannot
  hold up twenty other users.
* Dispatch fills the backend up to ``capacity`` requests in flight and never beyond, since
  a continuous-batching engine is fastest with many requests at once.
* Every admitted ticket ends exactly once; `end` says whether this call was the one.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.errors import QueueFull, TooManyPending

P = TypeVar("P")


class TicketState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(eq=False)
class Ticket(Generic[P]):
    """One admitted request and where it is in its life."""

    id: int
    key: str
    payload: P
    deadline: float
    admitted_at: float
    state: TicketState = TicketState.WAITING
    started_at: float | None = None
    ended_at: float | None = None
    # Whether it still holds a slot of the backend's capacity (released by `release`).
    holds_slot: bool = field(default=False, repr=False)


class Scheduler(Generic[P]):
    """Admission, fair ordering and capacity accounting for requests of payload type ``P``."""

    def __init__(
        self,
        *,
        max_pending: int,
        max_pending_per_key: int,
        capacity: int,
        clock: Callable[[], float],
    ) -> None:
        if min(max_pending, max_pending_per_key, capacity) < 1:
            raise ValueError("queue limits and capacity must be at least 1")
        self.max_pending = max_pending
        self.max_pending_per_key = max_pending_per_key
        self.capacity = capacity
        self._clock = clock
        self._next_id = 1
        self._waiting: dict[str, deque[Ticket[P]]] = {}
        # Fair queuing: each key's virtual start for its next request, the virtual time of
        # the last dispatch, and the order keys started waiting in (to break ties).
        self._virtual: dict[str, int] = {}
        self._virtual_now = 0
        self._joined: dict[str, int] = {}
        self._joins = 0
        self._open_per_key: dict[str, int] = {}
        self._waiting_count = 0
        self._slots_used = 0
        self._changes = 0

    # -- counts ---------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet dispatched."""
        return self._waiting_count

    @property
    def in_flight(self) -> int:
        """Requests holding a backend slot."""
        return self._slots_used

    @property
    def changes(self) -> int:
        """A counter that moves whenever the waiting queue changes (so positions may have)."""
        return self._changes

    @property
    def free_slots(self) -> int:
        """How many more requests the backend could take now."""
        return self.capacity - self._slots_used

    def open_for(self, key: str) -> int:
        """Requests of ``key`` that are waiting or running."""
        return self._open_per_key.get(key, 0)

    # -- admission ------------------------------------------------------------------------

    def check_admission(self, key: str, *, also_pending: int = 0, also_waiting: int = 0) -> None:
        """Raise `QueueFull` or `TooManyPending` if a request for ``key`` would be refused.

        ``also_pending`` / ``also_waiting`` count requests on their way in (being decoded)
        for this key and overall, so a burst cannot slip past the limits before admission.
        """
        if self.open_for(key) + also_pending >= self.max_pending_per_key:
            raise TooManyPending(
                f"{self.max_pending_per_key} questions are already pending for this user"
            )
        if self._waiting_count + also_waiting >= self.max_pending:
            raise QueueFull(f"{self.max_pending} questions are already waiting")

    def admit(self, key: str, payload: P, *, timeout_s: float) -> Ticket[P]:
        """Queue a request, or raise `QueueFull` / `TooManyPending` without queueing it."""
        self.check_admission(key)
        now = self._clock()
        ticket = Ticket(
            id=self._next_id, key=key, payload=payload, deadline=now + timeout_s, admitted_at=now
        )
        self._next_id += 1
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = deque()
            self._virtual[key] = max(self._virtual.get(key, 0), self._virtual_now)
            self._joined[key] = self._joins
            self._joins += 1
        queue.append(ticket)
        self._waiting_count += 1
        self._changes += 1
        self._open_per_key[key] = self.open_for(key) + 1
        return ticket

    # -- dispatch -------------------------------------------------------------------------

    def next_batch(self, limit: int | None = None) -> list[Ticket[P]]:
        """Take up to ``limit`` (default: every free slot) waiting requests, fairly.

        The tickets become RUNNING and hold a slot each until `release`.
        """
        room = self.free_slots if limit is None else min(limit, self.free_slots)
        batch: list[Ticket[P]] = []
        while room > 0 and self._waiting:
            key = min(self._waiting, key=self._turn_of)
            queue = self._waiting[key]
            ticket = queue.popleft()
            self._virtual_now = self._virtual[key]
            self._virtual[key] += 1
            if not queue:
                self._stop_waiting(key)
            self._waiting_count -= 1
            self._changes += 1
            ticket.state = TicketState.RUNNING
            ticket.started_at = self._clock()
            ticket.holds_slot = True
            self._slots_used += 1
            batch.append(ticket)
            room -= 1
        return batch

    def _turn_of(self, key: str) -> tuple[int, int]:
        return self._virtual[key], self._joined[key]

    def _stop_waiting(self, key: str) -> None:
        del self._waiting[key]
        del self._joined[key]
        # A key's clock only matters while it is ahead of the virtual time (it was served
        # recently); older entries would be raised to the virtual time on return anyway.
        if self._virtual[key] <= self._virtual_now:
            del self._virtual[key]
        if len(self._virtual) > 2 * self.max_pending + self.capacity:
            self._virtual = {
                k: v
                for k, v in self._virtual.items()
                if v > self._virtual_now or k in self._waiting
            }

    def release(self, ticket: Ticket[P]) -> None:
        """The backend is done with ``ticket``: give its slot back (idempotent)."""
        if ticket.holds_slot:
            ticket.holds_slot = False
            self._slots_used -= 1

    # -- ending ---------------------------------------------------------------------------

    def end(self, ticket: Ticket[P]) -> bool:
        """Mark ``ticket`` ended; True only the first time, so each ends exactly once.

        A waiting ticket leaves the queue. A running one keeps its slot until `release`,
        because the backend may still be working on it.
        """
        if ticket.state is TicketState.ENDED:
            return False
        if ticket.state is TicketState.WAITING:
            self._remove_waiting(ticket)
        ticket.state = TicketState.ENDED
        ticket.ended_at = self._clock()
        remaining = self.open_for(ticket.key) - 1
        if remaining:
            self._open_per_key[ticket.key] = remaining
        else:
            self._open_per_key.pop(ticket.key, None)
        return True

    def _remove_waiting(self, ticket: Ticket[P]) -> None:
        queue = self._waiting[ticket.key]
        queue.remove(ticket)
        self._waiting_count -= 1
        self._changes += 1
        if not queue:
            self._stop_waiting(ticket.key)

    def expired(self, now: float | None = None) -> list[Ticket[P]]:
        """Waiting tickets whose deadline has passed (the caller ends them as timed out)."""
        moment = self._clock() if now is None else now
        return [t for t in self.waiting_tickets() if t.deadline <= moment]

    def next_deadline(self) -> float | None:
        """The earliest deadline among waiting tickets, for the dispatcher's timer."""
        return min((t.deadline for t in self.waiting_tickets()), default=None)

    # -- positions ------------------------------------------------------------------------

    def waiting_tickets(self) -> Iterator[Ticket[P]]:
        """Every waiting ticket (in no particular order)."""
        for queue in self._waiting.values():
            yield from queue

    def positions(self) -> dict[int, int]:
        """For each waiting ticket id, how many waiting requests will be dispatched first.

        This replays the dispatch order: a key's i-th waiting request goes at its virtual
        start plus i, ties broken by when the key started waiting.
        """
        order = sorted(
            (self._virtual[key] + index, self._joined[key], ticket.id)
            for key, queue in self._waiting.items()
            for index, ticket in enumerate(queue)
        )
        return {ticket_id: position for position, (_, _, ticket_id) in enumerate(order)}
