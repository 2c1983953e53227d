"""A shared value or array used after ``close`` raises buzon's ChannelClosed.

(It raised ``AssertionError``, and a ``TypeError`` under ``python -O``.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import buzon
from buzon.errors import ChannelClosed


def test_shared_value_after_close() -> None:
    val = buzon.shared_value("closed", int)
    try:
        val.value = 3
        val.close()
        with pytest.raises(ChannelClosed, match="'closed' is closed"):
            _ = val.value
        with pytest.raises(ChannelClosed, match="'closed' is closed"):
            val.value = 4
    finally:
        val.remove()
        val.close()


def test_shared_array_after_close() -> None:
    arr = buzon.shared_array("closed", 2, "i4")
    try:
        arr.array[0] = 1
        arr.close()
        with pytest.raises(ChannelClosed, match="'closed' is closed"):
            _ = arr.array
        assert "closed" in repr(arr)
    finally:
        arr.remove()
        arr.close()


def test_shared_value_after_close_under_optimize() -> None:
    code = (
        "import buzon\n"
        "v = buzon.shared_value('closed-O', int)\n"
        "v.remove(); v.close()\n"
        "try:\n"
        "    v.value\n"
        "except buzon.ChannelClosed:\n"
        "    print('ChannelClosed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.stdout == "ChannelClosed\n", done.stderr
