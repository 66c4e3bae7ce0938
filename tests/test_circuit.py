"""The circuit breaker's states with a fake clock: no backend, no event loop."""

from __future__ import annotations

import pytest

from engine.circuit import CircuitBreaker, CircuitState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def circuit(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failures_to_open=3, reset_s=30.0, clock=clock)


def test_requests_pass_until_the_backend_fails_n_times_in_a_row(circuit: CircuitBreaker) -> None:
    assert circuit.failed() is False
    assert circuit.failed() is False
    assert circuit.allow()
    assert circuit.state is CircuitState.CLOSED

    assert circuit.failed() is True

    assert circuit.state is CircuitState.OPEN
    assert not circuit.allow()
    assert circuit.retry_after_s() == 30.0


def test_a_success_between_failures_starts_the_count_again(circuit: CircuitBreaker) -> None:
    circuit.failed()
    circuit.failed()
    circuit.succeeded()
    circuit.failed()
    circuit.failed()

    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow()


def test_after_the_cool_down_one_probe_passes_and_the_rest_wait(
    circuit: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        circuit.failed()
    clock.now += 10
    assert circuit.retry_after_s() == 20.0
    assert not circuit.allow()

    clock.now += 20
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow()  # the probe
    assert not circuit.allow()
    assert circuit.probing


def test_a_successful_probe_closes_the_circuit(circuit: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        circuit.failed()
    clock.now += 30
    assert circuit.allow()

    circuit.succeeded()

    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow()
    assert circuit.allow()
    assert circuit.retry_after_s() == 0.0


def test_a_failed_probe_opens_the_circuit_for_another_cool_down(
    circuit: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        circuit.failed()
    clock.now += 30
    assert circuit.allow()

    assert circuit.failed() is True

    assert circuit.state is CircuitState.OPEN
    assert circuit.retry_after_s() == 30.0
    clock.now += 29
    assert not circuit.allow()
    clock.now += 1
    assert circuit.allow()


def test_failures_of_requests_already_in_flight_do_not_extend_the_cool_down(
    circuit: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        circuit.failed()
    clock.now += 20

    assert circuit.failed() is False

    clock.now += 10
    assert circuit.allow()


def test_a_probe_that_says_nothing_about_the_backend_hands_its_turn_on(
    circuit: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        circuit.failed()
    clock.now += 30
    assert circuit.allow()

    circuit.probe_abandoned()

    assert circuit.allow()
    assert not circuit.allow()
