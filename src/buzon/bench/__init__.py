"""``buzon bench``: buzon against the raw OS mechanisms, multiprocessing and the peers.

Every number comes from this run on this machine: per transport, the 64 B round
trip (p50/p99), one-way throughput of 64 B messages (msg/s) and of 1 MiB messages
(MB/s), for the raw mechanism, buzon with a blocking receiver (``spin=0``), buzon
with its default spin, and ``multiprocessing.Pipe``; the same for the peers of the
shared-memory work (iceoryx2, pyzmq, faster-fifo, ``multiprocessing.Queue``: the
optional group ``bench``, rows "not installed" without them), and two bulk cases, a
64 MiB numpy array one way (GB/s) and 4 producers x 4 consumers (msg/s). The report
ends with the project's targets, each a ratio between two rows with PASS or FAIL.

Usage::

    buzon bench [--quick] [--seconds S] [--only SUBSTR[,SUBSTR]] [--repeat N]
                [--json PATH] [--no-progress] [--no-pin] [--list]

Cases are named ``IMPL/TRANSPORT/METRIC`` (``raw/unix/rt64``, ``mp/Pipe/oneway64``,
``buzon-spin0/tcp/oneway1m``); ``--only`` keeps those containing any of the given
substrings (case-insensitive). Methodology: ``docs/benchmarks.md``.

Exit status: 0 when every selected case ran (targets may still FAIL: they are
reported, not enforced), 1 when a case failed, 2 for bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from ._aio import aio_cases
from ._bulk import bulk_cases
from ._buzon import BUZON_TRANSPORTS, buzon_cases
from ._harness import (
    Case,
    Config,
    Progress,
    Result,
    choose_cpus,
    combine,
    interrupts_as_keyboard,
    load_average,
    run_case,
)
from ._mailbox import mailbox_cases
from ._peers import peer_cases
from ._raw import RAW_TRANSPORTS, mp_cases, raw_cases
from ._report import document, machine_info, render, write_json
from ._rpc import rpc_cases
from ._rpcpeers import rpc_peer_cases

__all__ = ["all_cases", "main"]

DEFAULT_SECONDS = 1.5
QUICK_SECONDS = 0.1


def all_cases() -> list[Case]:
    """Every case, in report order: the mp.Pipe reference, then transport by transport."""
    cases = mp_cases()
    for transport in dict.fromkeys(RAW_TRANSPORTS + BUZON_TRANSPORTS):
        if transport in RAW_TRANSPORTS:
            cases += raw_cases(transport)
        if transport in BUZON_TRANSPORTS:
            cases += buzon_cases(transport)
        cases += aio_cases(transport)
    return cases + peer_cases() + bulk_cases() + mailbox_cases() + rpc_cases() + rpc_peer_cases()


def _select(cases: Sequence[Case], only: Sequence[str]) -> list[Case]:
    if not only:
        return list(cases)
    wanted = [s.lower() for s in only]
    return [c for c in cases if any(s in c.id.lower() for s in wanted)]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="buzon bench",
        description="Measure buzon against the raw OS mechanisms, multiprocessing and peers.",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"short runs ({QUICK_SECONDS:g} s per case)"
    )
    p.add_argument(
        "--seconds",
        type=_positive,
        metavar="S",
        help=f"measuring time per case (default {DEFAULT_SECONDS:g}; --quick {QUICK_SECONDS:g})",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBSTR",
        help="run the cases whose id contains SUBSTR (comma-separated or repeated: any)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the whole list N times, interleaved, and report medians (default 1)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every result to PATH as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="let the OS place the two processes (default: pin them to two distinct CPUs)",
    )
    p.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite; see the module docstring for options and exit status."""
    args = _parser().parse_args(argv)
    only = tuple(s.strip() for item in args.only for s in item.split(",") if s.strip())
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    config = Config(
        seconds=seconds,
        quick=args.quick,
        only=only,
        repeat=args.repeat,
        progress=not args.no_progress,
        pin=None if args.no_pin else choose_cpus(),
    )
    if args.repeat < 1:
        print("buzon bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    cases = _select(all_cases(), only)
    if args.list:
        for case in cases:
            print(case.id)
        return 0
    if not cases:
        print(f"buzon bench: no case matches {', '.join(only)!r}", file=sys.stderr)
        return 2

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = load_average()
    progress = Progress(len(cases) * args.repeat, config.progress)
    rounds: dict[str, list[Result]] = {}
    interrupted = False
    tmpdir = tempfile.mkdtemp(prefix="buzon-bench-")
    try:
        with interrupts_as_keyboard():
            k = 0
            for _ in range(args.repeat):
                for case in cases:
                    k += 1
                    progress.start(k, case.id)
                    result = run_case(case, config, tmpdir, k)
                    rounds.setdefault(case.id, []).append(result)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.finish()
        shutil.rmtree(tmpdir, ignore_errors=True)
        machine["loadavg_end"] = load_average()
    results = [combine(rounds[case.id]) for case in cases if case.id in rounds]

    sys.stdout.write(render(results, config, machine, interrupted=interrupted))
    sys.stdout.flush()
    if args.json:
        doc = document(
            results,
            config,
            machine,
            started=started,
            elapsed=time.perf_counter() - t0,
            interrupted=interrupted,
        )
        try:
            write_json(args.json, doc)
        except OSError as exc:
            print(f"buzon bench: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if interrupted:
        return 130
    return 1 if any(r.status == "error" for r in results) else 0
