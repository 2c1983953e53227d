from collections.abc import Callable
from typing import Any

from .frames import Frame

def bind(frame_type: type[Frame]) -> None: ...
def fields_frame(data: Any, max_frame: int) -> Frame | None: ...
def fields_run(
    data: Any, pos: int, stop: int, limit: int, append: Callable[[Any], object]
) -> int: ...
