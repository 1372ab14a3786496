"""The extraction spec: one declarative, validated description of a feature store.

`schema` holds the YAML as pydantic models (and its JSON Schema); `resolve` checks what needs the
model's block table or the files and expands the grid; `resolved` is the frozen result (`Spec`, with
its features, fingerprint and size); `load` reads a file or a dict through both and raises one
`SpecError` listing every problem, each prefixed by its field path.
"""

from extract.spec.load import SpecError, extension_problem, fingerprint_of_resolved, load_spec, spec_only_adds
from extract.spec.resolved import KNOWN_SPLIT_SIZES, Feature, Spec
from extract.spec.schema import SPEC_VERSION, json_schema

__all__ = [
    "KNOWN_SPLIT_SIZES",
    "SPEC_VERSION",
    "Feature",
    "Spec",
    "SpecError",
    "extension_problem",
    "fingerprint_of_resolved",
    "json_schema",
    "load_spec",
    "spec_only_adds",
]
