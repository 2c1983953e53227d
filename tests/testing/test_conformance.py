"""Every transport passes the channel contract in both drivers."""

from __future__ import annotations

import pytest

from buzon.testing.conformance import (
    CAPACITY_CHECKS,
    CAPACITY_TRANSPORTS,
    CHECKS,
    DRIVERS,
    PAIR_OPTIONS,
    TRANSPORTS,
    open_pair,
)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_conformance(transport: str, driver: str, check: str) -> None:
    with open_pair(transport, driver, **PAIR_OPTIONS.get(check, {})) as pair:
        CHECKS[check](pair)


@pytest.mark.parametrize("check", list(CAPACITY_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", CAPACITY_TRANSPORTS)
def test_capacity(transport: str, driver: str, check: str) -> None:
    run, options = CAPACITY_CHECKS[check]
    with open_pair(transport, driver, **options) as pair:
        run(pair)
