"""The connection bucket (pipeline/pacing.py), pure: a clock passed in, waits returned."""

from __future__ import annotations

import pytest

from pipeline.pacing import CONNECT_BURST, CONNECT_RATE, TokenBucket, connect_pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_burst_goes_at_once_and_then_one_attempt_every_5_s() -> None:
    clock = Clock()
    bucket = connect_pacer(clock)
    assert [bucket.take() for _ in range(CONNECT_BURST)] == [0.0] * CONNECT_BURST
    # attempts asked for together queue up, one refill apart
    assert [bucket.take() for _ in range(3)] == pytest.approx([5.0, 10.0, 15.0])


def test_an_idle_bucket_fills_up_again_but_never_beyond_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(3, 0.5, clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    clock.now += 2.0  # one token back
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(2.0)
    clock.now += 3600
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(2.0)


def test_no_five_minutes_hold_more_than_70_attempts_whatever_the_callers_do() -> None:
    clock = Clock()
    bucket = connect_pacer(clock)
    made: list[float] = []
    for step in range(3000):  # callers that try every 0.3 s and make the attempt when told
        clock.now = 1000.0 + step * 0.3
        if made and made[-1] > clock.now:
            continue  # still waiting for its turn
        made.append(clock.now + bucket.take())
    assert CONNECT_BURST + CONNECT_RATE * 300 == 70
    for i, start in enumerate(made):
        assert sum(1 for t in made[i:] if t < start + 300) <= 70


@pytest.mark.parametrize(("capacity", "rate"), [(0, 1.0), (1, 0.0), (5, -1.0)])
def test_a_bucket_that_could_never_hand_out_an_attempt_is_refused(capacity: float,
                                                                   rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, rate, Clock())
