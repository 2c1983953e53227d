"""Generate the parts of the docs that the code defines, and check they are current.

::

    python -m buzon.docgen docs            # rewrite every generated section in place
    python -m buzon.docgen docs --check    # exit 1 if any generated section is stale

Theory of operation
-------------------
A generated section of a Markdown page sits between two marker comments::

    <!-- BEGIN GENERATED: transports -->
    ... produced by this module, never edited by hand ...
    <!-- END GENERATED: transports -->

Everything outside the markers is written by people. :data:`SECTIONS` maps each
page to the renderers of its sections; a renderer reads the code (tables, enums,
dataclasses, struct formats) and returns Markdown. Where the code is a state machine,
the renderer does not trust a comment or a summary: it *runs* the sans-IO protocol
objects through every scenario (no sockets, fixed nonces) and draws what they did,
then checks that against the declared table (``handshake.TRANSITIONS``). So a page
cannot describe a protocol the code does not speak, and ``--check`` (run by
``tests/test_docs.py``) fails the suite when code and docs drift apart.

The renderers are deterministic: no pids, uids, times or random bytes reach the
output. The one OS object touched is a POSIX queue created (and removed) to read the
real ``mq`` link properties, with explicit sizes so every machine renders the same.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import pkgutil
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from . import codec, transport
from . import errors as _errors
from ._channel import ChannelCore, ChannelOptions
from ._policy import capacity_support, prepare
from ._record import fields as record_fields
from ._record import replace as record_replace
from ._schemes import SCHEMES, SchemeInfo, scheme_info
from .address import Address, parse_address
from .protocol import credit, frames, handshake, mpcompat
from .transport import mq, pipe, reliable, shm, tcp, udp
from .transport.base import LinkProperties, Transport, TransportOptions

__all__ = ["SECTIONS", "SectionError", "check", "main", "render_page", "write"]

BEGIN = "<!-- BEGIN GENERATED: {name} -->"
END = "<!-- END GENERATED: {name} -->"
_MARKER_RE = re.compile(r"<!-- (BEGIN|END) GENERATED: ([A-Za-z0-9_-]+) -->")


class SectionError(Exception):
    """A page's markers are missing, unbalanced or name an unknown section."""


# =============================================================================== helpers


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _size(n: int) -> str:
    """``67108864`` -> ``64 MiB (67108864)``; small numbers stay plain."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit} ({n})"
    return str(n)


_STRUCT_TYPES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "i": "i32", "q": "i64"}
_ENDIAN = {"<": "little-endian", ">": "big-endian", "!": "big-endian (network order)"}


def _struct_fields(st: struct.Struct) -> tuple[str, list[tuple[int, int, str]]]:
    """(byte order, [(offset, size, type name)]) of a struct with explicit byte order."""
    fmt = st.format
    order, codes = fmt[0], fmt[1:]
    if order not in _ENDIAN or not codes.isalpha():
        raise ValueError(f"cannot describe struct format {fmt!r}")
    out = []
    offset = 0
    for code in codes:
        size = struct.calcsize(order + code)
        out.append((offset, size, _STRUCT_TYPES[code]))
        offset += size
    return _ENDIAN[order], out


# ============================================================================= frames.md

# The words are here, the numbers come from the code; a field added to the header
# struct without a description here makes the generator fail loudly.
_HEADER_FIELDS: tuple[tuple[str, Callable[[], str]], ...] = (
    (
        "version",
        lambda: (
            f"`{frames.VERSION:#04x}`; any other value is a `FrameError` "
            "(the stream cannot be resynchronised)"
        ),
    ),
    (
        "kind",
        lambda: (
            ", ".join(f"{int(k)} {k.name}" for k in frames.Kind)
            + "; 64-127: optional control frames (skipped by a receiver that does not know them)"
        ),
    ),
    (
        "flags",
        lambda: (
            f"bits 0-2 (mask `{frames._CODEC_MASK:#04x}`): codec id; "
            f"bit 3 (`{frames._RECEIPT:#04x}`, DATA and CREDIT): a receipt is asked for / "
            "the sender is blocked; "
            f"bit 4 (`{frames.CHUNKED_FLAG:#04x}`, DATA only): CHUNKED, the payload goes "
            "as segments (streams only); "
            f"bit 5 (`{frames.FIELDS_FLAG:#04x}`, DATA only): FIELDS, a header-field block "
            "follows the length table; "
            f"bits 6-7 (mask `{frames._RESERVED_MASK:#04x}`): reserved, must be zero"
        ),
    ),
    ("nbufs", lambda: "number of out-of-band buffers, 0-255; non-zero only in DATA frames"),
    ("body length", lambda: "length of the codec body in bytes"),
)

_KIND_DOCS = {
    frames.Kind.DATA: "a message: codec body plus out-of-band buffers",
    frames.Kind.HELLO: "handshake: version, role, pid, channel options, nonce and MAC",
    frames.Kind.AUTH: "handshake: the client's proof that it knows the authkey",
    frames.Kind.WELCOME: "handshake: the server's verdict (`ok`, and `error` when refused)",
    frames.Kind.CLOSE: "reserved for an orderly close; not sent by this version",
    frames.Kind.CREDIT: (
        "capacity credits and receipts: 16-byte body, u64 `taken` and u64 `limit` "
        "(see [semantics](semantics.md))"
    ),
}

_CODEC_DOCS = {
    frames.CodecId.RAW: ("`send_bytes`/`recv_bytes`", "the body is the bytes, as given"),
    frames.CodecId.MSGPACK: (
        "`send`/`recv` (default)",
        "msgspec msgpack; numpy arrays and large bytes travel out of band",
    ),
    frames.CodecId.JSON: ("`codec='json'`", "msgspec JSON, for peers that want text"),
    frames.CodecId.PICKLE: (
        "`codec='pickle', pickle=True` (opt-in)",
        "pickle protocol 5; on a channel without `pickle=True` the frame is rejected "
        "from this id, before any byte is unpickled (`PickleRejected`)",
    ),
}


def _module_suffix(module: str) -> str:
    """``.py`` for a transport module, ``/`` for a transport package."""
    package = os.path.join(os.path.dirname(__file__), "transport", module, "__init__.py")
    return "/" if os.path.exists(package) else ".py"


def render_frame_header() -> str:
    order, fields = _struct_fields(frames.HEADER)
    if len(fields) != len(_HEADER_FIELDS):
        raise SectionError(
            f"frames.HEADER has {len(fields)} fields but docgen describes "
            f"{len(_HEADER_FIELDS)}; update docgen._HEADER_FIELDS"
        )
    rows = [
        (str(off), str(size), f"{name} ({tname})", describe())
        for (off, size, tname), (name, describe) in zip(fields, _HEADER_FIELDS, strict=True)
    ]
    buflen = frames._BUFLEN
    _, blen_fields = _struct_fields(buflen)
    hsize = frames.HEADER.size
    rows += [
        (
            str(hsize),
            f"{buflen.size} * nbufs",
            f"buffer lengths ({blen_fields[0][2]} each)",
            "one length per out-of-band buffer, in order",
        ),
        (
            "…",
            f"{frames._FIELDS_LEN.size} + L",
            "header fields (FIELDS only)",
            "u16 L, then L bytes of fields: u8 tag, u8 length, value (see the field tags)",
        ),
        ("…", "body length", "codec body", "e.g. msgpack bytes; see the codec ids"),
        ("…", "sum of buffer lengths", "buffers", "the out-of-band buffers, back to back"),
    ]
    return "\n".join(
        [
            f"All integers are {order}. The fixed header is {hsize} bytes "
            f"(`struct` format `{frames.HEADER.format}`).",
            "",
            _table(("offset", "size", "field", "meaning"), rows),
        ]
    )


def render_frame_kinds() -> str:
    missing = [k.name for k in frames.Kind if k not in _KIND_DOCS]
    if missing:
        raise SectionError(f"frame kinds without a description in docgen: {missing}")
    return _table(
        ("kind", "name", "meaning"),
        ((str(int(k)), k.name, _KIND_DOCS[k]) for k in frames.Kind),
    )


def render_codec_ids() -> str:
    missing = [c.name for c in frames.CodecId if c not in _CODEC_DOCS]
    if missing:
        raise SectionError(f"codec ids without a description in docgen: {missing}")
    return _table(
        ("id", "codec", "used by", "body"),
        ((str(int(c)), c.name.lower(), *_CODEC_DOCS[c]) for c in frames.CodecId),
    )


def _hex(data: bytes | bytearray | memoryview) -> str:
    return "`" + bytes(data).hex(" ") + "`" if len(data) else "(none)"


def render_frame_examples() -> str:
    out: list[str] = []
    for call, obj in (('ch.send({"n": 1})', {"n": 1}), ("ch.send(bytes(2048))", bytes(2048))):
        codec_id, body, buffers = codec.Codec().encode(obj)
        parts = frames.encode_frame(frames.Kind.DATA, codec_id, body, buffers)
        wire = b"".join(bytes(p) for p in parts)
        hsize = frames.HEADER.size
        version, kind, flags, nbufs, blen = frames.HEADER.unpack_from(wire)
        table_end = hsize + frames._BUFLEN.size * nbufs
        rows = [
            ("header", _hex(wire[:hsize]), f"v{version}, {frames.Kind(kind).name}, "
             f"codec {frames.CodecId(flags & frames._CODEC_MASK).name.lower()}, "
             f"{nbufs} buffer(s), body {blen} bytes"),
            ("buffer lengths", _hex(wire[hsize:table_end]),
             ", ".join(str(b.nbytes) for b in buffers) or "—"),
            ("body", _hex(wire[table_end : table_end + blen]), "the msgpack body"),
            ("buffers", f"{len(wire) - table_end - blen} bytes", "sent from the object's memory"),
        ]  # fmt: skip
        out += [
            f"`{call}` puts {len(wire)} bytes on the wire:",
            "",
            _table(("part", "bytes", "meaning"), rows),
            "",
        ]
    return "\n".join(out[:-1])


def _max_frame_bounds() -> tuple[int, int]:
    """The smallest and largest ``max_frame`` the option parser accepts (probed)."""

    def ok(n: int) -> bool:
        try:
            prepare("unix:docgen", listening=False, max_frame=n)
        except ValueError:
            return False
        return True

    lo = 1 << 10
    hi = 1 << 40
    if not (ok(lo) and not ok(lo - 1) and ok(hi) and not ok(hi + 1)):
        raise SectionError("max_frame bounds changed; update docgen._max_frame_bounds")
    return lo, hi


def render_frame_limits() -> str:
    lo, hi = _max_frame_bounds()
    defaults = inspect.signature(prepare).parameters
    hs_timeout = defaults["handshake_timeout"].default
    rows = [
        ("frame version", "`frames.VERSION`", str(frames.VERSION)),
        ("handshake version", "`handshake.PROTOCOL_VERSION`", str(handshake.PROTOCOL_VERSION)),
        ("fixed header", "`frames.HEADER.size`", f"{frames.HEADER.size} bytes"),
        ("default frame cap", "`frames.DEFAULT_MAX_FRAME`", _size(frames.DEFAULT_MAX_FRAME)),
        ("frame cap range", "`max_frame=` option", f"{_size(lo)} to {_size(hi)}"),
        ("handshake frame cap", "`frames.HANDSHAKE_MAX_FRAME`", _size(frames.HANDSHAKE_MAX_FRAME)),
        ("handshake time limit", "`handshake_timeout=` option", f"{hs_timeout} s"),
        ("handshake nonce", "`handshake.NONCE_SIZE`", f"{handshake.NONCE_SIZE} bytes"),
        ("out-of-band buffers per frame", "`nbufs` is a u8", "255"),
        ("out-of-band threshold", "`codec.OOB_THRESHOLD`", f"{codec.OOB_THRESHOLD} bytes"),
        (
            "multiprocessing handshake message",
            "`mpcompat.AUTH_MAX_MESSAGE`",
            f"{mpcompat.AUTH_MAX_MESSAGE} bytes",
        ),
    ]
    return _table(("limit", "name", "value"), rows)


# -- the buzon handshake, observed


@dataclass(frozen=True)
class _Step:
    role: str
    before: handshake.State
    kind: frames.Kind
    condition: str
    sends: str
    after: handshake.State
    listed: bool  # (role, before, kind) is a key of TRANSITIONS


_NONCE_C = b"\x01" * handshake.NONCE_SIZE
_NONCE_S = b"\x02" * handshake.NONCE_SIZE
_OPTS = {"codec": "msgpack", "pickle": False}


def _frames_in(data: bytes) -> list[frames.Frame]:
    dec = frames.FrameDecoder(frames.HANDSHAKE_MAX_FRAME)
    dec.feed(data)
    return dec.take_all()


def _describe(frame: frames.Frame) -> str:
    body = msgspec.msgpack.decode(frame.body)
    name = frames.Kind(frame.kind).name
    if isinstance(body, dict):
        if frame.kind == frames.Kind.WELCOME:
            return f"{name} {{ok: {str(body['ok']).lower()}{', error' if 'error' in body else ''}}}"
        return f"{name} {{{', '.join(body)}}}"
    return name


class _Recorder:
    """Feeds frames to sans-IO Handshake objects and records what each did."""

    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self.log: list[tuple[str, str]] = []  # (sender role, description) for sequences

    def feed(self, hs: handshake.Handshake, frame: frames.Frame, condition: str) -> bytes:
        before = hs.state
        kind = frames.Kind(frame.kind)
        try:
            hs.receive(frame)
        except _errors.ProtocolError:
            pass
        out = hs.outgoing()
        sent = ", ".join(_describe(f) for f in _frames_in(out)) or "—"
        for f in _frames_in(out):
            self.log.append((hs.role, _describe(f)))
        self.steps.append(
            _Step(
                hs.role,
                before,
                kind,
                condition,
                sent,
                hs.state,
                (hs.role, before, kind) in handshake.TRANSITIONS,
            )
        )
        return out


def _client(key: bytes | None) -> handshake.Handshake:
    return handshake.Handshake(
        "client", pid=1, options=_OPTS, authkey=key, nonce=_NONCE_C if key else b""
    )


def _server(key: bytes | None) -> handshake.Handshake:
    return handshake.Handshake(
        "server", pid=2, options=_OPTS, authkey=key, nonce=_NONCE_S if key else b""
    )


def _one(data: bytes) -> frames.Frame:
    got = _frames_in(data)
    if len(got) != 1:
        raise SectionError(f"expected one handshake frame, got {len(got)}")
    return got[0]


def _hello_frame(**fields: Any) -> frames.Frame:
    hello = handshake.Hello(**fields)
    body = msgspec.msgpack.encode(hello)
    return _one(b"".join(bytes(b) for b in frames.encode_frame(frames.Kind.HELLO, 1, body)))


def _run_handshakes() -> tuple[list[_Step], dict[str, list[tuple[str, str]]]]:
    """Every scenario of the handshake, run on the real sans-IO objects."""
    steps: list[_Step] = []
    sequences: dict[str, list[tuple[str, str]]] = {}

    def scenario(name: str | None) -> _Recorder:
        rec = _Recorder()
        if name is not None:
            sequences[name] = rec.log
        return rec

    # 1. neither side has an authkey
    rec = scenario("without an authkey")
    c, s = _client(None), _server(None)
    hello = c.outgoing()
    rec.log.append(("client", _describe(_one(hello))))
    reply = rec.feed(s, _one(hello), "no authkey")
    rec.feed(c, _one(reply), "no authkey")
    steps += rec.steps

    # 2. both hold the same authkey
    rec = scenario("with an authkey")
    c, s = _client(b"key"), _server(b"key")
    hello = c.outgoing()
    rec.log.append(("client", _describe(_one(hello))))
    reply = rec.feed(s, _one(hello), "authkey; HELLO has a nonce")
    auth = rec.feed(c, _one(reply), "authkey; the server's MAC is right")
    welcome = rec.feed(s, _one(auth), "the client's MAC is right")
    rec.feed(c, _one(welcome), "ok: true")
    steps += rec.steps

    # 3. the AUTH frame is tampered with: the server refuses, the client hears why
    rec = scenario(None)
    c, s = _client(b"key"), _server(b"key")
    s.receive(_one(c.outgoing()))
    c.receive(_one(s.outgoing()))
    tampered = bytearray(c.outgoing())
    tampered[-1] ^= 0xFF  # the MAC is the last field of the AUTH body
    refusal = rec.feed(s, _one(bytes(tampered)), "the client's MAC is wrong")
    rec.feed(c, _one(refusal), "ok: false")
    steps += rec.steps

    # 4. the keys differ: the client catches the server's wrong MAC first
    rec = scenario(None)
    c, s = _client(b"key"), _server(b"other key")
    s.receive(_one(c.outgoing()))
    rec.feed(c, _one(s.outgoing()), "authkey; the server's MAC is wrong")
    steps += rec.steps

    # 5. the server requires a key the client does not have
    rec = scenario("refused: the server requires an authkey")
    c, s = _client(None), _server(b"key")
    hello = c.outgoing()
    rec.log.append(("client", _describe(_one(hello))))
    refusal = rec.feed(s, _one(hello), "authkey; HELLO has no nonce")
    rec.feed(c, _one(refusal), "refused before any HELLO")
    steps += rec.steps

    # 6. the client has a key, the server none: the client refuses the link
    rec = scenario(None)
    c, s = _client(b"key"), _server(None)
    s.receive(_one(c.outgoing()))
    rec.feed(c, _one(s.outgoing()), "authkey; the server sent no MAC")
    steps += rec.steps

    # 7. another protocol version, and frames out of place
    rec = scenario(None)
    other = handshake.PROTOCOL_VERSION + 1
    rec.feed(
        _server(None),
        _hello_frame(v=other, role="client", pid=1),
        f"peer speaks another version (v{other})",
    )
    data = _one(b"".join(bytes(b) for b in frames.encode_frame(frames.Kind.DATA, 1, b"\xc0")))
    rec.feed(_server(None), data, "any frame not listed above")
    fresh = _client(None)
    fresh.outgoing()  # its HELLO went out when it was made
    rec.feed(fresh, data, "any frame not listed above")
    steps += rec.steps

    _check_against_table(steps)
    return steps, sequences


def _check_against_table(steps: list[_Step]) -> None:
    """The observed behaviour and ``handshake.TRANSITIONS`` must describe the same machine."""
    seen = {(s.role, s.before, s.kind) for s in steps if s.listed}
    declared = set(handshake.TRANSITIONS)
    if seen != declared:
        raise SectionError(
            "handshake.TRANSITIONS and the handshake's behaviour disagree: "
            f"declared but never taken {sorted(map(str, declared - seen))}"
        )
    failed = handshake.State.FAILED
    for key, targets in handshake.TRANSITIONS.items():
        outcomes = {s.after for s in steps if (s.role, s.before, s.kind) == key}
        if not set(targets) <= outcomes or not outcomes <= {*targets, failed}:
            raise SectionError(f"TRANSITIONS{key} = {targets}, but the code goes to {outcomes}")
    for s in steps:
        if not s.listed and s.after is not handshake.State.FAILED:
            raise SectionError(f"unlisted transition {s} does not fail")


def _state(s: handshake.State) -> str:
    return f"`{s.value}`"


def render_handshake_states() -> str:
    steps, _ = _run_handshakes()
    rows = []
    for s in steps:
        kind = s.kind.name if s.listed else f"{s.kind.name} (not in the table)"
        rows.append((s.role, _state(s.before), kind, s.condition, s.sends, _state(s.after)))
    unique = list(dict.fromkeys(rows))
    unique.sort(key=lambda r: (r[0] != "client", r[5] == "`failed`", "not in" in r[2], r[1], r[2]))
    return "\n".join(
        [
            "Each row was produced by feeding a frame to the real `Handshake` object. "
            "Rows marked *not in the table* are the catch-all: any (role, state, kind) "
            "that is not a key of `TRANSITIONS` fails.",
            "",
            _table(("role", "state", "receives", "condition", "sends", "next state"), unique),
        ]
    )


def render_handshake_diagram() -> str:
    steps, _ = _run_handshakes()
    out = []
    for role in ("client", "server"):
        out += ["", f"**{role}**", "", "```mermaid", "stateDiagram-v2"]
        start = _client(None) if role == "client" else _server(None)
        out.append(f"    [*] --> {start.state.name}")
        edges: dict[tuple[str, str], list[str]] = {}
        for s in steps:
            if s.role != role:
                continue
            label = s.kind.name if s.listed else "other frame"
            labels = edges.setdefault((s.before.name, s.after.name), [])
            if label not in labels:
                labels.append(label)
        for (a, b), labels in edges.items():
            out.append(f"    {a} --> {b} : {' or '.join(labels)}")
        out += ["    DONE --> [*]", "    FAILED --> [*]", "```"]
    return "\n".join(out[1:])


def _sequence(log: list[tuple[str, str]]) -> str:
    width = max(len(d) for _, d in log) + 4
    lines = ["client".ljust(width + 6) + "server"]
    for sender, desc in log:
        if sender == "client":
            lines.append(desc.ljust(width) + "──▶")
        else:
            lines.append(" " * width + "◀──  " + desc)
    return "\n".join(lines)


def render_handshake_sequences() -> str:
    _, sequences = _run_handshakes()
    out = []
    for name, log in sequences.items():
        out += [f"{name.capitalize()}:", "", "```text", _sequence(log), "```", ""]
    return "\n".join(out[:-1])


# -- multiprocessing compat


def render_mp_framing() -> str:
    short = mpcompat.encode_header(5)
    long = mpcompat.encode_header(1 << 31)
    limit = (1 << 31) - 1
    if len(mpcompat.encode_header(limit)) != len(short) or long[:4] != b"\xff\xff\xff\xff":
        raise SectionError("the multiprocessing length prefix changed; update docgen")
    rows = [
        ("0", str(len(short)), "length (i32)", f"0 to {limit:#x}: the payload length"),
        (str(len(short)), "length", "payload", "the `send_bytes` argument, verbatim"),
        ("0", "4", "marker (i32)", "-1 (`ff ff ff ff`): the long form follows"),
        ("4", str(len(long) - 4), "length (u64)", f"payloads over {limit:#x} bytes"),
        (str(len(long)), "length", "payload", "verbatim"),
    ]
    return "\n".join(
        [
            "All integers are big-endian. The first three rows are the short form "
            "every sender uses below 2 GiB; the long form is accepted for any length.",
            "",
            _table(("offset", "size", "field", "meaning"), rows),
        ]
    )


def _mp_message(payload: bytes) -> str:
    """A handshake message, described without its random or secret bytes."""
    if payload.startswith(mpcompat.CHALLENGE):
        body = payload[len(mpcompat.CHALLENGE) :]
        if body.startswith(b"{"):
            name, _, rnd = body[1:].partition(b"}")
            return f"#CHALLENGE# {{{name.decode()}}} + {len(rnd)} random bytes"
        return f"#CHALLENGE# + {len(body)} random bytes"
    if payload in (mpcompat.WELCOME, mpcompat.FAILURE):
        return payload.decode()
    if payload.startswith(b"{"):
        name, _, mac = payload[1:].partition(b"}")
        return f"{{{name.decode()}}} + {len(mac)}-byte HMAC"
    return f"{len(payload)}-byte HMAC-MD5"


def _mp_payloads(messages: list[bytes]) -> list[bytes]:
    """The payloads of length-prefixed handshake messages."""
    out: list[bytes] = []
    for m in messages:
        dec = mpcompat.MessageDecoder(mpcompat.AUTH_MAX_MESSAGE)
        dec.feed(m)
        out.extend(bytes(x) for x in dec.messages)
    return out


def _mp_run(
    digest: str | None, client_key: bytes, condition: str
) -> tuple[list[tuple[str, str]], list[tuple[str, ...]]]:
    """Run ServerAuth against ClientAuth; return the message log and per-step rows."""
    sides: dict[str, Any] = {
        "server": mpcompat.ServerAuth(b"key", b"\x07" * 40, digest=digest),
        "client": mpcompat.ClientAuth(client_key, b"\x09" * 40),
    }
    log: list[tuple[str, str]] = []
    rows: list[tuple[str, ...]] = []
    outbox = [("server", p) for p in _mp_payloads(sides["server"].outgoing())]
    log += [("server", _mp_message(p)) for _, p in outbox]
    while outbox:
        sender, payload = outbox.pop(0)
        role = "client" if sender == "server" else "server"
        receiver = sides[role]
        before = receiver.state
        try:
            receiver.receive(payload)
        except _errors.ProtocolError:
            pass
        produced = _mp_payloads(receiver.outgoing())
        rows.append(
            (
                role,
                f"`{before.value}`",
                _mp_message(payload),
                condition,
                ", ".join(_mp_message(p) for p in produced) or "—",
                f"`{receiver.state.value}`",
            )
        )
        for p in produced:
            log.append((role, _mp_message(p)))
            outbox.append((role, p))
    return log, rows


def _mp_sequence(log: list[tuple[str, str]]) -> str:
    width = max(len(d) for _, d in log) + 4
    lines = ["server (Listener side)".ljust(width + 5) + "client (Client side)"]
    for sender, desc in log:
        if sender == "server":
            lines.append(desc.ljust(width) + "──▶")
        else:
            lines.append(" " * width + "◀──  " + desc)
    return "\n".join(lines)


def render_mp_handshake() -> str:
    out: list[str] = []
    legacy, rows = _mp_run(None, b"key", "right key")
    modern, _ = _mp_run("sha256", b"key", "right key")
    _, wrong = _mp_run(None, b"another key", "wrong key")
    for title, log in (
        ("Legacy challenge (the default: every Python version verifies it)", legacy),
        ("Modern challenge (`digest='sha256'`, the Python 3.12+ format)", modern),
    ):
        out += [f"{title}:", "", "```text", _mp_sequence(log), "```", ""]
    out += [
        "State by state, as the sans-IO `ServerAuth`/`ClientAuth` objects behave "
        "(legacy run, then a client holding another key):",
        "",
        _table(
            ("side", "state", "receives", "condition", "sends", "next state"),
            list(dict.fromkeys(rows + wrong)),
        ),
    ]
    return "\n".join(out)


# ========================================================================= transports.md

_PROPERTY_COLUMNS = {
    "direction": "direction",
    "boundaries": "boundaries (transport)",
    "connection_oriented": "connection-oriented",
    "reliable": "reliable",
    "ordered": "ordered",
    "local": "local",
    "max_message": "max message",
    "priorities": "priorities",
    "credentials": "peer credentials",
}
_PROPERTY_ELSEWHERE = {"transport", "notes", "capacity"}  # capacity: semantics.md
_MQ_SIZE = (10, 8192)  # the Linux defaults (msg_default, msgsize_default)


def _mq_properties() -> LinkProperties:
    """The properties of a real queue, created with explicit sizes and removed again."""
    addr = Address("mq", name=f"docgen-{os.getpid()}")
    opts = TransportOptions(mq_maxmsg=_MQ_SIZE[0], mq_msgsize=_MQ_SIZE[1])
    listener = mq.listen(addr, opts)
    try:
        reader = listener.accept()
        assert reader is not None
        props = reader.properties
        reader.close()
    finally:
        listener.close()
    notes = props.notes.replace(addr.mq_name(), "/buzon-UID-NAME")
    return record_replace(props, notes=notes)


def _reliable_props(scheme: str) -> LinkProperties:
    return reliable._properties(scheme, True, reliable.DEFAULT_CONFIG[scheme])


# Schemes whose links differ by option or by peer get a row per variant; every other
# scheme gets one row, ``scheme:``, from its module's PROPERTIES (so a new scheme needs
# nothing here).
_VARIANT_ROWS: dict[str, Callable[[], list[tuple[str, LinkProperties]]]] = {
    "pipe": lambda: [
        ("`buzon.pipe()`", pipe._props(True)),
        ("`buzon.pipe(duplex=False)`", pipe._props(False)),
    ],
    "mq": lambda: [("`mq:` ¹", _mq_properties())],
    "tcp": lambda: [
        ("`tcp://` loopback", tcp._props(True)),
        ("`tcp://` other hosts", tcp._props(False)),
    ],
    "udp": lambda: [
        ("`udp://` IPv4 loopback", udp._props(True, udp._max_message(socket.AF_INET))),
        ("`udp://` IPv6, other hosts", udp._props(False, udp._max_message(socket.AF_INET6))),
    ],
    "shm": lambda: [("`shm:`", shm._properties(shm.CAPACITY))],
}


def _scheme_rows(info: SchemeInfo) -> list[tuple[str, str, LinkProperties]]:
    variants = _VARIANT_ROWS.get(info.name)
    if variants is not None:
        rows = [(info.name, label, props) for label, props in variants()]
    else:
        module = importlib.import_module(f"{transport.__name__}.{info.module}")
        rows = [(info.name, f"`{info.prefix}`", module.PROPERTIES)]
    if info.reliable_module is not None:
        rows.append(("reliable", f"`{info.prefix}` `reliable=True`", _reliable_props(info.name)))
    return rows


def _transport_rows() -> list[tuple[str, str, LinkProperties]]:
    """(scheme, or ``reliable``; label; properties) of every scheme of the registry."""
    rows = [row for info in SCHEMES for row in _scheme_rows(info)]
    _check_transport_coverage()
    return rows


def _check_transport_coverage() -> None:
    modules = {
        m.name
        for m in pkgutil.iter_modules(transport.__path__)
        if not m.name.startswith("_") and m.name != "base"
    }
    covered = {info.module for info in SCHEMES}
    covered |= {info.reliable_module for info in SCHEMES if info.reliable_module is not None}
    if modules != covered:
        raise SectionError(
            f"transport modules {sorted(modules - covered)} have no entry in the scheme "
            f"registry (and {sorted(covered - modules)} no longer exist); "
            "add one to buzon._schemes.SCHEMES"
        )
    unknown_rows = set(_VARIANT_ROWS) - {info.name for info in SCHEMES}
    if unknown_rows:
        raise SectionError(f"docgen has rows for schemes {sorted(unknown_rows)} that do not exist")
    names = set(record_fields(LinkProperties))
    unknown = names - set(_PROPERTY_COLUMNS) - _PROPERTY_ELSEWHERE
    if unknown:
        raise SectionError(f"LinkProperties fields {sorted(unknown)} have no column in docgen")


def _channel_boundaries(props: LinkProperties) -> str:
    """What ``channel.properties.boundaries`` says for a framed channel on this transport."""
    stub_cls = type(
        "_DocTransport", (Transport,), {"message_oriented": props.boundaries == "message"}
    )
    stub = stub_cls()
    stub.properties = props
    boundaries: str = ChannelCore(stub, ChannelOptions()).properties.boundaries
    return boundaries


def _cell(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return _yes(value)
    if field == "max_message":
        return "— ²" if value is None else _size(value)
    return str(value)


def render_transports() -> str:
    rows = _transport_rows()
    header = ["transport", *_PROPERTY_COLUMNS.values()]
    header.insert(3, "boundaries (buzon channel)")
    body = []
    for _, label, props in rows:
        cells = [_cell(f, getattr(props, f)) for f in _PROPERTY_COLUMNS]
        cells.insert(2, _channel_boundaries(props))
        body.append([label, *cells])
    notes: list[str] = []
    for module, _, props in rows:
        note = f"- **{module}**: {props.notes}"
        if props.notes and note not in notes:
            notes.append(note)
    return "\n".join(
        [
            _table(header, body),
            "",
            f"¹ A queue created with `mq_maxmsg={_MQ_SIZE[0]}, mq_msgsize={_MQ_SIZE[1]}` "
            "(the Linux defaults); its max message is always the queue's real `msgsize`.",
            "",
            f"² No limit of the transport's own: the frame cap applies "
            f"(`max_frame=`, {_size(frames.DEFAULT_MAX_FRAME)} by default).",
            "",
            "Notes (`channel.properties.notes`):",
            "",
            *notes,
        ]
    )


_ADDRESS_EXAMPLES = tuple(url for info in SCHEMES for url in info.examples)


def render_addresses() -> str:
    rows = []
    for url in _ADDRESS_EXAMPLES:
        addr = parse_address(url)
        kind = scheme_info(addr.scheme).address
        if kind == "queue":
            where = f"queue `{addr.mq_name().replace(f'-{os.getuid()}-', '-UID-')}`"
            space = "buzon's names (prefix private to your uid)" if addr.private else "exactly that"
        elif kind == "inet":
            port = (
                "a free port (`listener.address` has it)" if addr.port == 0 else f"port {addr.port}"
            )
            where = f"host `{addr.host}`, {port}"
            space = "the network"
        else:
            where = f"`{addr.fs_path(runtime_dir='$RUNTIME')}`"
            space = "the private runtime dir" if addr.private else "exactly that path"
        rows.append((f"`{url}`", addr.scheme, where, space))
    return _table(("address", "scheme", "endpoint", "namespace"), rows)


_PICKLE_RULE = {
    "peer-checked": "yes (the peer is provably you)",
    "private-name": "private names only",
    "authenticated": "with an authenticated peer",
}
_CREDIT_RULE = {
    "link": "credits on the link",
    "needs-reliable": "with `reliable=True`",
    "pool": "token pools in the runtime dir",
    "pool-private-rendezvous": "token pools; `0` on private names only",
}


def _runtime_files(info: SchemeInfo) -> str:
    words = {
        "endpoint": "`NAME{suffix}`",
        "client": "`c-PID-*{suffix}` (clients)",
        "lock": "`NAME{suffix}` (lock)",
        "pool": "`NAME{suffix}.capN.*` (capacity pools)",
    }
    files = [words[f.role].format(suffix=f.suffix) for f in info.runtime_files]
    return ", ".join(files) or "—"


def render_schemes() -> str:
    """The scheme registry (``buzon._schemes.SCHEMES``) as a table."""
    rows = []
    for info in SCHEMES:
        options = [
            name
            for name, has in (
                ("`authkey=`", info.authkey),
                ("`compat=`", info.compat),
                ("`tls=`", info.tls),
                ("`reliable=True`", info.reliable_module is not None),
                ("`ring_size=`", info.ring_size),
            )
            if has
        ]
        rows.append(
            [
                f"`{info.form}`",
                info.summary,
                f"`transport/{info.module}{_module_suffix(info.module)}`",
                _yes(info.connection_oriented),
                _yes(info.handshake),
                _yes(info.servable),
                ", ".join(options) or "—",
                _PICKLE_RULE[info.pickle],
                _CREDIT_RULE[info.credits],
                _runtime_files(info),
            ]
        )
    header = (
        "scheme",
        "what",
        "module",
        "a channel per peer",
        "handshake",
        "`buzon.serve`",
        "options",
        "`pickle=True`",
        "`capacity=`",
        "runtime-dir files",
    )
    return _table(header, rows)


# ========================================================================== concepts.md


def render_errors() -> str:
    def line(cls: type[Exception], prefix: str) -> tuple[str, str]:
        builtins = [
            b.__qualname__ if b.__module__ == "builtins" else f"{b.__module__}.{b.__qualname__}"
            for b in cls.__bases__
            if not issubclass(b, _errors.BuzonError) and b is not Exception
        ]
        also = f" ({', '.join(builtins)})" if builtins else ""
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        return f"{prefix}{cls.__name__}{also}", doc

    entries: list[tuple[str, str]] = []

    def walk(cls: type[Exception], indent: str) -> None:
        subs = [c for c in cls.__subclasses__() if c.__module__ == _errors.__name__]
        for i, sub in enumerate(subs):
            last = i == len(subs) - 1
            entries.append(line(sub, indent + ("└── " if last else "├── ")))
            walk(sub, indent + ("    " if last else "│   "))

    entries.append(line(_errors.BuzonError, ""))
    walk(_errors.BuzonError, "")
    width = max(len(name) for name, _ in entries) + 2
    body = "\n".join(name.ljust(width) + doc for name, doc in entries)
    return "```text\n" + body + "\n```"


# ============================================================================== registry

Renderer = Callable[[], str]


def _render_chaos_profiles() -> str:
    from .testing import chaos

    return chaos.render_profiles()


def _render_conformance() -> str:
    from .testing import conformance

    return conformance.render_catalogue()


# -- semantics: link guarantees per mode, and the credit protocol drawn by running it


def _damage(props: LinkProperties) -> str:
    if props.local:
        return "no (kernel memory)"
    if props.reliable:
        return "checksummed, resent"
    return "checksummed, dropped"


def _capacity_cell(scheme: str, duplex: bool) -> str:
    support = capacity_support(scheme, duplex)
    marks = [f"`{mode}` " + ("✓" if why is None else "✗") for mode, why in support.items()]
    return " · ".join(marks)


def render_semantics() -> str:
    """Transport and mode → what a channel guarantees, and which capacities it takes."""
    header = [
        "transport / mode",
        "direction",
        "boundaries",
        "connection",
        "loss",
        "reorder",
        "damage",
        "capacity",
    ]
    body = []
    reasons: dict[str, str] = {}
    for module, label, props in _transport_rows():
        duplex = props.direction == "duplex"
        for raw in (False, True):
            boundaries = props.boundaries if raw else _channel_boundaries(props)
            if raw:
                cap = "default only ³"
            else:
                cap = _capacity_cell(module, duplex)
                for why in capacity_support(module, duplex).values():
                    if why is not None:
                        reasons.setdefault(module + ("" if duplex else " (simplex)"), why)
            body.append(
                [
                    f"{label}{' `raw=True`' if raw else ''}",
                    props.direction,
                    boundaries,
                    _yes(props.connection_oriented),
                    "no" if props.reliable else "yes, counted",
                    "no" if props.ordered else "yes",
                    _damage(props),
                    cap,
                ]
            )
    lines = [_table(header, body), "", "Why a capacity is refused (the error the call raises):", ""]
    lines += [f"- **{name}**: {why}" for name, why in reasons.items()]
    lines += [
        "",
        "³ `raw=True` moves bytes with no frames, so no credits: the transport's own "
        "buffer bounds a send (the default capacity).",
    ]
    return "\n".join(lines)


def _credit_text(frame: bytes) -> str:
    taken, limit = credit.decode_credit(frame[8:])
    shown = "∞" if limit == credit.UNLIMITED else str(limit)
    blocked = ", blocked" if frame[2] & credit.BLOCKED_FLAG else ""
    return f"CREDIT(taken={taken}, limit={shown}{blocked})"


def _credit_sequence(log: list[tuple[str, str]]) -> str:
    width = max(len(d) for s, d in log if s == "sender") + 4
    lines = ["sender".ljust(width + 6) + "receiver"]
    for who, desc in log:
        if who == "sender":
            lines.append(desc.ljust(width) + "──▶")
        elif who == "receiver":
            lines.append(" " * width + "◀──  " + desc)
        else:
            lines.append(" " * 2 + f"[{desc}]")
    return "\n".join(lines)


def _run_rendezvous() -> list[tuple[str, str]]:
    """Run the two capacity-0 state machines through a send, a receive and a timeout."""
    send, recv = credit.SendFlow(0), credit.RecvFlow(0)
    log: list[tuple[str, str]] = []

    def to_sender(frame: bytes | None) -> None:
        assert frame is not None
        log.append(("receiver", _credit_text(frame)))
        send.on_credit(*credit.decode_credit(frame[8:]))

    log.append(("note", f"sender: send(a) blocks, nobody waits (may send: {send.sendable()})"))
    log.append(("note", "receiver: recv() begins"))
    to_sender(recv.before_wait())
    assert send.sendable()
    number = send.on_sent()
    log.append(("sender", f"DATA #{number} a"))
    to_sender(recv.on_take(False, False))
    assert send.delivered(number)
    log.append(
        ("note", f"receiver: recv() returns a; sender: send(a) returns (taken={send.taken})")
    )
    log.append(("note", "receiver: recv(timeout=1) begins"))
    to_sender(recv.before_wait())
    log.append(("note", "receiver: ... 1 s, nothing came: Timeout"))
    to_sender(recv.on_wait_end())
    log.append(("note", f"sender: send_nowait(b) raises Full (may send: {send.sendable()})"))
    return log


def _run_receipts() -> list[tuple[str, str]]:
    """Run a default-capacity channel's flows through three send_async and their takes."""
    send, recv = credit.SendFlow(None), credit.RecvFlow(None)
    log: list[tuple[str, str]] = []
    numbers = []
    for payload in "abc":
        numbers.append(send.on_sent())
        log.append(("sender", f"DATA #{numbers[-1]} {payload} (receipt asked)"))
    log.append(("note", "receiver: one read brings all three; recv() x3"))
    for i in range(3):
        frame = recv.on_take(True, i < 2)
        if frame is not None:
            log.append(("receiver", _credit_text(frame)))
            send.on_credit(*credit.decode_credit(frame[8:]))
    done = [n for n in numbers if send.delivered(n)]
    log.append(("note", f"sender: receipts {done} done, receiver = the peer's pid"))
    return log


def render_credit_sequences() -> str:
    out = []
    for title, log in (
        ("Rendezvous (`capacity=0`)", _run_rendezvous()),
        ("Receipts (`send_async`, one acknowledgement for a batch)", _run_receipts()),
    ):
        out += [f"{title}:", "", "```text", _credit_sequence(log), "```", ""]
    return "\n".join(out[:-1])


def _render_mailbox_sequences() -> str:
    from ._docseq import DocScenarioError, render_mailbox_sequences

    try:
        return render_mailbox_sequences()
    except DocScenarioError as exc:
        raise SectionError(f"a mailbox scenario misbehaved: {exc}") from exc


def _render_rpc_sequences() -> str:
    from ._docseq import DocScenarioError, render_rpc_sequences

    try:
        return render_rpc_sequences()
    except DocScenarioError as exc:
        raise SectionError(f"an RPC scenario misbehaved: {exc}") from exc


SECTIONS: dict[str, dict[str, Renderer]] = {
    "concepts.md": {"errors": render_errors},
    "mailboxes.md": {"mailbox-sequences": _render_mailbox_sequences},
    "rpc.md": {"rpc-sequences": _render_rpc_sequences},
    "frames.md": {
        "frame-header": render_frame_header,
        "frame-kinds": render_frame_kinds,
        "codec-ids": render_codec_ids,
        "frame-examples": render_frame_examples,
        "limits": render_frame_limits,
        "handshake-sequences": render_handshake_sequences,
        "handshake-diagram": render_handshake_diagram,
        "handshake-states": render_handshake_states,
        "mp-framing": render_mp_framing,
        "mp-handshake": render_mp_handshake,
    },
    "transports.md": {
        "schemes": render_schemes,
        "transports": render_transports,
        "addresses": render_addresses,
    },
    "security.md": {"limits": render_frame_limits},
    "chaos.md": {"chaos-profiles": _render_chaos_profiles},
    "semantics.md": {
        "semantics": render_semantics,
        "credit-sequences": render_credit_sequences,
        "conformance": _render_conformance,
    },
}
"""Page file name -> section name -> renderer."""


def render_page(text: str, renderers: dict[str, Renderer], page: str = "page") -> str:
    """``text`` with every generated section replaced by a fresh rendering."""
    out: list[str] = []
    pos = 0
    seen: set[str] = set()
    open_name: str | None = None
    for m in _MARKER_RE.finditer(text):
        which, name = m.group(1), m.group(2)
        if which == "BEGIN":
            if open_name is not None:
                raise SectionError(f"{page}: section {name!r} starts inside {open_name!r}")
            if name not in renderers:
                raise SectionError(f"{page}: unknown generated section {name!r}")
            if name in seen:
                raise SectionError(f"{page}: section {name!r} appears twice")
            out.append(text[pos : m.end()])
            open_name = name
        else:
            if open_name != name:
                raise SectionError(f"{page}: END {name!r} does not close {open_name!r}")
            out.append("\n" + renderers[name]().strip("\n") + "\n")
            out.append(m.group(0))
            seen.add(name)
            open_name = None
        pos = m.end()
    if open_name is not None:
        raise SectionError(f"{page}: section {open_name!r} is never closed")
    missing = sorted(set(renderers) - seen)
    if missing:
        raise SectionError(
            f"{page}: generated sections {missing} have no markers; add "
            + ", ".join(f"{BEGIN.format(name=n)} {END.format(name=n)}" for n in missing)
        )
    out.append(text[pos:])
    return "".join(out)


def _pages(docs: str) -> Iterable[tuple[str, str, str]]:
    """(path, current text, fresh text) of every page with generated sections."""
    for page, renderers in SECTIONS.items():
        path = os.path.join(docs, page)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise SectionError(f"{path} does not exist") from None
        yield path, text, render_page(text, renderers, path)


def check(docs: str) -> list[str]:
    """Paths of the pages whose generated sections are stale."""
    return [path for path, old, new in _pages(docs) if old != new]


def write(docs: str) -> list[str]:
    """Rewrite stale pages; return the paths written."""
    written = []
    for path, old, new in list(_pages(docs)):
        if old != new:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m buzon.docgen", description="Regenerate the generated parts of the docs."
    )
    parser.add_argument("docs", help="the docs directory")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if any section is stale"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = []
            for path, old, new in _pages(args.docs):
                if old != new:
                    stale.append(path)
                    sys.stdout.writelines(
                        difflib.unified_diff(
                            old.splitlines(True), new.splitlines(True), path, path + " (generated)"
                        )
                    )
            for path in stale:
                print(f"stale: {path}", file=sys.stderr)
            if stale:
                print("run: python -m buzon.docgen " + args.docs, file=sys.stderr)
                return 1
            return 0
        for path in write(args.docs):
            print(f"wrote {path}")
    except SectionError as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
