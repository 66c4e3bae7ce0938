"""The fair, bounded queue, tested with no backend at all."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from engine.errors import QueueFull, TooManyPending
from engine.scheduler import Scheduler, Ticket, TicketState

KEYS = ["alice", "bob", "carol"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(**limits: int) -> tuple[Scheduler[str], Clock]:
    clock = Clock()
    options = {"max_pending": 100, "max_pending_per_key": 100, "capacity": 1, **limits}
    return Scheduler(clock=clock, **options), clock


def test_one_user_with_twenty_photos_does_not_hold_up_others() -> None:
    scheduler, _ = _scheduler()
    for n in range(20):
        scheduler.admit("flooder", f"photo {n}", timeout_s=60)
    for key in ("light-1", "light-2", "light-3"):
        scheduler.admit(key, f"{key} photo", timeout_s=60)

    served = []
    for _ in range(8):
        (ticket,) = scheduler.next_batch()
        served.append(ticket.key)
        scheduler.end(ticket)
        scheduler.release(ticket)

    assert served[:4] == ["flooder", "light-1", "light-2", "light-3"]
    assert served[4:] == ["flooder"] * 4


def test_a_user_just_served_twice_goes_behind_users_who_arrive_after_them() -> None:
    scheduler, _ = _scheduler(capacity=2)
    for n in range(3):
        scheduler.admit("flooder", f"photo {n}", timeout_s=60)
    first_two = scheduler.next_batch()  # the backend was idle: the flooder is served at once
    latecomers = [scheduler.admit(f"light-{n}", "photo", timeout_s=60) for n in range(3)]
    for ticket in first_two:
        scheduler.end(ticket)
        scheduler.release(ticket)

    order = [t.key for t in _drain(scheduler)]

    assert [t.key for t in first_two] == ["flooder", "flooder"]
    assert order == [t.key for t in latecomers] + ["flooder"]


def test_a_user_idle_for_a_while_banks_no_credit_over_busy_users() -> None:
    scheduler, _ = _scheduler(capacity=1)
    for n in range(4):
        scheduler.admit("busy", n, timeout_s=60)
    for ticket in _drain_n(scheduler, 3):  # three rounds pass while "returning" is away
        assert ticket.key == "busy"
    scheduler.admit("busy", 4, timeout_s=60)
    scheduler.admit("returning", "x", timeout_s=60)
    scheduler.admit("returning", "y", timeout_s=60)

    order = [t.key for t in _drain(scheduler)]

    # "busy" was served last, so "returning" goes next; then they take turns. "returning"
    # does not get three turns in a row to make up for the rounds it was away.
    assert order == ["returning", "busy", "returning", "busy"]


def _drain_n(scheduler: Scheduler[object], count: int) -> list[Ticket[object]]:
    taken = []
    for _ in range(count):
        (ticket,) = scheduler.next_batch()
        scheduler.end(ticket)
        scheduler.release(ticket)
        taken.append(ticket)
    return taken


def test_queue_positions_follow_the_round_robin_order() -> None:
    scheduler, _ = _scheduler()
    flood = [scheduler.admit("flooder", n, timeout_s=60) for n in range(5)]
    light = scheduler.admit("light", "x", timeout_s=60)

    positions = scheduler.positions()

    assert positions[flood[0].id] == 0
    assert positions[light.id] == 1
    assert positions[flood[1].id] == 2
    assert positions[flood[4].id] == 5
    # And dispatch agrees with what was announced.
    order = [t.id for t in _drain(scheduler)]
    assert order == sorted(positions, key=positions.__getitem__)


def _drain(scheduler: Scheduler[object]) -> list[Ticket[object]]:
    taken = []
    while scheduler.waiting:
        for ticket in scheduler.next_batch():
            scheduler.end(ticket)
            scheduler.release(ticket)
            taken.append(ticket)
    return taken


def test_admission_is_bounded_overall_and_per_user() -> None:
    scheduler, _ = _scheduler(max_pending=3, max_pending_per_key=2)
    scheduler.admit("alice", 1, timeout_s=60)
    scheduler.admit("alice", 2, timeout_s=60)

    with pytest.raises(TooManyPending):
        scheduler.admit("alice", 3, timeout_s=60)
    scheduler.admit("bob", 1, timeout_s=60)
    with pytest.raises(QueueFull):
        scheduler.admit("carol", 1, timeout_s=60)
    assert scheduler.waiting == 3


def test_a_running_request_still_counts_against_its_users_cap() -> None:
    scheduler, _ = _scheduler(max_pending_per_key=1)
    (running,) = [scheduler.admit("alice", 1, timeout_s=60)]
    scheduler.next_batch()

    with pytest.raises(TooManyPending):
        scheduler.admit("alice", 2, timeout_s=60)
    scheduler.end(running)
    scheduler.admit("alice", 2, timeout_s=60)


def test_dispatch_fills_the_backend_to_capacity_and_never_beyond() -> None:
    scheduler, _ = _scheduler(capacity=4)
    for n in range(10):
        scheduler.admit(f"user{n % 4}", n, timeout_s=60)

    first = scheduler.next_batch()
    assert len(first) == 4
    assert scheduler.next_batch() == []
    scheduler.end(first[0])
    assert scheduler.next_batch() == []  # ended, but the backend still holds its slot
    scheduler.release(first[0])
    assert len(scheduler.next_batch()) == 1
    assert scheduler.in_flight == 4


def test_a_request_whose_deadline_passed_in_the_queue_is_reported_expired() -> None:
    scheduler, clock = _scheduler()
    patient = scheduler.admit("alice", "patient", timeout_s=100)
    hurried = scheduler.admit("bob", "hurried", timeout_s=5)

    clock.now = 10
    assert scheduler.next_deadline() == 5
    assert scheduler.expired() == [hurried]
    assert scheduler.end(hurried)
    assert scheduler.next_batch() == [patient]


class SchedulerMachine(RuleBasedStateMachine):
    """Random admissions, dispatches, finishes, cancellations and timeouts."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.capacity = 3
        self.scheduler: Scheduler[int] = Scheduler(
            max_pending=8, max_pending_per_key=4, capacity=3, clock=self.clock
        )
        self.admitted: list[Ticket[int]] = []
        self.running: list[Ticket[int]] = []
        self.endings: dict[int, int] = {}
        # For each key: dispatches of other keys since it last got one while waiting.
        self.passed_over = dict.fromkeys(KEYS, 0)

    def _end(self, ticket: Ticket[int]) -> None:
        if self.scheduler.end(ticket):
            self.endings[ticket.id] = self.endings.get(ticket.id, 0) + 1

    @rule(key=st.sampled_from(KEYS), timeout=st.floats(1, 50))
    def admit(self, key: str, timeout: float) -> None:
        try:
            ticket = self.scheduler.admit(key, len(self.admitted), timeout_s=timeout)
        except (QueueFull, TooManyPending):
            return
        self.admitted.append(ticket)

    @rule(limit=st.integers(1, 5))
    def dispatch(self, limit: int) -> None:
        for ticket in self.scheduler.next_batch(limit):
            waiting_keys = {t.key for t in self.scheduler.waiting_tickets()} | {ticket.key}
            for key in waiting_keys - {ticket.key}:
                self.passed_over[key] += 1
            self.passed_over[ticket.key] = 0
            self.running.append(ticket)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), release_first=st.booleans())
    def finish(self, data: st.DataObject, release_first: bool) -> None:
        ticket = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        if release_first:
            self.scheduler.release(ticket)
            self._end(ticket)
        else:
            self._end(ticket)
            self.scheduler.release(ticket)

    @precondition(lambda self: self.admitted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._end(data.draw(st.sampled_from(self.admitted)))

    @rule(seconds=st.floats(0, 30))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        for ticket in self.scheduler.expired():
            self._end(ticket)

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        assert 0 <= self.scheduler.in_flight <= self.capacity
        assert self.scheduler.in_flight == sum(t.holds_slot for t in self.admitted)

    @invariant()
    def no_request_ends_twice(self) -> None:
        assert all(count == 1 for count in self.endings.values())

    @invariant()
    def no_key_starves(self) -> None:
        # Fair queuing: a waiting key is passed over at most twice by every other key before
        # its turn (once if the other key was behind by a turn, once more in tie order).
        assert max(self.passed_over.values()) <= 2 * (len(KEYS) - 1)

    @invariant()
    def counts_add_up(self) -> None:
        waiting = [t for t in self.admitted if t.state is TicketState.WAITING]
        assert self.scheduler.waiting == len(waiting) <= 8

    def teardown(self) -> None:
        # Drain: everything admitted ends exactly once.
        for ticket in self.running:
            self._end(ticket)
            self.scheduler.release(ticket)
        while self.scheduler.waiting:
            for ticket in self.scheduler.next_batch():
                self._end(ticket)
                self.scheduler.release(ticket)
        for ticket in self.admitted:
            self._end(ticket)
        assert sorted(self.endings) == sorted(t.id for t in self.admitted)
        assert set(self.endings.values()) <= {1}
        assert self.scheduler.in_flight == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_properties = SchedulerMachine.TestCase
