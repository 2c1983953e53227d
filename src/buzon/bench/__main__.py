"""``python -m buzon.bench``: the same as ``buzon bench``."""

from __future__ import annotations

from . import main

raise SystemExit(main())
