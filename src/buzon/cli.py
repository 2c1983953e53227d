"""The ``buzon`` command line: send, receive and serve messages, look after the runtime dir.

Theory of operation
-------------------
Every subcommand is a few calls of the public API (``buzon.connect``, ``buzon.listen``,
``buzon.wait``), so what the CLI does a Python program can do, and the CLI talks to
buzon programs as well as to programs that know nothing about buzon (``--raw``).

* ``send URL [MSG|-]`` connects to ``URL`` and sends. A MSG that parses as JSON is sent
  as that value (``42`` is a number, ``'"42"'`` a string), anything else as a string.
  ``-`` (the default) reads stdin: one message per line (JSON-or-string, the newline
  removed; a line that is not UTF-8 is sent as bytes). ``--bytes`` sends each message
  as bytes (``send_bytes``). ``--raw`` sends the bytes exactly as they are, no framing:
  on stream transports (fifo, unix, tcp) stdin is copied as it arrives; on transports
  that keep message boundaries (mq, unixgram, seqpacket, udp, shm: the registry's
  ``message_boundaries``) the whole of stdin (or MSG) is one message.
* ``recv URL`` creates/binds the endpoint, takes one peer (connection-oriented
  schemes: the first to connect) and prints what arrives until the peer closes,
  ``-n N`` messages were printed, or ``--timeout S`` seconds pass without a message.
  With ``-n N`` on a connection-oriented scheme (unix, seqpacket, tcp, shm), where
  every ``buzon send`` is its own connection, a peer that closes is followed by the
  next one until N messages arrived (one peer at a time; ``listen`` serves them all
  at once). Datagram sockets and queues take every sender's messages on the one
  endpoint. On a FIFO the peer is every writer: with ``--raw`` (a byte stream, as
  from a shell) ``recv`` ends like ``cat`` once bytes came and the last writer
  closed; framed, the FIFO is a place writers come and go, and ``recv`` does not end
  when one leaves (``-n``, ``--timeout`` or Ctrl-C end it). Bytes that are no buzon
  message (a shell writing into a framed FIFO) are skipped and counted; ``recv``
  then says so, with the hint to use ``--raw``.
* ``listen URL`` is ``recv`` for every client at once (one ``buzon.wait`` over the
  listener and all channels, no threads), until Ctrl-C or SIGTERM; each line is
  prefixed with ``[peer]`` (``pid N`` on Unix sockets, ``host:port`` on TCP, the
  transport's name where the sender is unknown) unless ``--quiet``. A new client's
  handshake runs in line, bounded by 5 s: a client that connects and stays silent
  delays the others that long, never more.
* ``call URL METHOD ARGS...`` calls an RPC method (:mod:`buzon.rpc`, ``--wire`` buzon,
  msgpack-rpc or jsonrpc) with each ARG read as ``send`` reads MSG, and prints the
  result as one JSON line; an error reply is printed as ``remote error CODE: MESSAGE``
  on stderr (exit 1), a passed deadline exits 3. ``--notify`` sends a one-way call.
* ``ls`` and ``clean`` look at the private runtime dir (see below).
* ``chaos FRONT BACK`` relays datagrams or streams between two addresses with faults
  (drop, duplicate, reorder, corrupt, delay, blackhole, slice, reset), seeded and
  logged: :mod:`buzon.testing.chaos` and ``docs/chaos.md``.
* ``bench`` and ``demo`` run the benchmark suite and the tour of every transport.

Output of ``recv``/``listen``: one JSON document per line. Values JSON lacks are
written as one-key objects: bytes as ``{"$bytes": "<base64>"}``, a numpy array as
``{"$ndarray": {"dtype": "<f8", "shape": [2, 3], "nbytes": 48}}`` (a summary, not the
data), any other value as ``{"$repr": "..."}``; datetimes and UUIDs as strings,
non-string dict keys as their JSON text. Floats NaN/Infinity are written as Python's
``json`` does. With ``--raw`` the bytes received are written to stdout exactly as they
are: on stream transports ``-n`` counts *chunks* (what one read returned, which
depends on timing), on message transports messages. ``listen --raw`` without
``--quiet`` writes each line as ``[peer] line`` (a last line without newline gets one).

``ls`` lists the runtime dir: address, type, mode, state and path of every entry, and
this user's POSIX queues and shared-memory segments; ``clean`` removes only what is
provably dead and older than two seconds: socket files nobody is bound to, FIFOs
nobody reads, client datagram sockets ``c-PID-*.dgram`` whose process is gone, and
lock files of private queues that no longer exist. Queues are never removed (one may
hold messages for a reader to come; the next listener on a private name whose owner
died takes it over, messages included). Both are :mod:`buzon._forensics`, which
recognises each entry by the runtime files the scheme registry declares.

Exit status
-----------
===  ===========================================================================
0    success; ``recv``: N messages printed or the peer closed; ``listen``: stopped
     by Ctrl-C/SIGTERM
1    an error (printed as one line ``buzon: error: ...``), or ``demo`` failed
2    bad usage (unknown option, bad number)
3    timeout: ``recv`` got no message for ``--timeout`` seconds, ``send`` could not
     connect or send in time
130  interrupted by Ctrl-C (``send``, ``recv``)
141  stdout was closed by the reader (``buzon recv ... | head``)
143  ``recv`` stopped by SIGTERM (after removing its endpoint)
===  ===========================================================================
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import errno
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, Any, NoReturn

import buzon

from ._runtime import runtime_dir
from ._schemes import describe, scheme_info
from .address import Address, parse_address
from .errors import (
    AddressError,
    BuzonError,
    CodecError,
    ConnectionRefused,
    Empty,
    EndOfChannel,
    EndpointInUse,
    FrameError,
    HandshakeError,
    InsecureBind,
    MessageTooLarge,
    NoSuchEndpoint,
    Timeout,
    UnsafePath,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "main", "to_jsonable"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

DEFAULT_SEND_TIMEOUT = 10.0
_CHUNK = 65536
_DRAIN_BATCH = 64  # messages taken from one channel before serving the others
_ADDRESS_HINT = (
    f"addresses look like {describe(lambda i: True, form=True)} (NAME may be an absolute path)"
)


def _bind_address(url: str) -> tuple[Address, dict[str, Any]]:
    """What ``recv``/``listen`` bind: ``name:NAME`` binds ``unix:NAME`` and registers
    NAME for as long as it listens (:mod:`buzon.names`)."""
    address = parse_address(url)
    if address.scheme != "name":
        return address, {}
    from .names import listen_address

    address, name = listen_address(address, None)
    return address, {"name": name}


def _accepts_many(address: Address) -> bool:
    """Each peer of the endpoint is a channel of its own (else the endpoint is one)."""
    return scheme_info(address.scheme).connection_oriented


def _whole_messages(address: Address) -> bool:
    """The transport keeps message boundaries: raw bytes go as whole messages."""
    return scheme_info(address.scheme).message_boundaries


class _Terminated(Exception):
    """Raised from the SIGTERM handler so that ``finally`` blocks clean up."""


# -- JSON output ----------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Turn a received object into something ``json.dumps`` writes (see module doc)."""
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, datetime.datetime | datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    shape = getattr(obj, "shape", None)
    dtype = getattr(obj, "dtype", None)
    if shape is not None and dtype is not None and hasattr(obj, "tolist"):
        if shape == ():  # a numpy scalar
            return to_jsonable(obj.tolist())
        return {
            "$ndarray": {
                "dtype": str(getattr(dtype, "str", dtype)),
                "shape": [int(n) for n in shape],
                "nbytes": int(getattr(obj, "nbytes", 0)),
            }
        }
    return {"$repr": repr(obj)}


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    return json.dumps(to_jsonable(key), ensure_ascii=False)


def _json_line(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), ensure_ascii=False)


def _parse_message(text: str) -> Any:
    """JSON if ``text`` is JSON, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- argument parsing -----------------------------------------------------------------


def _timeout_arg(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError("a timeout is a number of seconds >= 0 (or inf)")
    return None if math.isinf(value) else value


def _priority_arg(text: str) -> int:
    from .transport.mq import PRIO_MAX

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < PRIO_MAX:
        raise argparse.ArgumentTypeError(f"a priority is from 0 to {PRIO_MAX - 1}")
    return value


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("-n needs a number >= 1")
    return value


_MAIN_EPILOG = """\
examples:
  buzon recv unix:calc                 # terminal 1: wait for one peer, print its messages
  buzon send unix:calc '{"op": "add", "args": [1, 2]}'   # terminal 2
  seq 3 | buzon send fifo:jobs -       # one message per line
  buzon listen tcp://127.0.0.1:7000    # serve every client until Ctrl-C
  buzon recv fifo:/tmp/f --raw         # then: printf hello > /tmp/f
  buzon call unix:calc add 1 2         # an RPC call; prints the result as JSON
  buzon ls; buzon clean --dry-run
  buzon demo                           # every transport between real processes

exit status: 0 ok, 1 error, 2 bad usage, 3 timeout, 130 Ctrl-C,
141 stdout closed (| head), 143 recv stopped by SIGTERM.
"""

# the schemes the help texts name, from the registry
_WHOLE = describe(lambda i: i.message_boundaries, conj="and")
_ONE_PEER = describe(lambda i: i.connection_oriented, conj="and")

_SEND_EPILOG = f"""\
MSG is sent as JSON when it parses as JSON (42 -> number, '"42"' -> string,
'{{"a": 1}}' -> map), else as a string. '-' (the default) reads stdin: one message
per line. --raw sends bytes exactly as they are, without framing, to programs that
do not speak buzon (a FIFO reader, socat, nc); all of stdin is one message on
{_WHOLE}.

examples:
  buzon send unix:calc '[1, 2, 3]'
  buzon send mq:jobs --priority 5 urgent
  printf 'a\\nb\\n' | buzon send tcp://127.0.0.1:7000 -
  tar c dir | buzon send --raw unix:/tmp/backup.sock -
  buzon send --raw udp://127.0.0.1:9999 'hello, nc'
"""

_RECV_EPILOG = f"""\
Objects are printed as JSON lines: bytes as {{"$bytes": BASE64}}, numpy arrays as
{{"$ndarray": {{"dtype", "shape", "nbytes"}}}} (a summary). --raw writes the bytes
received to stdout exactly as they are; on stream transports -n then counts chunks
(what one read returned), messages on {_WHOLE}.
Connection-oriented schemes accept ONE peer: {_ONE_PEER}.
fifo: --raw ends like cat when the last writer closes; framed, writers may come and
go (end it with -n, --timeout or Ctrl-C). A line 'buzon: listening on ADDRESS'
goes to stderr first (unless -q): with port 0 it tells the real port.

exit status: 0 when N messages were printed or the peer closed, 3 when --timeout
seconds passed without a message, 1 on error, 143 on SIGTERM.

examples:
  buzon recv unix:calc -n 1
  buzon recv mq:jobs --timeout 5
  buzon recv fifo:/tmp/f --raw -n 1      # and: sh -c 'printf hello > /tmp/f'
  buzon recv unix:/tmp/s.sock --raw      # and: printf hi | socat - UNIX-CONNECT:/tmp/s.sock
"""

_LISTEN_EPILOG = f"""\
Serves every client at once and prints each message as '[PEER] JSON' (PEER:
'pid N' on Unix sockets, HOST:PORT on TCP, the transport name where the sender is
unknown). Each connection is a channel of its own on {_ONE_PEER}.
Connections and departures are reported on stderr. Ctrl-C or SIGTERM closes
everything, removes the endpoint and exits 0.

examples:
  buzon listen unix:log
  buzon listen tcp://127.0.0.1:7000 --raw        # and: nc 127.0.0.1 7000
  buzon listen udp://127.0.0.1:9999 -q
"""

_WIRES = ("buzon", "msgpack-rpc", "jsonrpc")

_CALL_EPILOG = """\
Each ARG is sent as JSON when it parses as JSON (42 -> number, '"42"' -> string,
'[1, 2]' -> list), else as a string, like 'buzon send'. The result is printed as
one JSON line (bytes as {"$bytes": BASE64}, as 'buzon recv' does). A call the
server answers with an error prints 'buzon: error: remote error CODE: MESSAGE'
on stderr and exits 1 (the codes are buzon.errors.RemoteError's, JSON-RPC's).
--wire msgpack-rpc talks to Neovim (nvim --listen) and other msgpack-rpc peers,
--wire jsonrpc to JSON-RPC 2.0 servers with Content-Length framing. --notify
sends a one-way call (no reply, no result, no error back).

exit status: 0 ok, 1 remote error or other error, 3 timeout (deadline).

examples:
  buzon call unix:calc add 1 2                       # 3
  buzon call unix:calc greet world                   # "hello, world"
  buzon call unix:/tmp/nvim.sock nvim_eval '"1+2"' --wire msgpack-rpc
  buzon call unix:calc log started --notify
"""

_LS_EPILOG = """\
STATE is 'listening' or 'bound' for live sockets, 'reader' for a FIFO somebody
reads, 'dead' / 'no reader' otherwise, '?' when it cannot be told. POSIX queues of
this user are listed too (without a mounted mqueue file system: only those a
process holds open), and so are this user's shared-memory segments (/dev/shm/buzon-*)
with the pids attached to them and how full their ring is. RPC servers (type rpc)
show their service, address, wire, semantics, calls served, calls in flight and
errors, 'dead' once their process died ('buzon clean' removes those).
"""

_CHAOS_EPILOG = """\
FRONT and BACK are both datagram (udp://, unixgram:) or both stream (tcp://,
unix:). The options override the profile in both directions. A line 'buzon:
relaying FRONT -> BACK (profile P, seed N)' goes to stderr first (unless -q): with
port 0 it tells the real port, and the seed replays the run. On Ctrl-C or SIGTERM
the relay stops and prints its counters on one line; exit status 0.

examples:
  buzon chaos udp://127.0.0.1:7001 udp://127.0.0.1:7000 --profile wifi --seed 7
  buzon chaos unix:calc-lossy unix:calc --delay 20 --jitter 10 --log chaos.jsonl
"""

_CLEAN_EPILOG = """\
Removes from the runtime dir only what is provably dead and older than 2 seconds:
socket files nobody is bound to, FIFOs nobody reads, client datagram sockets
c-PID-*.dgram of dead processes. POSIX queues are never removed. Shared-memory
segments are removed only when no process holds a participant lock on them (the
kernel drops it when its holder dies) and they are older than 2 seconds; a mailbox
with messages in it only with --force (a mailbox lives until removed). Then the
name files (NAME.bbuf, NAME.array, NAME.value, NAME.mbox) whose segment is gone.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``buzon`` (also used to render the docs)."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The main parser and each subcommand's own parser, by name."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="buzon",
        description="buzon: one message-passing API over every IPC mechanism.",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"buzon {buzon.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "send",
        help="connect to URL and send messages",
        description="Connect to URL and send MSG, or stdin.",
        epilog=_SEND_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("url", metavar="URL", help="where to send (see 'buzon --help')")
    p.add_argument("message", metavar="MSG", nargs="?", default="-", help="message, or '-'")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="bytes exactly as they are, no framing")
    mode.add_argument("--bytes", action="store_true", help="send each message as bytes")
    p.add_argument("--json-codec", action="store_true", help="encode objects as JSON frames")
    p.add_argument(
        "--priority", type=_priority_arg, default=0, help="POSIX queue priority (mq only)"
    )
    p.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=DEFAULT_SEND_TIMEOUT,
        metavar="S",
        help=f"seconds to connect, and for each send (default {DEFAULT_SEND_TIMEOUT:g}; inf)",
    )
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser(
        "recv",
        help="create the endpoint and print what one peer sends",
        description=(
            "Create/bind URL, accept one peer and print what it sends; with -n N on"
            " unix/tcp, peer after peer until N messages arrived."
        ),
        epilog=_RECV_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("url", metavar="URL", help="the endpoint to create (see 'buzon --help')")
    p.add_argument(
        "-n",
        dest="count",
        type=_count_arg,
        metavar="N",
        help="stop after N (unix/tcp: from peer after peer)",
    )
    p.add_argument("--raw", action="store_true", help="write the bytes received as they are")
    p.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=None,
        metavar="S",
        help="stop (exit 3) after S seconds without a message (default: wait forever)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no 'listening on' line")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback TCP/UDP bind")
    p.set_defaults(func=_cmd_recv)

    p = sub.add_parser(
        "listen",
        help="serve every client of URL until Ctrl-C",
        description="Create/bind URL and print what every client sends, until Ctrl-C.",
        epilog=_LISTEN_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("url", metavar="URL", help="the endpoint to create (see 'buzon --help')")
    p.add_argument("--raw", action="store_true", help="bytes as they are (no framing)")
    p.add_argument("-q", "--quiet", action="store_true", help="no peer prefixes or notices")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback TCP/UDP bind")
    p.set_defaults(func=_cmd_listen)

    p = sub.add_parser(
        "call",
        help="call METHOD of the RPC server at URL and print the result as JSON",
        description="Call METHOD(ARGS...) on the buzon.rpc server at URL; print the result.",
        epilog=_CALL_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("url", metavar="URL", help="the RPC server (see 'buzon --help')")
    p.add_argument("method", metavar="METHOD", help="the method's name")
    p.add_argument("args", metavar="ARG", nargs="*", help="an argument: JSON, else a string")
    p.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=DEFAULT_SEND_TIMEOUT,
        metavar="S",
        help=f"seconds to connect and for the call (default {DEFAULT_SEND_TIMEOUT:g}; inf)",
    )
    p.add_argument(
        "--wire", choices=_WIRES, default="buzon", help="the wire format (default buzon)"
    )
    p.add_argument("--notify", action="store_true", help="a one-way call: send, print nothing")
    p.set_defaults(func=_cmd_call)

    p = sub.add_parser(
        "ls",
        help="list endpoints in the runtime dir, and queues",
        description="List FIFOs, sockets and POSIX queues of this user, and their state.",
        epilog=_LS_EPILOG,
        formatter_class=fmt,
    )
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser(
        "clean",
        help="remove dead endpoints from the runtime dir",
        description="Remove provably dead entries from the runtime dir.",
        epilog=_CLEAN_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument(
        "--force", action="store_true", help="also remove unused mailboxes with messages in them"
    )
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser(
        "demo",
        help="show every transport between real processes",
        description="Move messages over each transport between real processes, narrated.",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "chaos",
        help="relay FRONT <-> BACK with faults (drop, duplicate, reorder, delay...)",
        description="Relay datagrams or streams between FRONT and BACK, with faults, "
        "until Ctrl-C or SIGTERM; then print a one-line summary of what was done.",
        epilog=_CHAOS_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("front", metavar="FRONT", help="where clients connect (port 0: a free one)")
    p.add_argument("back", metavar="BACK", help="the real server, of the same kind")
    p.add_argument("--profile", default="clean", choices=_chaos_profiles(), help="start from")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    for flag, what in (
        ("drop", "lose"),
        ("dup", "duplicate"),
        ("reorder", "hold back"),
        ("corrupt", "flip a bit of"),
    ):
        p.add_argument(
            f"--{flag}", type=_probability_arg, metavar="P", help=f"{what} a datagram with P"
        )
    p.add_argument("--delay", type=_ms_arg, metavar="MS", help="delay every datagram/chunk")
    p.add_argument("--jitter", type=_ms_arg, metavar="MS", help="delay ± up to MS")
    p.add_argument("--log", metavar="FILE", help="write every decision to FILE (JSON lines)")
    p.add_argument("-q", "--quiet", action="store_true", help="no 'relaying' line on stderr")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback front")
    p.set_defaults(func=_run_chaos)

    sub.add_parser(
        "bench",
        help="benchmark buzon against the raw mechanisms (see 'buzon bench --help')",
        add_help=False,
    )
    for name, command in sub.choices.items():
        command.set_defaults(command=name)
    return parser, dict(sub.choices)


# -- entry point ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``buzon`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser, commands = _build_parsers()
    try:
        if argv and argv[0] in commands:
            # intermixed: options may follow positionals, even '-' (stdin)
            args = commands[argv[0]].parse_intermixed_args(argv[1:])
        else:
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, bad usage: argparse has printed it
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "command", None) is None:
        parser.print_usage(sys.stderr)
        print("buzon: error: a COMMAND is required (see 'buzon --help')", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "send" and args.raw and args.json_codec:
        commands["send"].print_usage(sys.stderr)
        print(
            "buzon send: error: --raw sends bytes as they are; it takes no codec", file=sys.stderr
        )
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Terminated:
        return EXIT_TERMINATED
    except BuzonError as exc:
        _report(exc, args)
        return EXIT_TIMEOUT if isinstance(exc, Timeout) else EXIT_ERROR
    except OSError as exc:  # stdin/stdout and file-system errors outside the library
        _error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return EXIT_ERROR


def _run_bench(rest: list[str]) -> int:
    from . import bench  # lazily: it pulls in the whole benchmark suite

    try:
        return int(bench.main(rest))
    except SystemExit as exc:  # its --help, or bad usage
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _error(message: str) -> None:
    print(f"buzon: error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"buzon: {message}", file=sys.stderr, flush=True)


def _report(exc: BuzonError, args: argparse.Namespace) -> None:
    message = str(exc) or type(exc).__name__
    hint = _hint(exc, args)
    _error(f"{message}; hint: {hint}" if hint else message)


def _hint(exc: BuzonError, args: argparse.Namespace) -> str | None:
    cmd = args.command
    url = getattr(args, "url", "URL")
    raw = getattr(args, "raw", False)
    if isinstance(exc, AddressError):
        return _ADDRESS_HINT
    if cmd == "send" and isinstance(exc, NoSuchEndpoint | ConnectionRefused):
        return f"start a receiver first: buzon recv {url}"
    if cmd == "send" and isinstance(exc, EndOfChannel):
        return "the receiver went away (it may have had all it wanted, e.g. recv -n)"
    if cmd == "send" and isinstance(exc, Timeout):
        return f"is a receiver running? (buzon recv {url}); --timeout S waits longer"
    if cmd == "call" and isinstance(exc, NoSuchEndpoint | ConnectionRefused | Timeout):
        return f"is an RPC server running at {url}? --timeout S waits longer"
    if isinstance(exc, EndpointInUse):
        return "'buzon ls' shows what is there; 'buzon clean' removes dead endpoints"
    if isinstance(exc, InsecureBind):
        return "bind a loopback address, or pass --insecure if you really mean it"
    if isinstance(exc, HandshakeError) and not raw:
        return "if the other side does not speak buzon (socat, nc, a shell), use --raw"
    if isinstance(exc, FrameError) and not raw:
        return "if the sender does not speak buzon (a shell, socat, nc), receive with --raw"
    if isinstance(exc, MessageTooLarge) and cmd == "send":
        return "datagrams and queue messages have a size limit; use a stream (unix:, tcp://)"
    if isinstance(exc, UnsafePath):
        return "buzon refuses symlinks and other users' files for endpoints"
    return None


def _silence_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the exit flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (an embedding, a test capture)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` (main thread only) so cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- send -----------------------------------------------------------------------------


def _cmd_send(args: argparse.Namespace) -> int:
    address = parse_address(args.url)
    if address.scheme == "name":  # name:NAME: the address registered under NAME
        from .names import resolve

        address = resolve(address)
    options: dict[str, Any] = {"raw": args.raw}
    if args.json_codec:
        options["codec"] = "json"
    timeout: float | None = args.timeout
    with buzon.connect(address, timeout=timeout, **options) as ch:
        if args.raw:
            _send_raw(ch, args.message, address, timeout, args.priority)
        elif args.message == "-":
            for line in _stdin_lines():
                _send_one(ch, line, args.bytes, timeout, args.priority)
        else:
            _send_one(ch, args.message, args.bytes, timeout, args.priority)
        ch.flush(timeout)
    return EXIT_OK


def _send_one(
    ch: buzon.Channel, text: str | bytes, as_bytes: bool, timeout: float | None, prio: int
) -> None:
    if isinstance(text, bytes):  # a stdin line that is not UTF-8
        ch.send_bytes(text, timeout, priority=prio)
    elif as_bytes:
        ch.send_bytes(os.fsencode(text), timeout, priority=prio)
    else:
        ch.send(_parse_message(text), timeout, priority=prio)


def _stdin_lines() -> Iterator[str | bytes]:
    for raw_line in _stdin_binary():
        line = raw_line[:-1] if raw_line.endswith(b"\n") else raw_line
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            yield line


def _stdin_binary() -> IO[bytes]:
    stdin = sys.stdin
    if stdin is None:
        raise OSError(errno.EBADF, "stdin is closed")
    buffer: IO[bytes] = stdin.buffer
    return buffer


def _send_raw(
    ch: buzon.Channel, message: str, address: Address, timeout: float | None, prio: int
) -> None:
    if message != "-":
        ch.send_bytes(os.fsencode(message), timeout, priority=prio)
        return
    stdin = _stdin_binary()
    if _whole_messages(address):
        ch.send_bytes(stdin.read(), timeout, priority=prio)
        return
    read1 = getattr(stdin, "read1", stdin.read)
    while True:
        chunk = read1(_CHUNK)
        if not chunk:
            return
        ch.send_bytes(chunk, timeout)


# -- recv -----------------------------------------------------------------------------


def _listen_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"raw": args.raw}
    if args.insecure:
        options["insecure"] = True
    return options


def _announce(listener: buzon.Listener, quiet: bool) -> None:
    if quiet:
        return
    addr = listener.address
    where = ""
    kind = scheme_info(addr.scheme).address
    if kind == "local":
        where = f" ({addr.fs_path()})"
    elif kind == "queue":
        where = f" (queue {addr.mq_name()})"
    _note(f"listening on {addr}{where}")


def _cmd_recv(args: argparse.Namespace) -> int:
    address, named = _bind_address(args.url)
    timeout: float | None = args.timeout
    out = _Output(raw=args.raw)
    # On unix/tcp each sender is its own connection: with -n N, when one peer closes
    # the next is accepted until N items arrived; without -n the first peer's end ends.
    one_after_another = _accepts_many(address) and args.count is not None
    with _sigterm_raises():
        listener = buzon.listen(address, **named, **_listen_options(args))
        ch: buzon.Channel | None = None
        try:
            _announce(listener, args.quiet)
            count = 0
            while args.count is None or count < args.count:
                if ch is None:
                    try:
                        ch = listener.accept(timeout=timeout)
                    except Timeout:
                        return _timed_out(args, count)
                    if _accepts_many(address) and not one_after_another:
                        listener.close()  # one peer only: later ones are refused, not left hanging
                try:
                    item = ch.recv_bytes(timeout) if args.raw else ch.recv(timeout)
                except EndOfChannel:
                    if not one_after_another:
                        break
                    ch.close()
                    ch = None  # this sender is done: take the next one
                    continue
                except Timeout:
                    return _timed_out(args, count)
                out.item(item)
                count += 1
            return EXIT_OK
        finally:
            if ch is not None:
                _note_skipped(args, ch)
                ch.close()
            listener.close()


def _note_skipped(args: argparse.Namespace, ch: buzon.Channel) -> None:
    """A framed FIFO skips what is no buzon message (a shell's bytes): say so."""
    skipped = ch.statistics().rejected_frames
    if skipped and not args.raw and not args.quiet:
        _note(
            f"skipped {skipped} run(s) of bytes that were no buzon message; if the sender "
            "does not speak buzon (a shell, socat, nc), receive with --raw"
        )


def _timed_out(args: argparse.Namespace, count: int) -> int:
    if not args.quiet:
        what = "chunk" if args.raw else "message"
        _note(f"no {what} for {args.timeout:g} s; stopping after {count} received")
    return EXIT_TIMEOUT


class _Output:
    """Writes received items to stdout: JSON lines, or bytes as they are."""

    def __init__(self, *, raw: bool) -> None:
        self.raw = raw
        self.text = sys.stdout
        self.binary: IO[bytes] | None = getattr(sys.stdout, "buffer", None) if raw else None

    def item(self, item: Any, prefix: str = "") -> None:
        if self.raw:
            self.write_bytes(item)
        else:
            self.text.write(f"{prefix}{_json_line(item)}\n")
            self.text.flush()

    def write_bytes(self, data: bytes) -> None:
        if self.binary is not None:
            self.binary.write(data)
            self.binary.flush()
        else:  # a text-only stdout (an embedding): best effort
            self.text.write(data.decode("utf-8", "backslashreplace"))
            self.text.flush()


# -- listen ---------------------------------------------------------------------------


def _peer_label(ch: buzon.Channel) -> str:
    peer = ch.peer
    if peer.pid is not None:
        return f"pid {peer.pid}"
    addr = peer.address
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    if addr:
        return str(addr)
    return ch.properties.transport


class _LineSplitter:
    """``listen --raw`` with prefixes: cut one peer's bytes into prefixed lines."""

    def __init__(self, out: _Output, prefix: bytes) -> None:
        self.out = out
        self.prefix = prefix
        self.partial = b""

    def feed(self, data: bytes) -> None:
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        if lines:
            self.out.write_bytes(b"".join(self.prefix + line + b"\n" for line in lines))

    def end(self) -> None:
        if self.partial:
            self.out.write_bytes(self.prefix + self.partial + b"\n")
            self.partial = b""


class _Server:
    """State of ``buzon listen``: the listener, its channels and their labels."""

    def __init__(self, args: argparse.Namespace, listener: buzon.Listener) -> None:
        self.args = args
        self.listener = listener
        self.out = _Output(raw=args.raw)
        self.channels: dict[buzon.Channel, str] = {}
        self.splitters: dict[buzon.Channel, _LineSplitter] = {}
        self.single = not _accepts_many(listener.address)
        self.whole = _whole_messages(listener.address)

    def note(self, message: str) -> None:
        if not self.args.quiet:
            _note(message)

    def run(self) -> None:
        if self.single:
            self.add(self.listener.accept(timeout=0))
        while True:
            watched: list[Any] = list(self.channels)
            if not self.single:
                watched.append(self.listener)
            for obj in buzon.wait(watched):
                if obj is self.listener:
                    self.accept()
                else:
                    self.drain(obj)

    def add(self, ch: buzon.Channel) -> None:
        label = _peer_label(ch)
        self.channels[ch] = label
        if self.args.raw and not self.args.quiet:
            self.splitters[ch] = _LineSplitter(self.out, f"[{label}] ".encode())
        if not self.single:
            self.note(f"{label} connected")

    def accept(self) -> None:
        try:  # (handshakes run concurrently inside the listener; a failed one is refused)
            ch = self.listener.accept(timeout=0)
        except Timeout:
            return  # no handshake finished yet
        self.add(ch)

    def drain(self, ch: buzon.Channel) -> None:
        label = self.channels[ch]
        for _ in range(_DRAIN_BATCH):
            try:
                item = ch.recv_bytes_nowait() if self.args.raw else ch.recv_nowait()
            except Empty:
                return
            except EndOfChannel:
                self.drop(ch, f"{label} disconnected")
                return
            except CodecError as exc:  # framed fine, but its payload does not decode
                self.note(f"{label}: dropped a message: {exc}")
                continue
            except BuzonError as exc:
                if self.single and self.whole:
                    self.note(f"dropped a bad message: {exc}")  # the next one is whole
                    continue
                if self.single:
                    raise  # a torn byte stream cannot be resynchronised
                self.drop(ch, f"{label}: {exc}; connection closed")
                return
            self.emit(ch, label, item)

    def emit(self, ch: buzon.Channel, label: str, item: Any) -> None:
        if not self.args.raw:
            self.out.item(item, "" if self.args.quiet else f"[{label}] ")
            return
        splitter = self.splitters.get(ch)
        if splitter is None:
            self.out.write_bytes(item)
            return
        splitter.feed(item)
        if self.whole:
            splitter.end()  # a message is a unit: finish its last line

    def drop(self, ch: buzon.Channel, why: str) -> None:
        splitter = self.splitters.pop(ch, None)
        if splitter is not None:
            splitter.end()
        del self.channels[ch]
        ch.close()
        if not self.single:
            self.note(why)
        else:  # the endpoint's one channel ended: nothing more can arrive
            raise EndOfChannel(why)

    def close(self) -> None:
        for ch in list(self.channels):
            splitter = self.splitters.pop(ch, None)
            if splitter is not None:
                with contextlib.suppress(Exception):
                    splitter.end()
            ch.close()
        self.channels.clear()
        self.listener.close()


def _cmd_listen(args: argparse.Namespace) -> int:
    address, named = _bind_address(args.url)
    with _sigterm_raises():
        listener = buzon.listen(address, **named, **_listen_options(args))
        server = _Server(args, listener)
        try:
            _announce(listener, args.quiet)
            server.run()
        except (KeyboardInterrupt, _Terminated):
            pass
        except EndOfChannel:
            pass  # a single-channel endpoint whose writers are all gone
        finally:
            server.close()
    return EXIT_OK


# -- call -----------------------------------------------------------------------------


def _cmd_call(args: argparse.Namespace) -> int:
    from .errors import RemoteError
    from .rpc import connect

    params = [_parse_message(text) for text in args.args]
    timeout: float | None = args.timeout
    client: Any = connect(args.url, timeout=timeout, wire=args.wire)
    try:
        if args.notify:
            client.notify(args.method, *params)
            channel = getattr(client, "channel", None)
            if isinstance(channel, buzon.Channel):
                channel.flush(timeout)
            return EXIT_OK
        try:
            result = client.call(args.method, *params)
        except RemoteError as exc:
            detail = "" if exc.data is None else f" ({_json_line(exc.data)})"
            _error(f"remote error {exc.code}: {exc.message}{detail}")
            return EXIT_ERROR
    finally:
        client.close()
    print(_json_line(result), flush=True)
    return EXIT_OK


# -- ls and clean ---------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._forensics import ls_rows

    rdir = runtime_dir()
    rows = ls_rows(rdir)
    print(f"runtime dir: {rdir}")
    if not rows:
        print("(empty)")
        return EXIT_OK
    header = ("ADDRESS", "TYPE", "MODE", "STATE", "PATH")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]))
    sys.stdout.flush()
    return EXIT_OK


def _cmd_clean(args: argparse.Namespace) -> int:
    from ._forensics import clean

    rdir = runtime_dir()
    removed = clean(rdir, dry_run=args.dry_run, force=args.force)
    what = "would remove" if args.dry_run else "removed"
    for item in removed:
        print(f"{what} {item.path} ({item.why})")
    if not removed:
        print(f"nothing to clean in {rdir}")
    sys.stdout.flush()
    return EXIT_OK


# -- chaos ----------------------------------------------------------------------------


def _chaos_profiles() -> list[str]:
    from .testing.chaos import PROFILES

    return list(PROFILES)


def _probability_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a probability is from 0 to 1")
    return value


def _ms_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError("milliseconds are a number >= 0")
    return value / 1000.0


def _run_chaos(args: argparse.Namespace) -> int:
    from .testing.chaos import PROFILES, ChaosRelay

    names = {"drop": "drop", "dup": "duplicate", "reorder": "reorder", "corrupt": "corrupt"}
    names.update(delay="delay", jitter="jitter")
    changes = {field: getattr(args, opt) for opt, field in names.items()}
    faults = PROFILES[args.profile].with_(**{k: v for k, v in changes.items() if v is not None})
    relay = ChaosRelay(
        args.front,
        args.back,
        profile=faults,
        seed=args.seed,
        log=args.log,
        max_events=0,  # the log file keeps them; a long run must not grow
        insecure=args.insecure,
    )
    with _sigterm_raises():
        try:
            relay.start()
            if not args.quiet:
                _note(
                    f"relaying {relay.address} -> {relay.back} "
                    f"(profile {args.profile}, seed {relay.seed})"
                )
            while relay.running:
                time.sleep(0.2)
        except (KeyboardInterrupt, _Terminated):
            pass
        finally:
            relay.close()
    print(f"chaos: {relay.summary()}", flush=True)
    if relay.failure is not None:
        _error(f"the relay stopped: {relay.failure}")
        return EXIT_ERROR
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main()
