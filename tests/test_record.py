"""``buzon._record.Record``: the value classes' base, what a dataclass gave them."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from buzon._record import FrozenError, Record, field, fields, replace


class Point(Record, frozen=True):
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


class Counter(Record):
    n: int = 0
    name: str = "c"


class Point3(Point):
    z: int = 0


def test_init_takes_positional_and_keyword_values_and_fills_defaults() -> None:
    assert Point(1) == Point(1, 0, [])
    assert Point(1, y=2).y == 2
    a, b = Point(1), Point(1)
    assert a.tags == [] and a.tags is not b.tags  # a factory: one list each
    with pytest.raises(TypeError, match="'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword argument 'w'"):
        Point(1, w=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional arguments"):
        Point(1, 2, [], 4)  # type: ignore[call-arg]
    assert Point.__init__.__qualname__ == "Point.__init__"


def test_frozen_refuses_assignment_hashes_and_compares_by_value() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y  # type: ignore[misc]
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(2, 1)
    assert Point(1, 2) != Point3(1, 2)  # another class is never equal
    assert len({Point(1, 2, ()), Point(1, 2, ())}) == 1  # type: ignore[arg-type]
    assert repr(p) == "Point(x=1, y=2, tags=[])"


def test_a_mutable_record_is_unhashable_and_assignable() -> None:
    c = Counter()
    c.n += 1
    assert c == Counter(1)
    with pytest.raises(TypeError):
        hash(c)


def test_slots_fields_replace_and_inheritance() -> None:
    c = Counter()
    with pytest.raises(AttributeError):
        c.other = 1  # type: ignore[attr-defined]
    assert not hasattr(c, "__dict__")
    assert fields(Point3) == ("x", "y", "tags", "z")
    assert Point3(1, z=3) == Point3(1, 0, [], 3)
    p = Point3(1, 2, ["a"], 3)
    q = replace(p, y=5)
    assert q == Point3(1, 5, ["a"], 3) and p.y == 2
    with pytest.raises(TypeError):
        replace(p, w=1)


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="without a default follows"):

        class Bad(Record):
            a: int = 0
            b: int


@pytest.mark.parametrize("value", [Point(1, 2, ["t"]), Counter(3, "x"), Point3(1, 2, [], 3)])
def test_pickle_and_copy_give_an_equal_record(value: Any) -> None:
    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.copy(value) == value and copy.deepcopy(value) == value


def test_buzon_value_classes_are_records() -> None:
    import buzon
    from buzon._channel import ChannelOptions
    from buzon.address import parse_address

    addr = parse_address("unix:demo")
    assert pickle.loads(pickle.dumps(addr)) == addr and hash(addr) == hash(
        parse_address("unix:demo")
    )
    opts = ChannelOptions()
    assert replace(opts, capacity=3).capacity == 3
    stats = buzon.Statistics()
    assert "messages_sent" in fields(stats) and stats.messages_sent == 0


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_a_record_travels_as_a_map_of_its_fields_as_a_dataclass_did(codec: str) -> None:
    import buzon

    a, b = buzon.pipe(codec=codec)  # type: ignore[arg-type]
    try:
        a.send({"peer": buzon.PeerInfo(pid=7, uid=0)})
        assert b.recv(timeout=5) == {
            "peer": {"pid": 7, "uid": 0, "gid": None, "address": None, "extra": {}}
        }
    finally:
        a.close()
        b.close()
