"""Every transport passes the establishment contract (4d, 4e, 4h) in both drivers."""

from __future__ import annotations

import pytest

from buzon.testing.conformance import DRIVERS, ESTABLISHMENT_CHECKS, ESTABLISHMENT_TRANSPORTS


@pytest.mark.parametrize("check", list(ESTABLISHMENT_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("transport", ESTABLISHMENT_TRANSPORTS)
def test_establishment(transport: str, driver: str, check: str) -> None:
    ESTABLISHMENT_CHECKS[check](transport, driver)
