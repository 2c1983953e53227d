"""Contract 4b end to end: a peer cannot make a receiver commit memory it did not send.

On 135cb2d, a header announcing one buffer just under the frame cap made the decoder
zero-fill that much at once: ten such connections took a server from 36 MB to 694 MB.
"""

from __future__ import annotations

import os
import threading

import buzon
from buzon.protocol.frames import HEADER, Kind


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_headers_announcing_60_mib_commit_nothing_on_a_listener() -> None:
    head = HEADER.pack(1, Kind.DATA, 0, 1, 0) + (60 * 2**20).to_bytes(8, "little")
    with buzon.listen("unix:membound") as lst:
        clients: list[buzon.Channel] = []
        servers: list[buzon.Channel] = []
        try:
            for _ in range(10):
                t = threading.Thread(target=lambda: servers.append(lst.accept(timeout=10)))
                t.start()
                clients.append(buzon.connect("unix:membound", timeout=10))
                t.join(10)
            before = _rss()
            for c in clients:  # after the handshake: a header, 100 bytes, then silence
                os.write(c.fileno(), head + b"x" * 100)
            for s in servers:
                assert s.statistics().messages_received == 0
                try:
                    s.recv_nowait()
                except buzon.Empty:
                    pass
            grown = _rss() - before
            assert grown < 40 * 2**20, f"ten announced 60 MiB frames took {grown >> 20} MiB"
        finally:
            for ch in clients + servers:
                ch.close()
