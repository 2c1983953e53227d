"""Small value classes without the import cost of :mod:`dataclasses`.

``import buzon`` made eleven dataclasses, and :mod:`dataclasses` imports
:mod:`inspect` (with ``ast``, ``dis``, ``tokenize``) and generates each class's
methods with ``exec``: about half the time of ``import buzon``. A :class:`Record`
subclass is declared like a dataclass (typed fields, defaults, ``field(
default_factory=...)``; ``frozen=True`` as a class keyword) and gets what buzon's value
classes used of a dataclass: ``__init__`` (positional or keyword), ``__repr__`` (the
dataclass form, unless the class writes its own), ``__eq__`` (same class, same
fields), ``__hash__`` when frozen, and :func:`replace` / :func:`fields`. Type
checkers read it as a dataclass (:func:`typing.dataclass_transform`).

The methods are written once here, not generated per class. A record has
``__slots__`` (its fields), as ``@dataclass(slots=True)`` gives: the C parts read and
set some records' fields through them. Frozen records refuse attribute assignment and
deletion (:class:`FrozenError`, an ``AttributeError``); pickle and copy go past that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform

__all__ = ["FrozenError", "Record", "field", "fields", "replace"]

R = TypeVar("R", bound="Record")


class FrozenError(AttributeError):
    """An assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A field whose default is made anew for each instance (``default_factory()``)."""
    return _Factory(default_factory)


@dataclass_transform(field_specifiers=(field,))
class _RecordType(type):
    """Makes each record class: its fields (the annotations, in order, bases first),
    their defaults taken out of the class body, and ``__slots__`` for its own fields
    (the C parts set some records' fields through their slots)."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], *, frozen: bool = False
    ) -> _RecordType:
        names: list[str] = []
        defaults: dict[str, Any] = {}
        factories: dict[str, Callable[[], Any]] = {}
        frozen_base = False
        for base in bases:
            if isinstance(base, _RecordType):
                names += [n for n in base._fields if n not in names]  # type: ignore[attr-defined]
                defaults.update(base._defaults)  # type: ignore[attr-defined]
                factories.update(base._factories)  # type: ignore[attr-defined]
                frozen_base = frozen_base or base._frozen  # type: ignore[attr-defined]
        own: list[str] = []
        for field_name, hint in ns.get("__annotations__", {}).items():
            if "ClassVar" in str(hint):
                continue
            if field_name not in names:
                names.append(field_name)
                own.append(field_name)
            if field_name in ns:
                value = ns.pop(field_name)
                if isinstance(value, _Factory):
                    factories[field_name] = value.make
                    defaults.pop(field_name, None)
                else:
                    defaults[field_name] = value
                    factories.pop(field_name, None)
        required = [n for n in names if n not in defaults and n not in factories]
        if any(names.index(r) > names.index(d) for r in required for d in defaults):
            raise TypeError(f"{name}: a field without a default follows one with")
        ns["__slots__"] = tuple(own)
        ns["_fields"] = tuple(names)
        ns["_defaults"] = defaults
        ns["_factories"] = factories
        ns["_frozen"] = frozen = frozen or frozen_base
        if bases:  # (not Record itself)
            ns.setdefault("__init__", _make_init(name, names, defaults, factories, frozen))
            if frozen:
                ns.setdefault("__hash__", Record._hash)
                ns.setdefault("__setattr__", Record._refuse_set)
                ns.setdefault("__delattr__", Record._refuse_del)
            elif "__eq__" not in ns:
                ns["__hash__"] = None  # (as a dataclass: eq and not frozen, unhashable)
        return super().__new__(mcls, name, bases, ns)


class Record(metaclass=_RecordType):
    """Base of a value class (see the module docstring)."""

    _fields: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[dict[str, Any]]
    _factories: ClassVar[dict[str, Callable[[], Any]]]
    _frozen: ClassVar[bool]

    def _refuse_set(self, name: str, value: Any) -> None:
        raise FrozenError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def _refuse_del(self, name: str) -> None:
        raise FrozenError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__qualname__}({body})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._fields)

    def _hash(self) -> int:
        return hash(self._values())

    # pickle and copy: a frozen record's fields are set past its __setattr__
    def __getstate__(self) -> tuple[Any, ...]:
        return self._values()

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self._fields, state, strict=True):
            _set(self, name, value)


_set = object.__setattr__
_MISSING = object()


def _make_init(
    cls: str,
    names: list[str],
    defaults: dict[str, Any],
    factories: dict[str, Callable[[], Any]],
    frozen: bool,
) -> Callable[..., None]:
    """A record's ``__init__``, written for its fields (as a dataclass's is: a generic
    one costs ten times more per instance, and some records are made per message)."""
    env: dict[str, Any] = {"_set": _set, "_MISSING": _MISSING}
    params, body = ["self"], []
    for i, name in enumerate(names):
        if name in defaults:
            env[f"_d{i}"] = defaults[name]
            params.append(f"{name}=_d{i}")
        elif name in factories:
            env[f"_f{i}"] = factories[name]
            params.append(f"{name}=_MISSING")
            body.append(f" if {name} is _MISSING: {name} = _f{i}()")
        else:
            params.append(name)
        body.append(f" _set(self, {name!r}, {name})" if frozen else f" self.{name} = {name}")
    src = f"def __init__({', '.join(params)}):\n" + "\n".join(body or [" pass"])
    exec(src, env)  # (field names are the class's own annotations: identifiers)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls}.__init__"
    return init


def replace(obj: R, /, **changes: Any) -> R:
    """A copy of record ``obj`` with ``changes`` (as :func:`dataclasses.replace`)."""
    values = {n: getattr(obj, n) for n in obj._fields}
    values.update(changes)
    return type(obj)(**values)


def fields(cls: type[Record] | Record) -> tuple[str, ...]:
    """The field names of a record class (or of a record), in order."""
    return cls._fields
