"""After a reliable-datagram connection moves (its peer now sends from another
address: a restarted relay, a NAT rebinding), ``channel.peer.address`` is the new
address. On f43dbb5 it kept showing the old one."""

from __future__ import annotations

import socket
import threading

import buzon
from buzon.testing.chaos import ChaosRelay

LIMIT = 10.0


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_peer_address_follows_a_moved_connection() -> None:
    lst = buzon.listen("udp://127.0.0.1:0", reliable=True)
    port = _free_udp_port()
    front = f"udp://127.0.0.1:{port}"
    try:
        box: list[buzon.Channel] = []
        with ChaosRelay(front, lst.address, profile="clean", seed=1) as relay:
            t = threading.Thread(target=lambda: box.append(lst.accept(timeout=LIMIT)))
            t.start()
            ch = buzon.connect(relay.address, timeout=LIMIT, reliable=True)
            t.join(LIMIT)
            srv = box[0]
            ch.send("before", timeout=LIMIT)
            assert srv.recv(timeout=LIMIT) == "before"
            first = srv.peer.address
        with ch, srv, ChaosRelay(front, lst.address, profile="clean", seed=2):
            ch.send("after", timeout=LIMIT)  # now from the new relay's socket
            assert srv.recv(timeout=LIMIT) == "after"
            srv.send("back", timeout=LIMIT)
            assert ch.recv(timeout=LIMIT) == "back"
            assert srv.peer.address != first, "the channel still names the old address"
    finally:
        lst.close()
