"""``import buzon`` stays light: no tooling, no asyncio, no ssl until something uses them.

A module-set check, not a stopwatch: the import runs in a fresh interpreter (with
``-X importtime``, the way the cost is measured) and the test asserts which modules it
loaded. The figures themselves are in the issue's closing note, not in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import buzon

# Tooling and heavy standard-library packages that a program importing buzon to send a
# message does not need: each comes in with the first use of what needs it.
NOT_AT_IMPORT = (
    "asyncio",
    "ssl",
    "buzon.bench",
    "buzon.docgen",
    "buzon.demo",
    "buzon.cli",
    "buzon.aio",
    "buzon.rpc",
    "buzon.aio.rpc",
    "dataclasses",  # buzon's value classes are buzon._record's (it imports inspect, ast...)
    "inspect",
)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_buzon_loads_no_tooling_asyncio_or_ssl() -> None:
    loaded = _modules_after("import buzon")
    assert "buzon" in loaded
    assert sorted(loaded & set(NOT_AT_IMPORT)) == []


def test_the_lazy_names_load_on_first_use() -> None:
    loaded = _modules_after("import buzon\nbuzon.aio.connect\nbuzon.shared_array")
    assert {"buzon.aio", "asyncio", "buzon.shm"} <= loaded


@pytest.mark.parametrize(
    "name", ["aio", "rpc", "signals", "serve", "BoundedBuffer", "shared_array"]
)
def test_lazy_names_are_listed_and_stable(name: str) -> None:
    assert name in dir(buzon)
    assert getattr(buzon, name) is getattr(buzon, name)


def test_submodules_are_reachable_as_attributes() -> None:
    # as when `import buzon` imported them eagerly: a fresh interpreter, first access
    loaded = _modules_after("import buzon\nbuzon._core.F_LOCKED\nbuzon.shm.BoundedBuffer")
    assert {"buzon._core", "buzon.shm"} <= loaded


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        buzon.nope  # type: ignore[attr-defined]  # noqa: B018
