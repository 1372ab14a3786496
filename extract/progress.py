"""Progress bars: drawn only on a terminal, so output sent to a file or a pipe holds plain log lines.

A tqdm bar redraws itself with carriage returns; in a file those become one long line that the next log
message is glued to. Every bar of the project comes from `progress_bar`, which draws it only when stderr
is a terminal, unless `DIFFBANK_PROGRESS=1` (`diffbank --progress`) forces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

FORCE_ENV = "DIFFBANK_PROGRESS"


def force_bars() -> None:
    """Draw bars even when stderr is no terminal (inherited by worker processes)."""
    os.environ[FORCE_ENV] = "1"


def bars_wanted() -> bool:
    if os.environ.get(FORCE_ENV) == "1":
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm on stderr, disabled unless `enabled` and bars are wanted here (see the module docstring)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, disable=not (enabled and bars_wanted()), **kwargs)


def write_clear_of_bars(write: Callable[[], None]) -> None:
    """Run `write` (one line to stderr) with any bar on screen cleared first and redrawn after, so a
    status line never shares a line with a bar."""
    with tqdm.external_write_mode(file=sys.stderr):
        write()
