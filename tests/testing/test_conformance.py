"""Every transport passes the channel contract in both drivers."""

from __future__ import annotations

import pytest

from buzon.testing.conformance import CHECKS, DRIVERS, PAIR_OPTIONS, TRANSPORTS, open_pair


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_conformance(transport: str, driver: str, check: str) -> None:
    with open_pair(transport, driver, **PAIR_OPTIONS.get(check, {})) as pair:
        CHECKS[check](pair)
