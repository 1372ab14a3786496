"""A spec file's bytes to a plain YAML document, bounded, so a hostile file is refused in milliseconds.

- Size: files over `max_spec_bytes()` (1 MiB; the environment variable DIFFBANK_SPEC_MAX_BYTES
  overrides it) are refused before a byte is parsed; at most limit + 1 bytes are ever read, so a FIFO or
  /dev/zero is refused the same way.
- The parser's events are scanned before any object is built, and the scan stops at the first of:
  an alias (`*name`, merge keys `<<: *name`), which is how a 1.5 KB "billion laughs" document expands
  to gigabytes (a spec has nothing to share); nesting deeper than MAX_DEPTH levels (a spec needs four;
  the composer recurses); more than MAX_NODES values (a spec holds a few dozen).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 2**20
SPEC_BYTES_ENV = "DIFFBANK_SPEC_MAX_BYTES"
MAX_DEPTH = 32
MAX_NODES = 5_000  # scalars, lists and mappings: timesteps may list up to 4096 values; a spec holds a few dozen


class SpecFileError(ValueError):
    """A spec file that is refused before (or while) it is parsed."""


def max_spec_bytes() -> int:
    """The size limit of a spec file: DIFFBANK_SPEC_MAX_BYTES when set (a positive integer), else 1 MiB."""
    text = os.environ.get(SPEC_BYTES_ENV, "").strip()
    if not text:
        return MAX_SPEC_BYTES
    if not text.isdigit() or int(text) < 1:
        raise SpecFileError(f"{SPEC_BYTES_ENV}={text[:40]!r}: expected a positive number of bytes")
    return int(text)


# libyaml when present (the pure-Python parser is about 20x slower); both are safe loaders.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STARTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def check_events(text: str) -> None:
    """Refuse aliases, nesting deeper than MAX_DEPTH and more than MAX_NODES values, from the parser's
    events, before any object is built; the scan stops at the first refusal."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise SpecFileError(f"YAML aliases (*name) are not allowed in a spec: write the value out ({_at(event)})")
        if isinstance(event, _ENDS):
            depth -= 1
            continue
        if isinstance(event, (yaml.ScalarEvent, *_STARTS)):
            nodes += 1
            if nodes > MAX_NODES:
                raise SpecFileError(f"holds more than {MAX_NODES} values; a spec needs a few dozen ({_at(event)})")
        if isinstance(event, _STARTS):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecFileError(f"nested deeper than {MAX_DEPTH} levels; a spec needs 4 ({_at(event)})")


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def read_document(path: Path) -> Any:
    """The YAML document in `path` (plain dicts, lists and scalars); SpecFileError when refused."""
    limit = max_spec_bytes()
    try:
        size = path.stat().st_size
        if size > limit:
            raise SpecFileError(_too_large(size, limit))
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SpecFileError(f"cannot read the spec file: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise SpecFileError(_too_large(None, limit))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"not UTF-8 text: byte {exc.start} is {data[exc.start : exc.start + 1]!r}") from None
    try:
        check_events(text)
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise SpecFileError(f"not valid YAML: {exc}") from None


def _too_large(size: int | None, limit: int) -> str:
    what = f"is {size} bytes" if size is not None else "holds more"
    return f"the spec file {what}; spec files are limited to {limit} bytes (set {SPEC_BYTES_ENV} to raise the limit)"
