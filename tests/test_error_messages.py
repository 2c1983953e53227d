"""Errors a new user meets say what went wrong and what to do about it (issue 9, item 6).

Each message names the knob that fixes it: the frame cap and ``max_frame=``, both ends'
capacities and which end is which, and the codecs that can carry an object msgpack
cannot (``codec="pickle"`` with ``pickle=True``, a ``msgspec.Struct`` or a dataclass).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import msgspec
import pytest

import buzon


class Point:  # a plain class: not msgpack data
    def __init__(self) -> None:
        self.x = 1


@dataclasses.dataclass
class DataPoint:
    x: int


class StructPoint(msgspec.Struct):
    x: int


def module_level_function() -> int:
    return 1


# -- the frame cap ----------------------------------------------------------------------


def test_a_message_over_the_default_cap_names_the_cap_and_max_frame() -> None:
    a, b = buzon.pipe()
    with a, b:
        big = bytes(65 * 2**20)  # just over the 64 MiB default: zero pages, cheap
        with pytest.raises(buzon.MessageTooLarge) as info:
            a.send_bytes(big)
        text = str(info.value)
        assert "67108864" in text and "64 MiB" in text
        assert "max_frame=" in text and "both ends" in text
        with pytest.raises(buzon.MessageTooLarge, match="max_frame="):
            a.send({"p": big})
        a.send("still usable")  # nothing of the refused message went out
        assert b.recv(timeout=5) == "still usable"


def test_a_raised_max_frame_is_the_cap_the_message_names() -> None:
    a, b = buzon.pipe(max_frame=4096)
    cap = r"cap of 4096 bytes \(4 KiB\).*max_frame="
    with a, b, pytest.raises(buzon.MessageTooLarge, match=cap):
        a.send(b"x" * 10_000)


def test_the_multiprocessing_compat_cap_names_max_frame_too() -> None:
    from buzon.protocol import mpcompat

    with pytest.raises(buzon.MessageTooLarge, match=r"cap of 4096 bytes \(4 KiB\).*max_frame="):
        mpcompat.encode_message(b"x" * 5000, max_message=4096)


# -- capacity mismatch ------------------------------------------------------------------


def _refused_both_ways(url: str, server: int | None, client: int | None) -> tuple[str, str]:
    """(the connector's error, the listener's error) for a capacity mismatch."""
    with buzon.listen(url, capacity=server) as lst:
        box: list[BaseException] = []

        def accept() -> None:
            try:
                lst.accept(timeout=0.5).close()
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=accept)
        t.start()
        try:
            with pytest.raises(buzon.HandshakeError) as info:
                buzon.connect(str(lst.address), timeout=5, capacity=client)
        finally:
            t.join(10)
    # the listener refused the peer and went on waiting: its accept ran out of time, and
    # the refusal is what the connector reports
    assert box and isinstance(box[0], buzon.Timeout)
    return str(info.value), ""


@pytest.mark.parametrize("url", ["unix:capname", "tcp://127.0.0.1:0"])
def test_a_capacity_mismatch_names_both_ends_and_which_is_which(url: str) -> None:
    text, _ = _refused_both_ways(url, server=2, client=8)
    assert "capacity mismatch" in text
    # the listener refuses the client with this text: each end is named by its role
    assert "the connecting client has capacity=8, the listener has capacity=2" in text, text


def test_the_handshake_names_the_listener_side_too() -> None:
    from buzon.protocol.handshake import agreed_capacity

    with pytest.raises(buzon.HandshakeError) as info:
        agreed_capacity({"capacity": None}, {"capacity": 0}, role="server")
    text = str(info.value)
    assert "the connecting client has capacity=0, the listener has capacity=None" in text
    with pytest.raises(buzon.HandshakeError) as info:
        agreed_capacity({"capacity": 3}, {"capacity": 1}, role="client")
    assert "the connecting client has capacity=3, the listener has capacity=1" in str(info.value)


@pytest.mark.parametrize("scheme", ["fifo", "mq"])
def test_a_simplex_capacity_mismatch_names_the_connecting_end(scheme: str) -> None:
    with (
        buzon.listen(f"{scheme}:capname", capacity=0) as lst,
        pytest.raises(buzon.HandshakeError) as info,
    ):
        buzon.connect(str(lst.address), timeout=5, capacity=3)
    text = str(info.value)
    assert "this end (the connecting sender) has capacity=3" in text, text
    assert "capacity=0" in text, text


# -- objects msgpack cannot carry -------------------------------------------------------


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_a_plain_object_points_to_the_codecs_that_carry_it(codec: str) -> None:
    a, b = buzon.pipe(codec=codec)
    with a, b:
        with pytest.raises(buzon.CodecError) as info:
            a.send(Point())
        text = str(info.value)
        assert "Point" in text
        assert "msgspec.Struct" in text and "dataclass" in text
        assert "codec='pickle'" in text and "pickle=True" in text
        a.send(DataPoint(1))  # the hinted alternatives do work
        a.send(StructPoint(2))
        assert b.recv(timeout=5) == {"x": 1}
        assert b.recv(timeout=5) == {"x": 2}


def test_a_function_gets_a_hint_that_says_what_pickle_can_and_cannot_do() -> None:
    a, b = buzon.pipe()
    with a, b:
        with pytest.raises(buzon.CodecError) as info:
            a.send(lambda: 1)
        text = str(info.value)
        assert "codec='pickle'" in text and "pickle=True" in text
        assert "lambda" in text  # pickle sends module-level functions, not lambdas


def test_pickle_does_carry_what_the_hint_says() -> None:
    a, b = buzon.pipe(codec="pickle", pickle=True)
    with a, b:
        a.send(Point())
        a.send(module_level_function)
        assert b.recv(timeout=5).x == 1
        assert b.recv(timeout=5) is module_level_function


# -- pipe(pickle=True) --------------------------------------------------------------------


@pytest.mark.parametrize("duplex", [True, False])
def test_pipe_with_pickle_true_sends_pickle(duplex: bool) -> None:
    # both ends of a pipe belong to this program: pickle=True alone means "send pickle"
    r, w = buzon.pipe(duplex, pickle=True)
    with r, w:
        w.send(Point())  # msgpack could not carry it
        got = r.recv(timeout=5)
        assert isinstance(got, Point) and got.x == 1


def test_pipe_with_an_explicit_codec_keeps_it() -> None:
    a, b = buzon.pipe(codec="msgpack", pickle=True)  # msgpack out, pickle accepted in
    with a, b, pytest.raises(buzon.CodecError):
        a.send(Point())


async def _aio_pipe_round_trip() -> Any:
    a, b = buzon.aio.pipe(pickle=True)
    async with a, b:
        await a.send(Point())
        return await b.recv(timeout=5)


def test_aio_pipe_with_pickle_true_sends_pickle() -> None:
    import asyncio

    assert isinstance(asyncio.run(_aio_pipe_round_trip()), Point)
