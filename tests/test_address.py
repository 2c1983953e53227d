"""Address parsing: every scheme, good and bad, and where private names live."""

from __future__ import annotations

import os

import pytest

from buzon import _runtime
from buzon.address import Address, parse_address
from buzon.errors import AddressError

# --------------------------------------------------------------------------- good ones


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("fifo:calc", Address("fifo", name="calc")),
        ("fifo:/run/x/calc.fifo", Address("fifo", path="/run/x/calc.fifo")),
        ("unix:calc", Address("unix", name="calc")),
        ("unix:/tmp/s", Address("unix", path="/tmp/s")),
        ("unixgram:log-1", Address("unixgram", name="log-1")),
        ("unixgram:/tmp/g.sock", Address("unixgram", path="/tmp/g.sock")),
        ("mq:jobs", Address("mq", name="jobs")),
        ("mq:/jobs", Address("mq", path="/jobs")),
        ("mq:/with space.and-more", Address("mq", path="/with space.and-more")),
        ("tcp://127.0.0.1:7000", Address("tcp", host="127.0.0.1", port=7000)),
        ("tcp://localhost:0", Address("tcp", host="localhost", port=0)),
        ("tcp://example.org:65535", Address("tcp", host="example.org", port=65535)),
        ("udp://10.0.0.1:53", Address("udp", host="10.0.0.1", port=53)),
        ("tcp://[::1]:7000", Address("tcp", host="::1", port=7000)),
        ("udp://[::]:0", Address("udp", host="::", port=0)),
        ("tcp://[fe80::1%eth0]:9", Address("tcp", host="fe80::1%eth0", port=9)),
        ("tcp://[2001:db8::ff00:42:8329]:1", Address("tcp", host="2001:db8::ff00:42:8329", port=1)),
        ("unix:A_z-0.9", Address("unix", name="A_z-0.9")),
        ("unix:" + "n" * 64, Address("unix", name="n" * 64)),
        ("unix:_hidden_is_fine", Address("unix", name="_hidden_is_fine")),
    ],
)
def test_good_addresses_parse_and_round_trip(url: str, expected: Address) -> None:
    addr = parse_address(url)
    assert addr == expected
    assert str(addr) == url
    assert parse_address(str(addr)) == addr
    assert parse_address(addr) is addr  # an Address passes through


def test_private_versus_absolute() -> None:
    assert parse_address("unix:calc").private
    assert not parse_address("unix:/tmp/calc").private
    assert parse_address("mq:jobs").private
    assert not parse_address("mq:/jobs").private
    assert not parse_address("tcp://127.0.0.1:1").private


def test_is_inet() -> None:
    assert parse_address("tcp://h:1").is_inet
    assert parse_address("udp://h:1").is_inet
    assert not parse_address("unix:h").is_inet
    assert not parse_address("mq:h").is_inet


def test_port_zero_and_with_port() -> None:
    addr = parse_address("tcp://[::1]:0")
    assert addr.port == 0
    real = addr.with_port(40123)
    assert real == Address("tcp", host="::1", port=40123)
    assert str(real) == "tcp://[::1]:40123"


# ---------------------------------------------------------------------------- bad ones


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("calc", "has no scheme"),
        ("", "has no scheme"),
        ("http://x:1", "unknown scheme 'http'"),
        ("pipe:", "unknown scheme"),
        ("UNIX:calc", "unknown scheme"),
        ("unix:", "a name is 1-64 characters"),
        ("unix:.hidden", "not starting with '.'"),
        ("unix:" + "n" * 65, "a name is 1-64 characters"),
        ("unix:a/b", "use an absolute path"),
        ("unix:a b", "a name is"),
        ("unix:café", "a name is"),
        ("unix:calc\n", "a name is"),
        ("fifo:calc\n", "a name is"),
        ("mq:calc\n", "a name is"),
        ("unix://calc", "not unix://"),
        ("fifo://x", "not fifo://"),
        ("unix:/a/../b", "normalised"),
        ("unix:/a//b", "normalised"),
        ("unix:/a/./b", "normalised"),
        ("unix:/a/", "normalised"),
        ("fifo:/", "normalised"),
        ("unix:/" + "p" * 107, "at most 107 bytes"),
        ("unixgram:/" + "p" * 107, "at most 107 bytes"),
        ("mq:/", "POSIX queue name"),
        ("mq:/a/b", "POSIX queue name"),
        ("mq:/" + "q" * 251, "POSIX queue name"),
        ("mq:", "a name is"),
        ("tcp:127.0.0.1:80", "write tcp://HOST:PORT"),
        ("tcp://127.0.0.1", "the port is required"),
        ("tcp://:80", "the port is required"),
        ("tcp://127.0.0.1:", "the port must be a number"),
        ("tcp://h:65536", "from 0 to 65535"),
        ("tcp://h:-1", "the port must be a number"),
        ("tcp://h:+1", "the port must be a number"),
        ("tcp://h: 1", "the port must be a number"),
        ("tcp://h:http", "the port must be a number"),
        ("tcp://h:\u0661\u0662", "the port must be a number"),  # Arabic-Indic digits
        ("tcp://::1:80", "in brackets"),
        ("tcp://[::1]80", "written \\[ADDR\\]:PORT"),
        ("tcp://[::1", "written \\[ADDR\\]:PORT"),
        ("tcp://[nope]:1", "is not an IPv6 address"),
        ("tcp://[127.0.0.1]:1", "is not an IPv6 address"),
        ("tcp://bad_host:1", "not a host name"),
        ("tcp://host\n:1", "not a host name"),
        ("udp://h@x:1", "not a host name"),
        ("unix:ca\x00lc", "NUL"),
        ("fifo:/tmp/a\x00b", "NUL"),
    ],
)
def test_bad_addresses_are_clear_address_errors(url: str, match: str) -> None:
    with pytest.raises(AddressError, match=match):
        parse_address(url)


@pytest.mark.parametrize("value", [None, 7, b"unix:calc", ["unix:calc"]])
def test_not_a_string(value: object) -> None:
    with pytest.raises(AddressError, match="an address is a string"):
        parse_address(value)  # type: ignore[arg-type]


def test_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_address("nonsense")


def test_fifo_paths_have_no_socket_length_limit() -> None:
    long = "/" + "p" * 200
    assert parse_address("fifo:" + long).path == long


# ------------------------------------------------------------------ file-system paths


def test_private_names_live_in_the_runtime_dir(runtime_dir: str) -> None:
    assert parse_address("unix:calc").fs_path() == os.path.join(runtime_dir, "calc.sock")
    assert parse_address("fifo:calc").fs_path() == os.path.join(runtime_dir, "calc.fifo")
    assert parse_address("unixgram:calc").fs_path() == os.path.join(runtime_dir, "calc.dgram")
    assert _runtime.runtime_dir() == runtime_dir


def test_fs_path_with_an_explicit_runtime_dir() -> None:
    assert parse_address("unix:calc").fs_path("/some/dir") == "/some/dir/calc.sock"


def test_absolute_paths_are_used_as_given() -> None:
    assert parse_address("unix:/srv/app.sock").fs_path() == "/srv/app.sock"
    assert parse_address("fifo:/srv/in").fs_path("/elsewhere") == "/srv/in"


def test_socket_path_too_long_for_sun_path() -> None:
    deep = "/" + "d" * 90
    addr = parse_address("unix:" + "n" * 20)
    with pytest.raises(AddressError, match=r"exceeds 107 bytes.*BUZON_RUNTIME_DIR"):
        addr.fs_path(deep)
    with pytest.raises(AddressError, match="exceeds 107 bytes"):
        parse_address("unixgram:" + "n" * 20).fs_path(deep)
    # exactly at the limit is fine; FIFOs have no such limit
    fits = "/" + "d" * (107 - len("/" + "n" * 20 + ".sock") - 1)
    assert len(os.fsencode(addr.fs_path(fits))) == 107
    assert parse_address("fifo:" + "n" * 20).fs_path(deep).endswith(".fifo")


@pytest.mark.parametrize("url", ["mq:jobs", "tcp://h:1", "udp://h:1"])
def test_no_fs_path_for_other_schemes(url: str) -> None:
    with pytest.raises(AddressError, match="has no file-system path"):
        parse_address(url).fs_path()


def test_mq_names() -> None:
    assert parse_address("mq:jobs").mq_name() == f"/buzon-{os.getuid()}-jobs"
    assert parse_address("mq:/jobs").mq_name() == "/jobs"
    with pytest.raises(AddressError, match="not a message queue address"):
        parse_address("unix:jobs").mq_name()


def test_parsing_touches_nothing(runtime_dir: str) -> None:
    os.rmdir(runtime_dir)  # parsing must not need (or create) the runtime dir
    for url in ("unix:a", "fifo:b", "unixgram:c", "mq:d", "tcp://h:1"):
        parse_address(url)
    assert not os.path.exists(runtime_dir)
