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
