"""The spec's JSON Schema as markdown: a table per section (key, type, default, description, examples).

Read from `json_schema()`, so the docs say what the pydantic models check (`diffbank spec schema --markdown`
writes docs/spec-schema.md).
"""

from __future__ import annotations

import json
from typing import Any

from extract.spec.schema import SECTION_MODELS, json_schema

_HEADER = "| key | type | default | description | examples |\n|---|---|---|---|---|"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


_OR = " \\| "  # a union's bar, escaped for a markdown table cell


def type_text(prop: dict[str, Any]) -> str:
    """A JSON Schema type as a reader says it: 'integer >= 1 | null', 'list of string', 'float16 | float32'."""
    return _OR.join(dict.fromkeys(_alternatives(prop)))


def _alternatives(prop: dict[str, Any]) -> list[str]:
    if "$ref" in prop:
        return [prop["$ref"].rsplit("/", 1)[-1].removesuffix("Section").lower() + " section"]
    if "enum" in prop:
        return [str(v) for v in prop["enum"]]
    if "const" in prop:
        return [_json(prop["const"])]
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return [a for p in prop[key] for a in _alternatives(p)]
    kind = prop.get("type")
    if kind == "array":
        return [f"list of {_grouped(prop.get('items', {}))}"]
    if kind == "object":
        values = prop.get("additionalProperties")
        return [f"mapping to {_grouped(values)}" if isinstance(values, dict) and values else "mapping"]
    text = {"boolean": "true/false"}.get(str(kind), str(kind or "any"))
    if "minimum" in prop:
        text += f" >= {prop['minimum']}"
    return [text]


def _grouped(prop: dict[str, Any]) -> str:
    text = type_text(prop)
    return f"({text})" if _OR in text else text


def _cell(text: str) -> str:
    # escaped so that a table cell stays one cell and <name> shows as text, not as an HTML tag
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _table(schema: dict[str, Any], required: set[str]) -> list[str]:
    rows = [_HEADER]
    for key, prop in schema["properties"].items():
        default = "required" if key in required else f"`{_json(prop.get('default'))}`"
        if "$ref" in prop and key not in required:
            default = "its fields' defaults"
        examples = ", ".join(f"`{_cell(_json(e))}`" for e in prop.get("examples", []))
        rows.append(f"| `{key}` | {type_text(prop)} | {default} | {_cell(prop.get('description', ''))} | {examples} |")
    return rows


def markdown(schema: dict[str, Any] | None = None) -> str:
    """Every field of a spec file, as markdown: the top level, then one table per section."""
    schema = schema if schema is not None else json_schema()
    defs = schema["$defs"]
    lines = [
        "# Spec schema",
        "",
        "Every key of an extraction spec (`cache_specs/*.yaml`), from the pydantic models in",
        "`extract/spec/schema.py`: written by `diffbank spec schema --markdown`; `diffbank spec schema` prints",
        "the same as JSON Schema for editors. Unknown keys are refused everywhere.",
        "",
        "## Top level",
        "",
        *_table(schema, set(schema.get("required", []))),
    ]
    for section, model in SECTION_MODELS.items():
        part = defs[model.__name__]
        lines += ["", f"## `{section}`", "", part.get("description", ""), ""]
        lines += _table(part, set(part.get("required", [])))
    return "\n".join(lines) + "\n"
