"""``python -m buzon``: the ``buzon`` command line (see :mod:`buzon.cli`)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
