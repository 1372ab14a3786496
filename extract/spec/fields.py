"""The spec schema's building blocks: bounds, bounded field types and the helpers of its messages.

The bounds keep a hostile document from expanding (a U-Net has a few dozen blocks and a schedule at most
a few thousand steps); the resolver checks the exact ones (timesteps within the schedule, blocks within
the model) under these. Values spelled as a scalar, a list or a {block/split: value} mapping are
validated by their shape. Messages quote values through `short_repr`, so none carries a huge value.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Bounds on what a document may ask for, so a hostile spec is refused quickly instead of expanding: a
# U-Net has a few dozen blocks and a schedule at most a few thousand steps; the resolver checks the
# exact bounds (timesteps within the schedule, blocks within the model) under these.
MAX_NAME_LENGTH = 128
MAX_TIMESTEPS = 4096
MAX_BLOCKS = 256
MAX_SMALL_LIST = 64  # pooling sizes, splits
MAX_FLAGS = 256
MAX_TEXT = 4096  # paths, presets
MAX_KEY = 128  # block names, split names, flag names
REPR_LIMIT = 60  # characters of a value quoted in a message
HINTED = 100  # errors that get a "did you mean" suggestion
Problems = list[tuple[str, str]]  # (field path, message), in the order found
# Union branches are chosen by the input's shape; their tags are dropped again from error paths.
ONE_TAG, LIST_TAG, MAP_TAG, NONE_TAG = "one", "list", "map", "none"
SHAPE_TAGS = {ONE_TAG, LIST_TAG, MAP_TAG, NONE_TAG}


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """repr(value) cut to about `limit` characters: a message never carries a huge value.

    Long strings and containers are cut before repr is taken, so a megabyte value costs no more than a
    short one.
    """
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"<{type_name(value)} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def suggest(word: Any, choices: Any) -> str:
    """' (did you mean 'x'?)' when a choice is close to `word`, else ''."""
    if len(str(word)) > REPR_LIMIT:  # no near miss is that long; difflib's cost grows with the length
        return ""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def name_problem(name: str) -> str:
    """Why `name` cannot be a file name (a store's default path is stores/<name>.zarr), or ""."""
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long; at most {MAX_NAME_LENGTH}"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{short_repr(name)} holds a control character (NUL, newline, ...); use a plain file name"
    if "/" in name or "\\" in name or ".." in name:
        return f"{short_repr(name)} is not a plain file name: no '/', '\\' or '..' (it names stores/<name>.zarr)"
    return ""


def device_problem(value: Any) -> str:
    """Why `value` names no compute device, or ""."""
    if isinstance(value, str) and _DEVICE_RE.match(value):
        return ""
    return f"unknown device {short_repr(value)}; use auto, cpu, cuda, cuda:<index> or mps"


def _fspath(value: Any) -> Any:
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(value, str) and "\0" in value:
        raise PydanticCustomError("nul", "{value} holds a NUL byte, which no path can", {"value": short_repr(value)})
    return value


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, (int, str)) and not isinstance(value, bool) else value


def _shape(value: Any) -> str:
    if value is None:
        return NONE_TAG
    return MAP_TAG if isinstance(value, dict) else LIST_TAG if isinstance(value, list) else ONE_TAG


def _block_ref(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError(
            "block_ref",
            "expected a block number or module name, got {kind} {value}",
            {"kind": type_name(value), "value": short_repr(value)},
        )
    return value


def _tokens(value: Any) -> Any:
    return None if value == 0 and not isinstance(value, bool) else value  # 0 spells "no tokens", as null


_One = TypeVar("_One")
_Many = TypeVar("_Many")
_Mapping = TypeVar("_Mapping")
# A value spelled as a scalar, a list or a {block/split: value} mapping, validated by its shape; a generic
# alias (not a function building the type) so that type checkers see the field types too.
_ByShape = Annotated[
    Annotated[_One, Tag(ONE_TAG)]
    | Annotated[_Many, Tag(LIST_TAG)]
    | Annotated[_Mapping, Tag(MAP_TAG)]
    | Annotated[None, Tag(NONE_TAG)],
    Discriminator(_shape),
]


PosInt = Annotated[int, Field(ge=1)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY)]
NonNegInt = Annotated[int, Field(ge=0)]
Path_ = Annotated[Annotated[str, Field(max_length=MAX_TEXT)] | None, BeforeValidator(_fspath)]
BlockRef = Annotated[int | Key, BeforeValidator(_block_ref)]
BlockKey = int | Key  # a block number, a digit string or a module name, or "default"
Pools = Annotated[list[PosInt], BeforeValidator(_listify), Field(max_length=MAX_SMALL_LIST)]
TokenSize = Annotated[PosInt | None, BeforeValidator(_tokens)]
PoolingField = _ByShape[Pools, Pools, dict[BlockKey, Pools]]
TokensField = _ByShape[TokenSize, TokenSize, dict[BlockKey, TokenSize]]
LimitField = _ByShape[PosInt, PosInt, dict[Key, PosInt]]
KeyList = Annotated[list[Key] | None, BeforeValidator(_listify)]
IntList = Annotated[list[int], BeforeValidator(_listify)]
BlockRefList = Annotated[list[BlockRef], BeforeValidator(_listify)]
