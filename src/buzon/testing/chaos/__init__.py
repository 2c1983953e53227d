"""A chaos relay: forward datagrams or streams between two addresses, with faults.

::

    from buzon.testing.chaos import ChaosRelay

    with ChaosRelay("udp://127.0.0.1:0", back="udp://127.0.0.1:9000",
                    profile="wifi", seed=7) as relay:
        ch = buzon.connect(relay.address)     # talk to the relay as if it were the server
        ...
        print(relay.statistics()["dropped"])

Theory of operation
-------------------
The relay listens on a *front* address and forwards to a *back* address. It works on
raw sockets and knows nothing of buzon's frames, so it relays any protocol. Traffic
from front to back is the ``forward`` direction, replies are the ``reply`` direction.

* **Datagrams** (``udp://``, ``unixgram:``): the front socket is bound; every distinct
  client address gets its own *flow*: one upstream socket connected to the back
  address (a ``unixgram:`` upstream binds a private ``c-PID-RANDOM.dgram`` file, as
  buzon's own connecting ends do), so the back end's replies come back to that socket
  and are sent on to the right client. At most ``max_flows`` flows are kept; the
  least recently used is closed to make room.
* **Streams** (``tcp://``, ``unix:``): every accepted connection gets one upstream
  connection; bytes flow both ways, end-of-stream (half-close) is passed on, and a
  connection ends when both directions have ended or one side fails (a side that
  fails resets the other).

Everything runs in ONE background thread owned by the relay (started by
:meth:`ChaosRelay.start` or ``with``, stopped and joined by :meth:`ChaosRelay.close`):
a ``selectors`` loop plus a heap of timers for delays, reordering and slice gaps.
``close`` closes every socket and removes every socket file the relay created.

Faults
------
A :class:`Faults` value describes one direction; its ``reply`` field, when set,
describes the reply direction (else the reply direction gets the same faults).
For each datagram, in this order:

1. *cut* drops everything; a *blackhole* window drops everything inside it;
2. *loss*: independent (``drop``), bursty (``burst``: a Gilbert-Elliott chain whose
   state moves before each datagram; ``drop_run``: with probability p, this datagram
   and the next k-1 are lost);
3. *truncate* keeps a random prefix (0 to size-1 bytes);
4. *corrupt* flips ``corrupt_bits`` distinct random bits;
5. *duplicate* sends a second copy (with its own delay);
6. *reorder* holds the datagram until 1..``reorder_span`` later datagrams of the same
   flow have gone out, or ``reorder_hold`` seconds, whichever comes first;
7. *delay* is ``delay`` ± ``jitter`` (uniform, or normal with sigma jitter/2 cut at
   ±jitter), never below 0; different delays reorder datagrams, as networks do.

On streams the kernel already repairs loss, duplication and reordering, so those
(and truncation) do not apply. A stream direction is cut into the chunks one read
returns; per chunk: *cut* discards the bytes (end-of-stream still passes, so
connections can finish); *reset* with probability ``reset`` resets the connection,
and ``reset_after`` resets it once exactly N bytes went forward in that direction;
*corrupt* flips bits; a *blackhole* window stalls the bytes until it ends (TCP would
retransmit them then), for ever if it never ends; *delay* ± *jitter* delays the chunk
but never reorders bytes. On the way out, ``slice=k`` writes the bytes in pieces of
1..k bytes, with a pause of 0..``slice_gap`` seconds after each piece. A *reset* closes
both the client's and the upstream connection with ``SO_LINGER`` 0, so both peers see
``ECONNRESET``.

Determinism and logs
--------------------
``seed`` (random when not given; :attr:`ChaosRelay.seed` tells which) drives one
``random.Random`` per datagram direction and per direction of each stream connection
(numbered in accept order). Each datagram or stream chunk takes the same draws from
its direction's generator whatever becomes of it; the few decisions that need a
varying number of draws (which bits, how short, how long held) use a generator
seeded from one of them. So the dice for the n-th datagram never depend on what
happened to earlier ones, and given the same seed and the same inputs in the same
order a run makes the same decisions (time enters only through blackhole windows
and reorder hold timeouts; burst and run state carry over, by design). Slice sizes
come from a second generator seeded from the first, so the cut points depend only
on byte offsets.

Every decision is an :class:`Event` ``(t, direction, action, size, detail, flow)``,
kept in memory (:meth:`ChaosRelay.events`, the last ``max_events``) and, with
``log=PATH``, written as JSON lines (a first line describes the run: addresses,
seed, faults). :meth:`ChaosRelay.statistics` counts them per action.

======================  =========================================================
action                  meaning (``detail`` says more)
======================  =========================================================
``receive``             a datagram or chunk was read from one side
``forward``             a datagram or piece was handed to the kernel
``drop``                a datagram was lost: ``random``, ``burst``, ``run``,
                        ``blackhole``, ``cut``, ``unroutable``, or an OS error
``duplicate``           a second copy will be sent
``reorder``             held back; ``release`` when it goes on
``corrupt``             bits flipped (positions in ``detail``)
``truncate``            cut short (new length in ``detail``)
``delay``               sent later (milliseconds in ``detail``)
``stall``               stream bytes held by a blackhole window
``reset``               a connection reset on purpose (``SO_LINGER`` 0)
``overflow``            a datagram dropped because a queue of the relay was full
``open`` / ``close``    a flow or connection began or ended
``abort``               a connection ended because one side failed
``error``               anything else that went wrong (the relay keeps going)
======================  =========================================================
"""

from .faults import (
    COUNTERS,
    PROFILES,
    Blackhole,
    Direction,
    DropRun,
    Event,
    Faults,
    GilbertElliott,
    render_profiles,
)
from .relay import ChaosRelay

__all__ = [
    "COUNTERS",
    "PROFILES",
    "Blackhole",
    "ChaosRelay",
    "Direction",
    "DropRun",
    "Event",
    "Faults",
    "GilbertElliott",
    "render_profiles",
]
