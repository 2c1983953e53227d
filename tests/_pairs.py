"""Connected channel pairs for the tests."""

from __future__ import annotations

import threading

import buzon


def stream_pair(
    kind: str, directory: object, timeout: float = 10.0
) -> tuple[buzon.Channel, buzon.Channel]:
    """A connected pair of kind ``pipe`` (``buzon.pipe()``), ``unix`` (a socket file in
    ``directory``) or ``tcp`` (loopback, a free port): (connecting end, accepted end)."""
    if kind == "pipe":
        return buzon.pipe()
    url = f"unix:{directory}/s" if kind == "unix" else "tcp://127.0.0.1:0"
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
