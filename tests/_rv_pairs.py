"""Rendezvous (capacity=0) channel pairs on the framed streams, for the rendezvous tests."""

from __future__ import annotations

import threading
from typing import Any

import buzon


def rv_pair(kind: str) -> tuple[Any, Any]:
    """Two connected capacity=0 ends: ``"pipe"``, a ``unix:`` name or a ``tcp://`` URL."""
    if kind == "pipe":
        return buzon.pipe(capacity=0)
    lst = buzon.listen(kind, capacity=0)
    try:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        url = lst.address if kind.startswith("tcp") else kind
        a = buzon.connect(url, timeout=10, capacity=0)
        t.join(10)
        return a, box[0]
    finally:
        lst.close()


def engine_only(end: Any) -> None:
    """Take ``end`` off the C rendezvous calls (protocol/_rv.c): its sends and receives
    go the engine's way (the reference), as an end without the C parts would."""
    end._rv_stream = None
    end.__dict__.pop("send_bytes", None)  # RvCall: the methods shadow the class's
    end.__dict__.pop("recv_bytes", None)
