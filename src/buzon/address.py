"""Addresses: one URL syntax for every transport.

Every scheme and its URL forms are entries of the registry (:mod:`buzon._schemes`);
docs/transports.md has the generated table. The forms are:

* a runtime-dir scheme (``fifo:``, ``unix:``, ...): ``SCHEME:NAME`` is the file
  ``NAME<suffix>`` in buzon's private runtime dir, ``SCHEME:/abs/path`` exactly that
  path (a socket path is at most 107 bytes);
* ``mq:NAME`` is the POSIX queue ``/buzon-UID-NAME`` (private prefix), ``mq:/NAME``
  exactly ``/NAME``;
* ``tcp://HOST:PORT``, ``udp://HOST:PORT``: IPv6 as ``[::1]``; port 0 picks a free port;
* ``name:NAME`` is the address registered under NAME (:mod:`buzon.names`): it parses to
  an :class:`Address` of scheme ``name`` here, and ``connect``, ``listen``, ``serve``
  and ``mailbox`` resolve it before a transport is chosen.

A NAME is 1-64 characters of ``A-Z a-z 0-9 . _ -`` not starting with a dot. Names
without a leading slash live in buzon's namespace, so two programs of the same user
meet there and nobody else can; a leading slash means "exactly this", so buzon can
meet programs that know nothing about it. Parsing is pure: nothing here touches the
file system (the runtime dir is resolved by :mod:`buzon._runtime`).
"""

from __future__ import annotations

import os
import re

from ._record import Record
from ._schemes import describe, scheme_info
from .errors import AddressError, UnsupportedOperation

__all__ = ["NAME_SCHEME", "Address", "Scheme", "check_name", "is_name", "parse_address"]

Scheme = str
"""A scheme name: one of the registry's (:data:`buzon._schemes.SCHEMES`)."""

NAME_SCHEME = "name"
"""The scheme of registered names (``name:calc``): resolved, never a transport."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
_MQ_NAME_RE = re.compile(r"^/[^/\x00]{1,250}$")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class Address(Record, frozen=True):
    """A parsed endpoint address.

    ``name`` is set for private (runtime-dir) names, ``path`` for absolute paths and
    for POSIX queue names given with a slash, ``host``/``port`` for INET sockets.
    """

    scheme: Scheme
    name: str | None = None
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def private(self) -> bool:
        """True when the address lives in buzon's private namespace."""
        return self.name is not None

    @property
    def is_inet(self) -> bool:
        """True for ``HOST:PORT`` addresses (TCP, UDP)."""
        if self.scheme == NAME_SCHEME:
            return False
        return scheme_info(self.scheme).address == "inet"

    def fs_path(self, runtime_dir: str | None = None) -> str:
        """The file-system path of a FIFO or Unix socket address."""
        info = scheme_info(self.scheme)
        if info.address != "local" or info.suffix is None:
            raise AddressError(f"{self} has no file-system path")
        if self.path is not None:
            return self.path
        if runtime_dir is None:
            from ._runtime import runtime_dir as _rd

            runtime_dir = _rd()
        assert self.name is not None
        path = os.path.join(runtime_dir, self.name + info.suffix)
        if len(os.fsencode(path)) > _SUN_PATH_MAX and info.unix_socket is not None:
            raise AddressError(
                f"{self}: socket path {path!r} exceeds {_SUN_PATH_MAX} bytes; "
                "set BUZON_RUNTIME_DIR to a shorter directory"
            )
        return path

    def mq_name(self) -> str:
        """The POSIX message queue name (``/...``) of an ``mq:`` address."""
        if scheme_info(self.scheme).address != "queue":
            raise AddressError(f"{self} is not a message queue address")
        if self.path is not None:
            return self.path
        return f"/buzon-{os.getuid()}-{self.name}"

    def with_port(self, port: int) -> Address:
        """This INET address with ``port`` (the one a listener on port 0 got)."""
        return Address(self.scheme, host=self.host, port=port)

    def __str__(self) -> str:
        if self.scheme == NAME_SCHEME:
            return f"{NAME_SCHEME}:{self.name}"
        kind = scheme_info(self.scheme).address
        if kind == "inet":
            host = self.host or ""
            if ":" in host:
                host = f"[{host}]"
            return f"{self.scheme}://{host}:{self.port}"
        if kind == "none":
            return f"{self.scheme}:"
        return f"{self.scheme}:{self.name if self.name is not None else self.path}"


def is_name(url: object) -> bool:
    """Whether ``url`` is a ``name:NAME`` address (cheap: no parsing)."""
    if isinstance(url, Address):
        return url.scheme == NAME_SCHEME
    return isinstance(url, str) and url.startswith(NAME_SCHEME + ":")


def parse_address(url: str | Address) -> Address:
    """Parse ``url`` into an :class:`Address`, raising :class:`AddressError` if it is bad."""
    if isinstance(url, Address):
        return url
    if not isinstance(url, str):
        raise AddressError(f"an address is a string like 'unix:calc', not {type(url).__name__}")
    if "\x00" in url:
        raise AddressError("addresses may not contain NUL bytes")
    scheme, sep, rest = url.partition(":")
    if not sep:
        raise AddressError(f"{url!r} has no scheme; use {_ALL_SCHEMES}")
    if scheme == NAME_SCHEME:
        check_name(url, rest)
        return Address(scheme, name=rest)
    try:
        kind = scheme_info(scheme).address
    except KeyError:
        kind = "none"
    if kind == "inet":
        return _parse_inet(url, scheme, rest)
    if kind == "local":
        return _parse_local(url, scheme, rest)
    if kind == "queue":
        if rest.startswith("/"):
            if not _MQ_NAME_RE.fullmatch(rest):
                raise AddressError(
                    f"{url!r}: a POSIX queue name is '/' followed by 1-250 characters "
                    "and no further slash"
                )
            return Address(scheme, path=rest)
        check_name(url, rest)
        return Address(scheme, name=rest)
    raise AddressError(f"{url!r}: unknown scheme {scheme!r}; use {_ALL_SCHEMES}")


_ALL_SCHEMES = describe(lambda info: True, extra=(f"{NAME_SCHEME}:",))


def serve_address(url: str | Address, options: dict[str, object]) -> Address:
    """The address a server listens on, for :class:`buzon.Server` and
    :class:`buzon.aio.Server`: ``name:NAME`` serves ``unix:NAME`` registered as NAME
    (``options["name"]`` set); a scheme that cannot be served raises
    :class:`UnsupportedOperation` naming the ones that can."""
    addr = parse_address(url)
    if addr.scheme == "name":
        options["name"] = addr.name
        addr = Address("unix", name=addr.name)
    if not scheme_info(addr.scheme).servable:
        raise UnsupportedOperation(
            f"serve needs a connection-oriented address ({describe(lambda i: i.servable)}), "
            f"not {addr.scheme}:"
        )
    return addr


def check_name(url: str, name: str) -> None:
    """Raise :class:`AddressError` stating the rule unless ``name`` is a valid NAME."""
    if not _NAME_RE.fullmatch(name):
        raise AddressError(
            f"{url!r}: a name is 1-64 characters of letters, digits, '.', '_' or '-', "
            "not starting with '.'; use an absolute path for anything else"
        )


def _parse_local(url: str, scheme: str, rest: str) -> Address:
    if rest.startswith("//"):
        raise AddressError(f"{url!r}: write {scheme}:/abs/path or {scheme}:NAME, not {scheme}://")
    if rest.startswith("/"):
        norm = os.path.normpath(rest)
        if norm != rest.rstrip("/") or rest.endswith("/"):
            raise AddressError(f"{url!r}: the path must be normalised (no '..', '//' or '/.')")
        if scheme_info(scheme).unix_socket is not None and len(os.fsencode(rest)) > _SUN_PATH_MAX:
            raise AddressError(f"{url!r}: a socket path is at most {_SUN_PATH_MAX} bytes")
        return Address(scheme, path=rest)
    check_name(url, rest)
    return Address(scheme, name=rest)


def _parse_inet(url: str, scheme: str, rest: str) -> Address:
    if not rest.startswith("//"):
        raise AddressError(f"{url!r}: write {scheme}://HOST:PORT")
    hostport = rest[2:]
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise AddressError(f"{url!r}: an IPv6 address is written [ADDR]:PORT")
        import ipaddress  # here: importing buzon does not load it

        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{url!r}: {host!r} is not an IPv6 address") from None
        port_s = tail[1:]
    else:
        host, colon, port_s = hostport.rpartition(":")
        if not colon or not host:
            raise AddressError(f"{url!r}: write {scheme}://HOST:PORT (the port is required)")
        if ":" in host:
            raise AddressError(f"{url!r}: put an IPv6 address in brackets, e.g. [::1]:PORT")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise AddressError(f"{url!r}: {host!r} is not a host name or IPv4 address")
    if not (port_s.isascii() and port_s.isdigit()) or not 0 <= int(port_s) <= 65535:
        raise AddressError(f"{url!r}: the port must be a number from 0 to 65535")
    return Address(scheme, host=host, port=int(port_s))


_check_name = check_name  # the old private spelling (shm/_names.py imports it)
