"""The scheme registry is the one list of schemes: every layer derives from it.

Adding a scheme is one transport module plus one registry entry. These tests walk the
places that tell schemes apart and check that none keeps a list of its own (a
collection of scheme names, or a comparison of an address's scheme with a name), and
that each place that names schemes to the user names exactly the registry's.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

import buzon
from buzon import _forensics, _schemes, cli, docgen
from buzon._schemes import SCHEMES, scheme_info, url_schemes
from buzon.testing import conformance
from buzon.transport.base import LinkProperties

SRC = pathlib.Path(buzon.__file__).parent
NAMES = {info.name for info in SCHEMES}

# Modules that may name several schemes, and why (everything else derives its lists):
ALLOWED_FILES = {
    "_schemes.py": "the registry itself",
    "demo.py": "a tour with one hand-written demo per transport",
    "bench": "benchmark cases, chosen per transport",
    "testing/chaos/relay.py": "the relay implements exactly these stream and datagram kinds",
    "transport": "a transport module knows its own scheme and the ones it shares code with",
}
# Assignments that may name several schemes, and why:
ALLOWED_NAMES = {
    ("docgen.py", "_VARIANT_ROWS"): "doc rows of schemes whose links differ by option; "
    "every other scheme gets its row from the registry",
}


def _allowed(rel: str) -> bool:
    return any(rel == key or rel.startswith(key + "/") for key in ALLOWED_FILES)


def _sources() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if not _allowed(rel):
            out.append((rel, ast.parse(path.read_text(encoding="utf-8"), rel)))
    return out


def _scheme_strings(node: ast.AST) -> set[str]:
    """The scheme names a collection literal lists: as elements, as dict keys, or as
    the first item of its rows (``[("fifo", ...), ("unix", ...)]``)."""
    elts: list[ast.expr | None] = []
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        elts = list(node.elts)
    elif isinstance(node, ast.Dict):
        elts = list(node.keys)
    elts += [e.elts[0] for e in list(elts) if isinstance(e, ast.Tuple | ast.List) and e.elts]
    return {e.value for e in elts if isinstance(e, ast.Constant) and e.value in NAMES}


def _skipped_nodes(rel: str, tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if any((rel, n) in ALLOWED_NAMES for n in names):
                skipped.update(id(sub) for sub in ast.walk(node))
    return skipped


def test_no_module_keeps_a_list_of_schemes() -> None:
    found = []
    for rel, tree in _sources():
        skipped = _skipped_nodes(rel, tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names = _scheme_strings(node)
            if len(names) >= 2:
                found.append(f"{rel}:{getattr(node, 'lineno', '?')}: {sorted(names)}")
    assert not found, "scheme lists outside the registry:\n" + "\n".join(found)


def _is_scheme(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "scheme") or (
        isinstance(node, ast.Name) and node.id == "scheme"
    )


def test_no_layer_special_cases_a_scheme_by_name() -> None:
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if not any(_is_scheme(s) for s in sides):
                continue
            named = {s.value for s in sides if isinstance(s, ast.Constant) and s.value in NAMES}
            for s in sides:
                named |= _scheme_strings(s)
            if named:
                found.append(f"{rel}:{node.lineno}: scheme compared with {sorted(named)}")
    assert not found, "decide by a registry field, not by name:\n" + "\n".join(found)


def test_the_walk_finds_what_it_looks_for() -> None:
    """The scans above can fail: a planted list and a planted comparison are found."""
    tree = ast.parse(
        'K = ("unix", "tcp")\nR = [("fifo", 1), ("mq", 2)]\nif addr.scheme == "fifo": pass\n'
    )
    assert sum(len(_scheme_strings(n)) == 2 for n in ast.walk(tree)) == 2
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert compares and _is_scheme(compares[0].left)


# -- each entry is whole, and agrees with its module ------------------------------------


@pytest.mark.parametrize("info", SCHEMES, ids=lambda i: i.name)
def test_each_entry_agrees_with_its_module(info: _schemes.SchemeInfo) -> None:
    module = importlib.import_module(f"buzon.transport.{info.module}")
    if info.has_url:
        assert callable(module.listen) and callable(module.connect)
        assert info.examples and all(
            buzon.parse_address(url).scheme == info.name for url in info.examples
        )
    assert info.conformance, "every scheme runs the conformance suite"
    props = getattr(module, "PROPERTIES", None)
    if isinstance(props, LinkProperties):
        assert props.transport == info.name
        assert props.connection_oriented == info.connection_oriented
        assert (props.boundaries == "message") == info.message_boundaries
    if info.address == "local":
        assert info.suffix and any(
            f.role == "endpoint" and f.suffix == info.suffix for f in info.runtime_files
        )
    if info.servable or info.handshake:
        assert info.connection_oriented
    if info.reliable_module is not None:
        importlib.import_module(f"buzon.transport.{info.reliable_module}")


def test_scheme_names_are_unique_and_lookup_fails_clearly() -> None:
    assert len(NAMES) == len(SCHEMES)
    assert scheme_info("seqpacket").module == "seqpacket"
    with pytest.raises(KeyError):
        scheme_info("nope")


# -- every place that names schemes names the registry's --------------------------------


def test_address_errors_name_every_scheme() -> None:
    """At 135cb2d the list left out shm:."""
    for url in ("calc", "http://x:1"):
        with pytest.raises(buzon.AddressError) as err:
            buzon.parse_address(url)
        for info in url_schemes():
            assert info.prefix in str(err.value)


def test_cli_hint_names_every_scheme() -> None:
    for info in url_schemes():
        assert info.form in cli._ADDRESS_HINT


@pytest.mark.parametrize("driver", ["sync", "asyncio"])
def test_servers_take_exactly_the_servable_schemes(driver: str) -> None:
    from buzon import aio, sync

    server = sync.Server if driver == "sync" else aio.Server
    with pytest.raises(buzon.UnsupportedOperation) as err:
        server("udp://127.0.0.1:0", lambda ch: None)  # type: ignore[arg-type]
    for info in url_schemes():
        assert (info.prefix in str(err.value)) == info.servable


def test_conformance_runs_every_scheme() -> None:
    for info in SCHEMES:
        assert set(info.conformance) <= set(conformance.TRANSPORTS)
        assert set(info.capacity_conformance) <= set(conformance.CAPACITY_TRANSPORTS)
    assert len(conformance.TRANSPORTS) == sum(len(i.conformance) for i in SCHEMES)


def test_docs_tables_cover_every_scheme() -> None:
    rows = docgen._transport_rows()
    assert {name for name, _, _ in rows} - {"reliable"} == NAMES
    assert {buzon.parse_address(url).scheme for url in docgen._ADDRESS_EXAMPLES} == {
        i.name for i in url_schemes()
    }
    table = docgen.render_schemes()
    for info in SCHEMES:
        assert f"`{info.form}`" in table


def test_forensics_recognises_every_declared_endpoint(tmp_path: pathlib.Path) -> None:
    """A file of each declared endpoint kind, made and abandoned, is recognised by its
    scheme and judged dead (a socket nobody is bound to, a FIFO nobody reads)."""
    rdir = tmp_path / "rt"
    rdir.mkdir(mode=0o700)
    expected = {}
    types = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM}
    types["seqpacket"] = socket.SOCK_SEQPACKET
    for info in SCHEMES:
        for f in info.runtime_files:
            if f.role != "endpoint":
                continue
            path = rdir / f"old-{info.name}{f.suffix}"
            if f.file_type == "fifo":
                os.mkfifo(path, 0o600)
            else:
                assert f.socket_type is not None
                with socket.socket(socket.AF_UNIX, types[f.socket_type]) as s:
                    s.bind(str(path))
            expected[f"old-{info.name}{f.suffix}"] = f"{info.name}:old-{info.name}"
    entries = {e.name: e for e in _forensics.scan(str(rdir))}
    for name, address in expected.items():
        entry = entries[name]
        assert entry.address == address
        assert entry.live is False
        assert entry.removable(entry.st.st_mtime + 60) is not None
    removed = _forensics.clean(str(rdir), now=max(e.st.st_mtime for e in entries.values()) + 60)
    assert {pathlib.Path(r.path).name for r in removed} >= set(expected)
    assert not list(rdir.iterdir())


def test_a_scheme_is_one_module_and_one_entry() -> None:
    """Every transport module (but the shared helpers) is some entry's module."""
    transport = SRC / "transport"
    modules = {
        p.stem for p in transport.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"
    } | {p.parent.name for p in transport.glob("*/__init__.py")}
    named = {i.module for i in SCHEMES} | {i.reliable_module for i in SCHEMES if i.reliable_module}
    assert modules == named


# -- the CLI decides by the registry too -------------------------------------------------


def _buzon(runtime_dir: str, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, BUZON_RUNTIME_DIR=runtime_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC.parent), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "buzon", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[call-overload]
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "info",
    [i for i in SCHEMES if i.connection_oriented and i.address == "local"],
    ids=lambda i: i.name,
)
def test_cli_listen_serves_every_peer_of_a_connection_oriented_scheme(
    info: _schemes.SchemeInfo, runtime_dir: str
) -> None:
    """At 135cb2d ``buzon listen shm:NAME`` gave up at once ("no peer arrived"): the CLI
    knew only unix and tcp as connection-oriented."""
    url = f"{info.name}:many"
    server = _buzon(runtime_dir, "listen", url, "-q")
    try:
        path = os.path.join(runtime_dir, f"many{info.suffix}")
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the listener never came up"
            time.sleep(0.02)
        for word in ("one", "two"):
            sender = _buzon(runtime_dir, "send", url, f'"{word}"')
            assert sender.wait(20) == 0, sender.communicate()
            assert sender.stdout is not None and sender.stderr is not None
            sender.stdout.close()
            sender.stderr.close()
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert out.decode().splitlines() == ['"one"', '"two"'], err
