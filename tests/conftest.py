"""Shared fixtures.

* Every test gets a fresh, private runtime directory (``BUZON_RUNTIME_DIR``), so named
  endpoints of one test never meet another's, and nothing is left in ``/tmp``.
* ``fd_leak_check`` (request it by name, or mark a test or module with
  ``@pytest.mark.fd_check``) fails the test if it leaves file descriptors open.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from buzon import _runtime


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fd_check: fail the test if it leaves file descriptors open")


def _reset_runtime_cache() -> None:
    _runtime._cached = None


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh 0700 directory as ``BUZON_RUNTIME_DIR`` (short: socket paths must fit)."""
    path = tempfile.mkdtemp(prefix="bz-")
    monkeypatch.setenv("BUZON_RUNTIME_DIR", path)
    _reset_runtime_cache()
    try:
        yield path
    finally:
        _reset_runtime_cache()
        shutil.rmtree(path, ignore_errors=True)


def _open_fds() -> dict[str, str]:
    fds: dict[str, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used, already closed
            continue
    return fds


@pytest.fixture
def fd_leak_check() -> Iterator[None]:
    """Fail if the test ends with file descriptors open that it did not start with."""
    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover - Linux only project
        yield
        return
    before = _open_fds()
    yield
    after = _open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"file descriptors left open: {leaked}"


@pytest.fixture(autouse=True)
def _fd_check_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("fd_check") is not None:
        request.getfixturevalue("fd_leak_check")
