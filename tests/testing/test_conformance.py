"""Every transport passes every conformance check, natively in both drivers (a check
that does not apply to a transport is skipped with its reason)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from buzon.testing.conformance import (
    CAPACITY_CHECKS,
    CAPACITY_TRANSPORTS,
    CHECKS,
    CONTRACT_CHECKS,
    DRIVERS,
    ESTABLISHMENT_CHECKS,
    PAIR_OPTIONS,
    TRANSPORTS,
    NotApplicable,
    Pair,
    run_check,
)

pytestmark = pytest.mark.fd_check  # a check leaves no fd behind, in either driver


def _run(fn: Callable[[], None]) -> None:
    try:
        fn()
    except NotApplicable as exc:
        pytest.skip(f"not applicable: {exc}")


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_conformance(transport: str, driver: str, check: str) -> None:
    _run(lambda: run_check(CHECKS[check], transport, driver, **PAIR_OPTIONS.get(check, {})))


@pytest.mark.parametrize("check", list(CAPACITY_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", CAPACITY_TRANSPORTS)
def test_capacity(transport: str, driver: str, check: str) -> None:
    run, options = CAPACITY_CHECKS[check]
    _run(lambda: run_check(run, transport, driver, **options))


@pytest.mark.parametrize("check", list(ESTABLISHMENT_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_establishment(transport: str, driver: str, check: str) -> None:
    _run(lambda: ESTABLISHMENT_CHECKS[check](transport, driver))


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_contract(transport: str, driver: str, check: str) -> None:
    _run(lambda: CONTRACT_CHECKS[check](transport, driver))


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_harness_runs_each_driver_natively(driver: str) -> None:
    """asyncio: the ends are buzon.aio channels and two gathered operations are two
    tasks on the loop's thread; sync: buzon channels whose blocking calls run in
    threads other than the loop's, at the same time (a recv blocked in one while the
    send runs in another)."""
    import asyncio
    import threading

    import buzon
    from buzon.testing.conformance._harness import gather

    async def check(p: Pair) -> None:
        expected = buzon.Channel if driver == "sync" else buzon.aio.Channel
        assert type(p.a.ch) is expected and type(p.b.ch) is expected
        loop_thread = threading.get_ident()
        seen: list[int] = []
        recv = p.b.ch.recv

        def spy(*args: object) -> object:
            seen.append(threading.get_ident())
            return recv(*args)

        p.b.ch.recv = spy  # type: ignore[method-assign]
        if driver == "sync":  # blocked first, in a thread; the send comes later

            async def later() -> None:
                await asyncio.sleep(0.05)
                await p.a.send("x", 5.0)

            got = (await gather(p.b.recv(5.0), later()))[0]
            assert got == "x" and seen and loop_thread not in seen, seen
        else:
            got = (await gather(p.b.recv(5.0), p.a.send("x", 5.0)))[0]
            assert got == "x" and seen == [loop_thread]  # a coroutine, awaited on the loop
        del p.b.ch.recv

    run_check(check, "unix", driver)
