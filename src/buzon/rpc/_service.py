"""Services: the allowlist of callable methods, with their type hints as the schema.

A :class:`Service` is a table ``name -> method``. A client can reach only what is in
the table: a request names a method by a plain string that is looked up in that dict,
never with ``getattr`` on an object, so ``__class__``, ``_private`` or dotted chains
cannot reach anything (they are refused before any code of the service runs).

Arguments are checked against the method's type hints with msgspec (``convert``, strict:
``"1"`` is not an ``int``), the result against its return hint; parameters without hints
accept anything the codec carries.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgspec

from ..errors import RemoteError

__all__ = ["Method", "Service", "as_service", "expose", "handler_failure"]

F = TypeVar("F", bound=Callable[..., Any])

_EXPOSED = "__buzon_rpc_expose__"
_REMOTE = "__buzon_rpc_remote__"  # set by @buzon.rpc.remote on a class


def _schema(hint: Any) -> Any:
    """The hint to validate with: a remote class or a Protocol (a proxy's type) is
    not a msgspec schema, so anything passes (the reference layer resolved it)."""
    if isinstance(hint, type) and (
        getattr(hint, _REMOTE, False) is True or getattr(hint, "_is_protocol", False)
    ):
        return Any
    return hint


@overload
def expose(fn: F) -> F: ...
@overload
def expose(*, name: str) -> Callable[[F], F]: ...


def expose(fn: Any = None, *, name: str | None = None) -> Any:
    """Mark a method of a class as callable by RPC clients (``@buzon.rpc.expose``).

    Only marked methods of an object served with ``buzon.rpc.serve(url, obj)`` are
    reachable; ``name=`` publishes it under another name. Names starting with ``_``
    are refused.
    """

    def mark(f: F) -> F:
        setattr(f, _EXPOSED, name or f.__name__)
        return f

    return mark if fn is None else mark(fn)


def handler_failure(name: str, exc: Exception) -> RemoteError:
    """The error reply for a handler that raised ``exc``: its type and message, never
    its traceback (SERVER_ERROR, ``data`` ``{"type": ...}``)."""
    return RemoteError(
        f"{name} raised {type(exc).__name__}: {exc}",
        RemoteError.SERVER_ERROR,
        {"type": type(exc).__name__},
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
        raise ValueError(
            f"RPC method name {name!r}: a non-empty name without '.' that does not start with '_'"
        )


_SCALARS = frozenset({int, float, str, bytes, bool})  # hints a result may match exactly


class Method:
    """One callable entry of a :class:`Service`: the function and its schema."""

    __slots__ = ("fn", "kinds", "name", "nparams", "params", "result", "signature", "tuple_type")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        _check_name(name)
        self.name = name
        self.fn = fn
        self.signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception as exc:  # an annotation that does not resolve
            raise TypeError(f"RPC method {name!r}: its type hints do not resolve: {exc}") from exc
        self.params: dict[str, Any] = {}
        simple = True
        for p in self.signature.parameters.values():
            self.params[p.name] = _schema(hints.get(p.name, Any))
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or (
                p.default is not p.empty
            ):
                simple = False
        self.kinds = {p.name: p.kind for p in self.signature.parameters.values()}
        self.nparams = len(self.params) if simple else -1
        # all-positional, no defaults: one convert of the whole argument list
        self.tuple_type: Any = (
            tuple[tuple(self.params.values())] if simple and self.params else None  # type: ignore[misc]
        )
        self.result: Any = _schema(hints.get("return", Any))
        if self.result is type(None):
            self.result = None

    def run(self, args: list[Any], kwargs: dict[str, Any] | None) -> Any:
        """Validate, call, and check the result against its hint."""
        if not kwargs and len(args) == self.nparams:  # the common case: one convert
            result = self.fn(*self._positional(args))
            hint = self.result
            if hint is Any or (type(result) is hint and hint in _SCALARS):
                return result  # check_result's first look, inline (once per call)
            return self.check_result(result)
        bound = self._bind(args, kwargs)
        return self.check_result(self.fn(*bound.args, **bound.kwargs))

    async def run_async(self, args: list[Any], kwargs: dict[str, Any] | None) -> Any:
        """:meth:`run` for a coroutine function (a plain one is called as it is)."""
        if not kwargs and len(args) == self.nparams:
            result = self.fn(*self._positional(args))
        else:
            bound = self._bind(args, kwargs)
            result = self.fn(*bound.args, **bound.kwargs)
        if inspect.isawaitable(result):
            result = await result
        return self.check_result(result)

    def _positional(self, args: list[Any]) -> tuple[Any, ...]:
        if self.tuple_type is None:
            return ()
        try:
            return msgspec.convert(args, self.tuple_type)  # type: ignore[no-any-return]
        except msgspec.ValidationError as exc:
            raise RemoteError(
                f"{self.name}: invalid arguments: {exc}", RemoteError.INVALID_PARAMS
            ) from None

    def _bind(self, args: list[Any], kwargs: dict[str, Any] | None) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **(kwargs or {}))
        except TypeError as exc:
            raise RemoteError(f"{self.name}: {exc}", RemoteError.INVALID_PARAMS) from None
        for pname, value in bound.arguments.items():
            hint = self.params[pname]
            if hint is Any:
                continue
            kind = self.kinds[pname]
            try:
                if kind == inspect.Parameter.VAR_POSITIONAL:
                    bound.arguments[pname] = tuple(msgspec.convert(list(value), list[hint]))  # type: ignore[valid-type]
                elif kind == inspect.Parameter.VAR_KEYWORD:
                    bound.arguments[pname] = msgspec.convert(value, dict[str, hint])  # type: ignore[valid-type]
                else:
                    bound.arguments[pname] = msgspec.convert(value, hint)
            except msgspec.ValidationError as exc:
                raise RemoteError(
                    f"{self.name}: invalid argument {pname!r}: {exc}", RemoteError.INVALID_PARAMS
                ) from None
        return bound

    def check_result(self, result: Any) -> Any:
        """``result`` if it matches the return hint; else ``RemoteError`` INVALID_RESULT."""
        hint = self.result
        if hint is Any:
            return result
        if hint in _SCALARS and type(result) is hint:
            return result  # what msgspec.convert returns for it, without the call
        if hint is None:
            if result is None:
                return None
            raise RemoteError(
                f"{self.name} returned {type(result).__name__}, its hint says None",
                RemoteError.INVALID_RESULT,
            )
        try:
            return msgspec.convert(result, hint, from_attributes=True)
        except msgspec.ValidationError as exc:
            raise RemoteError(
                f"{self.name}: the result does not match its hint {hint!r}: {exc}",
                RemoteError.INVALID_RESULT,
            ) from None

    def __repr__(self) -> str:
        return f"<Method {self.name}{self.signature}>"


class Service:
    """A named set of methods that RPC clients may call (``buzon.rpc.Service``)::

        svc = buzon.rpc.Service("calc")

        @svc.method
        def add(a: int, b: int) -> int:
            return a + b

        buzon.rpc.serve("unix:calc", svc)

    Type hints are the schema: arguments are validated (msgspec, strict) before the
    function runs and the result after; a mismatch reaches the caller as
    :class:`~buzon.errors.RemoteError` (``INVALID_PARAMS`` / ``INVALID_RESULT``).
    Only registered methods are reachable.
    """

    def __init__(self, name: str = "service") -> None:
        self.name = name
        self.methods: dict[str, Method] = {}

    @overload
    def method(self, fn: F) -> F: ...
    @overload
    def method(self, *, name: str) -> Callable[[F], F]: ...

    def method(self, fn: Any = None, *, name: str | None = None) -> Any:
        """Register ``fn`` (a decorator; ``name=`` publishes it under another name).
        Returns ``fn`` unchanged, so it stays callable locally."""

        def add(f: F) -> F:
            self.add(f, name=name)
            return f

        return add if fn is None else add(fn)

    def add(self, fn: Callable[..., Any], *, name: str | None = None) -> None:
        """Register ``fn`` under ``name`` (default: its ``__name__``)."""
        key = name if name else str(getattr(fn, "__name__", ""))
        if key in self.methods:
            raise ValueError(f"service {self.name!r} has a method {key!r} already")
        self.methods[key] = Method(key, fn)

    @classmethod
    def of(cls, obj: object, name: str | None = None) -> Service:
        """A service of ``obj``'s methods marked with :func:`expose` (bound to ``obj``).

        The names are read from the class definitions here, once; a client never makes
        the server look an attribute up by a name it sent.
        """
        svc = cls(name or type(obj).__name__)
        seen: set[str] = set()
        for klass in type(obj).__mro__:
            for attr, value in vars(klass).items():
                if attr in seen:
                    continue
                seen.add(attr)
                fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                published = getattr(fn, _EXPOSED, None)
                if published is not None:
                    svc.add(getattr(obj, attr), name=published)
        if not svc.methods:
            raise ValueError(f"{type(obj).__name__} has no method marked @buzon.rpc.expose")
        return svc

    def lookup(self, name: object) -> Method:
        """The method called ``name``; ``RemoteError`` METHOD_NOT_FOUND otherwise."""
        method = self.methods.get(name) if isinstance(name, str) else None
        if method is None:
            raise RemoteError(
                f"no method {name!r} in service {self.name!r}", RemoteError.METHOD_NOT_FOUND
            )
        return method

    def __repr__(self) -> str:
        return f"<Service {self.name} methods={sorted(self.methods)}>"


def as_service(target: object) -> Service:
    """``target`` itself if it is a :class:`Service`, else ``Service.of(target)``."""
    return target if isinstance(target, Service) else Service.of(target)
