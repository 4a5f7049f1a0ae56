"""REST answers as Binance gives them: 429 and 418 with `Retry-After`, 5xx, and 200s whose body
was lost. The budget's rules on plain values; the client against the simulator's faults over
real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from pipeline.errors import ExchangeError
from pipeline.rest import BackoffNotice, BadAnswer, RateLimited, RestClient
from pipeline.simulator import SimConfig, Simulator
from pipeline.weight import MAX_BAN_S, WeightBudget, backoff_for

NOW = 1_800_000_000.0  # a whole minute


# --- the budget's rules ---------------------------------------------------------------------

def test_a_429s_wait_cannot_outlast_the_weight_window_whatever_retry_after_says() -> None:
    assert backoff_for(429, "100000") == 60.0  # the 27 hours
    assert backoff_for(429, "7") == 7.0
    assert backoff_for(429, None) == 60.0
    assert backoff_for(429, "soon") == 60.0


def test_a_418_ban_lasts_what_the_exchange_says_within_binances_three_days() -> None:
    assert backoff_for(418, "7200") == 7200.0
    assert backoff_for(418, "999999999") == MAX_BAN_S == 3 * 86400
    assert backoff_for(418, None) == 120.0  # the shortest documented ban


def test_after_a_429_heavy_calls_wait_and_the_keep_alive_does_not() -> None:
    budget = WeightBudget()
    assert budget.observe("1200", 429, NOW, "100000") == 60.0
    assert budget.delay_before(40, NOW + 1) == pytest.approx(59.0)
    assert budget.take(1, NOW + 1, essential=True) == 0  # the keep-alive goes
    assert budget.paused_until(NOW + 1) == NOW + 60
    assert budget.delay_before(40, NOW + 60) == 0
    assert budget.paused_until(NOW + 60) is None


def test_with_the_minute_spent_the_keep_alive_waits_only_for_the_next_minute() -> None:
    budget = WeightBudget()
    budget.observe("2400", 429, NOW + 30, "100000")  # the exchange would refuse it too
    assert budget.delay_before(1, NOW + 31, essential=True) == pytest.approx(29.05)


def test_a_418_ban_holds_back_every_call_the_keep_alive_too() -> None:
    budget = WeightBudget()
    budget.observe(None, 418, NOW, "300")
    assert budget.delay_before(1, NOW + 10, essential=True) == pytest.approx(290.0)
    assert budget.delay_before(40, NOW + 10) == pytest.approx(290.0)
    assert budget.delay_before(1, NOW + 300, essential=True) == 0


def test_the_ceiling_holds_back_heavy_calls_only_and_follows_the_limit_setting() -> None:
    budget = WeightBudget.for_limit(1000)
    assert budget.ceiling == 800
    budget.observe("799", 200, NOW)
    assert budget.delay_before(40, NOW) > 0  # 80 % of the limit: wait for the next minute
    assert budget.delay_before(1, NOW, essential=True) == 0  # up to the limit itself


# --- the client against the simulator ---------------------------------------------------------

@asynccontextmanager
async def exchange() -> AsyncIterator[tuple[Simulator, RestClient, list[BackoffNotice]]]:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
    notices: list[BackoffNotice] = []
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(sim.run)
        rest = RestClient(rest_url, on_backoff=notices.append)
        try:
            yield sim, rest, notices
        finally:
            await rest.aclose()
            nursery.cancel_scope.cancel()


def fault(sim: Simulator, **body: object) -> None:
    sim.accounts.control("rest_fault", dict(body))


async def test_a_429_with_a_huge_retry_after_pauses_heavy_calls_for_one_minute_at_most(
        ) -> None:
    async with exchange() as (sim, rest, notices):
        fault(sim, kind="429", path="/fapi/v1/time", retry_after=100000, count=1)
        with pytest.raises(RateLimited) as caught:
            await rest.get("/fapi/v1/time")
        assert "HTTP 429 -1003" in str(caught.value) and "paused until" in str(caught.value)
        (notice,) = notices
        assert (notice.status, notice.path, notice.retry_after) == (429, "/fapi/v1/time",
                                                                    "100000")
        assert notice.wait_s == 60.0
        paused = rest.budget.paused_until(rest.clock())
        assert paused is not None and paused - rest.clock() <= 60.0
        # the keep-alive's kind of call is not held back
        with trio.fail_after(5):
            assert "serverTime" in await rest.request("GET", "/fapi/v1/time", essential=True)


async def test_a_5xx_is_an_exchange_error_with_its_status() -> None:
    async with exchange() as (sim, rest, _):
        fault(sim, kind="5xx", status=503, path="/fapi/v1/time", count=1)
        with pytest.raises(ExchangeError) as caught:
            await rest.get("/fapi/v1/time")
        assert caught.value.status == 503 and caught.value.code == -1001
        assert "serverTime" in await rest.get("/fapi/v1/time")


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "not JSON"), ("empty", "empty body"), ("empty_object", "a JSON dict where a "
                                                                         "list was expected"),
])
async def test_a_200_whose_body_is_not_the_expected_json_is_a_one_line_bad_answer(
        kind: str, words: str) -> None:
    async with exchange() as (sim, rest, _):
        fault(sim, kind=kind, path="/fapi/v1/exchangeInfo", count=1)
        with pytest.raises(BadAnswer) as caught:
            await rest.get("/fapi/v1/exchangeInfo", expect=list)
        message = str(caught.value)
        assert words in message and "\n" not in message
        assert message.startswith("GET /fapi/v1/exchangeInfo: HTTP 200")
