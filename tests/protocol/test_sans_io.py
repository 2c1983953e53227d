"""protocol/ is sans-IO: no module there imports anything that does I/O or waits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import buzon.protocol

FORBIDDEN = {
    "socket",
    "select",
    "selectors",
    "threading",
    "asyncio",
    "time",
    "os",
    "subprocess",
    "signal",
    "multiprocessing",
    "ssl",
}
PROTOCOL_DIR = Path(buzon.protocol.__file__).parent
MODULES = sorted(p for p in PROTOCOL_DIR.rglob("*.py"))  # packages (reliable/) included


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_there_are_protocol_modules_to_check() -> None:
    names = {p.relative_to(PROTOCOL_DIR).as_posix() for p in MODULES}
    assert names >= {"frames.py", "handshake.py", "mpcompat.py", "reliable/connection.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PROTOCOL_DIR).as_posix())
def test_protocol_module_does_no_io(path: Path) -> None:
    assert not (_imports(path) & FORBIDDEN), f"{path.name} imports {_imports(path) & FORBIDDEN}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom socket import socket\n")
    assert _imports(bad) & FORBIDDEN == {"os", "socket"}
