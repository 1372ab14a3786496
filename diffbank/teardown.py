"""Quiet exits after S3 failures.

When one of zarr's concurrent requests to an object store fails, the others are abandoned on fsspec's
event-loop thread; at interpreter exit each is reported through `sys.unraisablehook` with a traceback
(aiobotocore's `ValueError: <Token ...> was created in a different Context`), about a hundred lines
after the one-line error. Those reports say nothing about the failure, so the CLI drops them (not under
--debug); every other unraisable report still prints.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any


def is_abandoned_request(unraisable: Any) -> bool:
    """A report about a coroutine closed unfinished, or about an async context torn down in another one."""
    return inspect.iscoroutine(unraisable.object) or "was created in a different Context" in str(unraisable.exc_value)


def silence_abandoned_requests() -> None:
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not is_abandoned_request(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
