"""The docs are tested like code.

* The generated sections of ``docs/`` must be what ``python -m buzon.docgen docs``
  renders from the code today (run it to fix a failure here).
* Every code block marked ``python runnable`` in ``docs/*.md`` runs in a fresh
  interpreter with a private ``BUZON_RUNTIME_DIR``; a ``text`` block right after it is
  its exact expected output.
* The concept map says *today* only of names that exist, and *planned* only of names
  that do not exist yet.
* Every test that ``docs/security.md`` cites as proof exists.
* Every file or directory a page cites (``docs/*.md``, ``README.md``) is in the
  repository, and every roadmap step a page cites is on the roadmap in concepts.md.
* The README's tour runs, statement by statement, against endpoints that
  ``tests/_readme_tour.py`` sets up for it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import buzon
from buzon import docgen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src"

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _blocks(text: str) -> list[tuple[str, str, int, int]]:
    """(info string, body, start offset, end offset) of each fenced block."""
    return [(m.group(1).strip(), m.group(2), m.start(), m.end()) for m in _FENCE.finditer(text)]


def _runnable() -> list[Any]:
    params = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        blocks = _blocks(text)
        for i, (info, body, start, end) in enumerate(blocks):
            if info.split() != ["python", "runnable"]:
                continue
            expected = None
            if i + 1 < len(blocks):
                nxt_info, nxt_body, nxt_start, _ = blocks[i + 1]
                if nxt_info == "text" and not text[end:nxt_start].strip():
                    expected = nxt_body
            line = text.count("\n", 0, start) + 1
            params.append(pytest.param(body, expected, id=f"{page.name}:{line}"))
    return params


def test_generated_docs_are_current() -> None:
    stale = docgen.check(str(DOCS))
    assert not stale, (
        f"stale generated docs: {stale}; run `PYTHONPATH=src python -m buzon.docgen docs`"
    )


def test_check_mode_exit_code() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "buzon.docgen", str(DOCS), "--check"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_stale_section_is_detected_and_rewritten(tmp_path: Path) -> None:
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    page = copy / "transports.md"
    text = page.read_text(encoding="utf-8")
    begin = docgen.BEGIN.format(name="transports")
    page.write_text(text.replace(begin, begin + "\n| made up | row |", 1), encoding="utf-8")
    assert docgen.check(str(copy)) == [str(page)]
    assert docgen.main([str(copy), "--check"]) == 1
    assert docgen.write(str(copy)) == [str(page)]
    assert docgen.check(str(copy)) == []
    assert page.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all",
        "<!-- BEGIN GENERATED: a -->\n<!-- END GENERATED: b -->",
        "<!-- BEGIN GENERATED: a -->\nnever closed",
        "<!-- BEGIN GENERATED: nope -->\n<!-- END GENERATED: nope -->",
    ],
)
def test_bad_markers_are_errors(text: str) -> None:
    with pytest.raises(docgen.SectionError):
        docgen.render_page(text, {"a": lambda: "x"})


def test_every_transport_module_must_be_in_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docgen, "SCHEMES", docgen.SCHEMES[:1])  # only pipe
    with pytest.raises(docgen.SectionError, match="no entry in the scheme registry"):
        docgen._check_transport_coverage()


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


@pytest.mark.parametrize(("code", "expected"), _runnable())
def test_runnable_block(code: str, expected: str | None, runtime_dir: str) -> None:
    env = _env()
    env["BUZON_RUNTIME_DIR"] = runtime_dir
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        cwd=runtime_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"the block failed:\n{done.stdout}\n{done.stderr}"
    assert not done.stderr, done.stderr
    if expected is not None:
        assert done.stdout == expected


def test_there_are_runnable_blocks() -> None:
    assert len(_runnable()) >= 10


# ---------------------------------------------------------------- the concept map


def _map_rows() -> list[tuple[str, str, str]]:
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    section = text.split("## The map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| concept"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"a map row needs 3 cells: {line}"
        rows.append((cells[0], cells[1], cells[2]))
    return rows


def _resolve(dotted: str) -> bool:
    obj: Any = buzon
    for part in dotted.split(".")[1:]:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


_NAME = re.compile(r"\bbuzon(?:\.[A-Za-z_]\w*)+")


def test_concept_map_status_matches_the_code() -> None:
    rows = _map_rows()
    assert len(rows) >= 25
    for concept, api, status in rows:
        names = _NAME.findall(api)
        if status.startswith("today"):
            missing = [n for n in names if not _resolve(n)]
            assert not missing, f"{concept!r} is 'today' but {missing} do not exist"
        elif status.startswith("planned"):
            present = [n for n in names if _resolve(n)]
            assert not present, f"{concept!r} is 'planned' but {present} exist: update the map"
        else:
            pytest.fail(f"status must start with 'today' or 'planned': {status!r}")


def test_concept_map_cites_lectures() -> None:
    for concept, _, _ in _map_rows():
        assert re.search(r"lecture 00[0-4], slides? ", concept), concept


# ------------------------------------------------------------------ security.md


_CITED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _decorators(source: str, name: str) -> str | None:
    """The decorator lines of test function ``name`` in ``source`` (None if absent)."""
    m = re.search(rf"^(async )?def {name}\(", source, re.M)
    if m is None:
        return None
    before = source[: m.start()].rstrip("\n").split("\n")
    lines = []
    for line in reversed(before):
        if not line.strip() or line.startswith(("def ", "class ", "async def ")):
            break
        if line.startswith((" ", "\t", "@", ")")):
            lines.append(line)
        else:
            break
    return "\n".join(lines)


def test_security_doc_cites_existing_tests() -> None:
    text = (DOCS / "security.md").read_text(encoding="utf-8")
    proofs, gaps = text.split("## Known gaps", 1)
    cited = _CITED.findall(proofs)
    assert len(cited) >= 10
    for path, name in cited + _CITED.findall(gaps):
        source = (ROOT / path).read_text(encoding="utf-8")
        assert _decorators(source, name) is not None, f"{path}::{name} not found"
    for path, name in cited:  # a proof must be a test that is expected to pass
        decorators = _decorators((ROOT / path).read_text(encoding="utf-8"), name)
        assert decorators is not None and "xfail" not in decorators, (
            f"{path}::{name} is an expected failure: cite it under 'Known gaps', not as proof"
        )
    for path, name in _CITED.findall(gaps):  # a gap that is fixed leaves that section
        decorators = _decorators((ROOT / path).read_text(encoding="utf-8"), name)
        assert decorators is not None and "xfail" in decorators, (
            f"{path}::{name} passes now: move it from 'Known gaps' to the proofs"
        )


# ------------------------------------------------------------- cited files exist

PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]

# a path as the docs write one: `src/buzon/_core.c`, tests/shm/test_core.py, frames.md,
# transport/base.py (from src/buzon), `seeds/` (a directory)
_PATH = re.compile(
    r"(?<![\w/.:-])((?:[\w.-]+/)*[\w-]+\.(?:py|pyi|c|h|md|toml|txt|json|sh))(?![\w/-])"
    r"|`((?:[\w.-]+/)+)`"
)
_SKIP_DIRS = {".git", ".venv", "build", "__pycache__"}


def _repo_names() -> set[str]:
    return {p.name for p in ROOT.rglob("*") if not _SKIP_DIRS & set(p.relative_to(ROOT).parts)}


_OPTION_BEFORE = re.compile(r"--[\w-]+[ =]$")  # `--json out.json` names a file to write


def _cited_paths(text: str) -> list[tuple[int, str]]:
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1) or m.group(2))
        for m in _PATH.finditer(text)
        if not _OPTION_BEFORE.search(text[max(0, m.start() - 40) : m.start()])
    ]


def test_cited_paths_are_found() -> None:
    text = "see `src/buzon/_core.c`, tests/shm/test_core.py:12, [x](frames.md), `seeds/`"
    assert [p for _, p in _cited_paths(text)] == [
        "src/buzon/_core.c",
        "tests/shm/test_core.py",
        "frames.md",
        "seeds/",
    ]
    assert _cited_paths("https://example.org/a.md, buzon.aio, v1.2, --json out.json") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_file_is_in_the_repository(page: Path) -> None:
    names = _repo_names()
    missing = []
    for line, path in _cited_paths(page.read_text(encoding="utf-8")):
        if "/" in path.rstrip("/"):
            bases = (ROOT, ROOT / "src", ROOT / "src" / "buzon", page.parent)
            found = any((base / path).exists() for base in bases)
        else:  # a bare name, e.g. `test_zerocopy.py` after the directory it is in
            found = (page.parent / path).exists() or path.rstrip("/") in names
        if not found:
            missing.append(f"{page.name}:{line}: {path}")
    assert not missing, f"cited but not in the repository: {missing}"


_STEP = re.compile(r"roadmap(?: step)? (\d+)")


def test_cited_roadmap_steps_are_on_the_roadmap() -> None:
    concepts = (DOCS / "concepts.md").read_text(encoding="utf-8")
    roadmap = concepts.split("\n## Roadmap\n", 1)[1].split("\n## ", 1)[0]
    steps = {int(n) for n in re.findall(r"^(\d+)\. ", roadmap, re.M)}
    assert steps == set(range(1, len(steps) + 1)) and len(steps) >= 6
    for page in PAGES:
        for n in _STEP.findall(page.read_text(encoding="utf-8")):
            assert int(n) in steps, f"{page.name} cites roadmap step {n}, which is not listed"


def test_done_features_are_not_called_planned() -> None:
    # steps 1-3 are done: what they delivered is not "planned" anywhere
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for n in _STEP.findall(text):
            assert int(n) > 3, f"{page.name} calls a feature of done step {n} planned"
        assert not re.search(r"[Rr]eliable datagrams (are|is) (\*\*)?planned", text), page.name


# ---------------------------------------------------------------- the README tour


def _readme_tour() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## A tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = [body for info, body, _, _ in _blocks(section) if info == "python"]
    assert len(blocks) == 1, "the tour is one python block"
    return blocks[0]


def _free_port(kind: int) -> int:
    import socket

    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_readme_tour_runs(runtime_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    import socket

    tour = tmp_path / "tour.py"
    tour.write_text(_readme_tour(), encoding="utf-8")
    env = _env()
    env["BUZON_RUNTIME_DIR"] = runtime_dir
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "_readme_tour.py"),
            str(tour),
            str(_free_port(socket.SOCK_STREAM)),
            str(_free_port(socket.SOCK_DGRAM)),
        ],
        env=env,
        cwd=runtime_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the tour failed:\n{done.stdout}\n{done.stderr}"
    assert "tour ok" in done.stdout, done.stdout
    assert "signo=10" in done.stdout  # the tour's last line printed the signal it got
