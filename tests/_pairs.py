"""Connected channel pairs for the tests."""

from __future__ import annotations

import threading

import buzon


def url_pair(url: str, timeout: float = 10.0) -> tuple[buzon.Channel, buzon.Channel]:
    """``"pipe"``: ``buzon.pipe()``; else a listener at ``url`` (``tcp://127.0.0.1:0``:
    a free port) and a connection to it: (connecting end, accepted end)."""
    if url == "pipe":
        return buzon.pipe()
    lst = buzon.listen(url)
    box: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=timeout)))
    t.start()
    try:
        con = buzon.connect(str(lst.address), timeout=timeout)
    finally:
        t.join(timeout)
        lst.close()
    return con, box[0]


def stream_pair(
    kind: str, directory: object, timeout: float = 10.0
) -> tuple[buzon.Channel, buzon.Channel]:
    """A connected pair of kind ``pipe``, ``unix`` (a socket file in ``directory``) or
    ``tcp`` (loopback, a free port): (connecting end, accepted end)."""
    url = {"pipe": "pipe", "unix": f"unix:{directory}/s"}.get(kind, "tcp://127.0.0.1:0")
    return url_pair(url, timeout)
