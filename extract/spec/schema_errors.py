"""The schema's validation errors as the project's messages, each with its field path.

`problems(error)` turns pydantic's errors into `(field path, message)` pairs such as
`storage.dtype: unknown storage dtype 'float61' (did you mean 'float16'?); choose one of float16, float32`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from extract.spec.fields import HINTED, MAP_TAG, REPR_LIMIT, SHAPE_TAGS, short_repr, suggest, type_name
from extract.spec.schema import SpecDocument


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    after_map = False
    for part in loc:
        if part in SHAPE_TAGS:
            after_map = part == MAP_TAG
            continue
        if isinstance(part, int) and not after_map:
            out += f"[{part}]"
        else:
            text = str(part) if len(str(part)) <= REPR_LIMIT else short_repr(part)  # an unknown key may be huge
            out += f".{text}" if out else text
        after_map = False
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose field `loc` names (None below a plain mapping or list)."""
    model: type[BaseModel] = SpecDocument
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _literals(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _literals(arg)]


def _message(err: Any, suggestions: bool = True) -> str:
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    got = f"got {type_name(value)} {short_repr(value)}"
    if kind == "extra_forbidden":
        model = _model_at(loc)
        allowed = list(model.model_fields) if model is not None else []
        return f"unknown key{suggest(loc[-1], allowed) if suggestions else ''}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return "section is required" if len(loc) == 1 else "is required"
    if kind == "literal_error":
        model = _model_at(loc)
        field = model.model_fields[loc[-1]] if model is not None else None
        choices = _literals(field.annotation) if field is not None else []
        what = field.title if field is not None and field.title else "value"
        hint = (
            " (bfloat16 is not a core zarr dtype; use it as compute.dtype)"
            if loc == ("storage", "dtype") and value == "bfloat16"
            else ""
        )
        value_text = short_repr(value)
        close = suggest(value, choices) if suggestions else ""
        return f"unknown {what} {value_text}{close}; choose one of {', '.join(choices)}{hint}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, {got}"
    if kind == "bool_type":
        return f"expected true or false, {got}"
    if kind in ("string_type", "string_too_short"):
        return f"expected a non-empty string, {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, {got}"
    if kind == "list_type":
        return f"expected a list, {got}"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("too_long", "string_too_long"):
        what = "characters" if isinstance(value, str) else "items"
        return f"has {len(value)} {what}; at most {err['ctx']['max_length']}"
    if kind == "greater_than_equal":
        return f"must be >= {err['ctx']['ge']}, got {short_repr(value)}"
    return err["msg"]


def problems(error: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) of every error, in document order; "did you mean" for the first HINTED only
    (a document with thousands of bad keys would otherwise spend seconds in difflib)."""
    return [(_path(tuple(e["loc"])), _message(e, suggestions=i < HINTED)) for i, e in enumerate(error.errors())]
