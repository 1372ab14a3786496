"""extract/spec/schema.py and schema_errors.py: the YAML as pydantic models, its messages and its JSON Schema."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from extract.spec.schema import SpecDocument, json_schema
from extract.spec.schema_errors import problems


def _problems(raw: dict) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        SpecDocument.model_validate(raw)
    return problems(info.value)


MINIMAL = {"model": {}, "dataset": {"kind": "digits"}, "features": {"timesteps": [10], "blocks": [3]}}


def test_defaults_and_scalar_shorthands():
    doc = SpecDocument.model_validate(
        {**MINIMAL, "noise": None, "features": {"timesteps": 10, "blocks": "middle_block", "tokens": 0}}
    )
    assert doc.features.timesteps == [10] and doc.features.blocks == ["middle_block"] and doc.features.tokens is None
    assert (doc.noise.seed, doc.views.hflip, doc.storage.dtype, doc.compute.device) == (0, False, "float16", "auto")


def test_unknown_keys_everywhere_with_did_you_mean():
    got = dict(_problems({**MINIMAL, "storge": {}, "noise": {"sed": 1}, "views": {"hlip": True}}))
    assert got["storge"].startswith("unknown key (did you mean 'storage'?); allowed: version, name, model")
    assert got["noise.sed"] == "unknown key (did you mean 'seed'?); allowed: seed, draws, combine, rule"
    assert got["views.hlip"].startswith("unknown key (did you mean 'hflip'?)")


def test_every_error_at_once_with_its_path():
    raw = {
        "model": {"init_seed": -1},
        "dataset": {"kind": "digits", "limit": {"train": "5"}},
        "features": {"timesteps": [1, 2.5], "blocks": [3, None], "pooling": {"default": [2], 5: [0]}},
    }
    got = _problems(raw)
    assert [p for p, _ in got] == [
        "model.init_seed",
        "dataset.limit.train",
        "features.timesteps[1]",
        "features.blocks[1]",
        "features.pooling.5[0]",
    ]
    assert got[3][1] == "expected a block number or module name, got null None"


def test_missing_sections_and_keys():
    got = dict(_problems({"model": {}, "dataset": {}}))
    assert got == {"dataset.kind": "is required", "features": "section is required"}


def test_json_schema_export():
    schema = json_schema()
    assert set(schema["required"]) == {"model", "dataset", "features"}
    storage = schema["$defs"]["StorageSection"]
    assert storage["additionalProperties"] is False
    assert storage["properties"]["dtype"]["enum"] == ["float16", "float32"]
    json.dumps(schema)


def test_spec_schema_command():
    from diffbank.commands.spec import spec_command

    result = CliRunner().invoke(spec_command, ["schema"])
    assert result.exit_code == 0 and json.loads(result.output) == json_schema()


def test_every_field_has_a_description():
    from extract.spec.schema import SECTION_MODELS

    schema = json_schema()
    sections = [schema, *(schema["$defs"][m.__name__] for m in SECTION_MODELS.values())]
    missing = [key for part in sections for key, prop in part["properties"].items() if not prop.get("description")]
    assert not missing, missing
    assert all(part.get("description") for part in sections[1:])  # each section says what it holds
    assert schema["$defs"]["FeaturesSection"]["properties"]["timesteps"]["examples"]


def test_markdown_has_a_table_per_section_and_the_docs_are_current():
    from pathlib import Path

    from extract.spec.schema import SECTION_MODELS
    from extract.spec.schema_markdown import markdown

    text = markdown()
    for section, model in SECTION_MODELS.items():
        assert f"## `{section}`" in text
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key
    assert "| `pooling` | list of integer >= 1 \\| mapping to list of integer >= 1 \\| null | `null` |" in text
    result = CliRunner().invoke(spec_command_group(), ["schema", "--markdown"])
    assert result.exit_code == 0 and result.output == text
    doc = Path(__file__).resolve().parents[1] / "docs" / "spec-schema.md"
    assert doc.read_text() == text, (
        "docs/spec-schema.md is stale: diffbank spec schema --markdown > docs/spec-schema.md"
    )


def spec_command_group():
    from diffbank.commands.spec import spec_command

    return spec_command
