"""The public surface is pinned: adding or removing a name is a deliberate change here."""

from __future__ import annotations

import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

import buzon

PUBLIC = [
    "Address",
    "AddressError",
    "AuthenticationError",
    "BoundedBuffer",
    "BuzonError",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "CodecError",
    "ConnectError",
    "ConnectionRefused",
    "DeadlineExceeded",
    "Empty",
    "EndOfChannel",
    "EndpointInUse",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "HandshakeError",
    "Inbox",
    "InsecureBind",
    "LinkProperties",
    "Listener",
    "Mailbox",
    "MailboxReceipt",
    "Message",
    "MessageTooLarge",
    "NoSuchEndpoint",
    "PeerCredentialsRejected",
    "PeerInfo",
    "PermissionDenied",
    "PickleRejected",
    "ProtocolError",
    "Receipt",
    "RemoteError",
    "SecurityError",
    "Server",
    "ServerRestarted",
    "Statistics",
    "Timeout",
    "Undelivered",
    "UnsafePath",
    "UnsupportedOperation",
    "ValidationError",
    "__version__",
    "aio",
    "connect",
    "errors",
    "inbox",
    "listen",
    "mailbox",
    "names",
    "parse_address",
    "pipe",
    "recv_from",
    "rpc",
    "send_to",
    "serve",
    "shared_array",
    "shared_value",
    "signals",
    "wait",
]


def test_all_is_pinned() -> None:
    assert sorted(PUBLIC) == PUBLIC, "keep the pinned list sorted"
    assert sorted(buzon.__all__) == PUBLIC
    assert len(set(buzon.__all__)) == len(buzon.__all__), "duplicate names in __all__"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_is_importable(name: str) -> None:
    assert hasattr(buzon, name)
    namespace: dict[str, object] = {}
    exec(f"from buzon import {name}", namespace)
    assert namespace[name] is getattr(buzon, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from buzon import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == PUBLIC


def test_public_classes_do_not_leak_private_module_names() -> None:
    # what users see in reprs and tracebacks should be importable from where it claims
    for name in PUBLIC:
        obj = getattr(buzon, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            module = importlib.import_module(obj.__module__)
            assert getattr(module, obj.__qualname__) is obj, name


def test_errors_module_and_top_level_agree() -> None:
    for name in buzon.errors.__all__:
        if name != "from_oserror":
            assert getattr(buzon, name) is getattr(buzon.errors, name)


def test_version_matches_the_project_metadata() -> None:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with pyproject.open("rb") as f:
        assert buzon.__version__ == tomllib.load(f)["project"]["version"]
