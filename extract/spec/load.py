"""Reading a spec (a YAML file or a dict): schema, then resolution, every problem reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from extract.spec.document import SpecFileError, read_document
from extract.spec.fields import Problems, name_problem, type_name
from extract.spec.resolve import resolve
from extract.spec.resolved import Feature, Spec
from extract.spec.schema import REQUIRED_SECTIONS, SECTION_MODELS, SECTIONS, TOP_KEYS, SpecDocument
from extract.spec.schema_errors import problems

MAX_PROBLEMS = 50  # listed one per line; a document with thousands of bad keys still gives a readable answer


class SpecError(ValueError):
    """A spec with problems; `.problems` lists every one, each starting with its field path."""

    def __init__(self, problems: list[str], source: str | None = None):
        problems = list(problems)
        if len(problems) > MAX_PROBLEMS:
            problems = [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more problem(s)"]
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


def load_spec(
    spec: str | os.PathLike | Mapping[str, Any], *, check_files: bool = True, base_dir: str | os.PathLike | None = None
) -> Spec:
    """Read, validate and resolve a spec (a YAML path or a dict); raise `SpecError` listing every problem.

    `check_files=False` skips the existence checks of the checkpoint and the dataset, so a spec's
    resolution and size can be inspected before the files are at hand. Relative paths (dataset.path,
    model.checkpoint) are resolved against `base_dir`, by default the current working directory, and
    recorded as written, so the fingerprint does not depend on where a checkout lives.
    """
    source: str | None = None
    if isinstance(spec, Mapping):
        raw: Any = spec
        default_name = "spec"
    else:
        path = Path(spec)
        source = str(path)
        try:
            raw = read_document(path)
        except SpecFileError as exc:
            raise SpecError([str(exc)], source) from None
        default_name = path.stem
    if not isinstance(raw, Mapping):
        raise SpecError([f"a spec is a mapping of sections ({', '.join(TOP_KEYS)}), got {type_name(raw)}"], source)
    base = str(Path(base_dir) if base_dir is not None else Path.cwd())
    found: Problems = []
    sections, name = _sections(dict(raw), found)
    if name is None and name_problem(default_name):  # the file's stem stands in for the name
        found.append(("name", f"is not set, and the file name {name_problem(default_name)}: set name"))
    resolved = resolve(sections, name or default_name, base_dir=base, check_files=check_files, problems=found)
    if resolved is None:
        if not found:  # defensive: an unresolved spec always comes with a reported problem
            found.append(("", "the spec could not be resolved"))
        raise SpecError([f"{p}: {m}" if p else m for p, m in _in_document_order(found)], source)
    return resolved


def _sections(raw: dict[str, Any], found: Problems) -> tuple[dict[str, Any], str | None]:
    """Each section's validated model (None where the schema refused it), and the name."""
    try:
        doc = SpecDocument.model_validate(raw)
    except ValidationError as exc:
        found.extend(problems(exc))
    else:
        return {k: getattr(doc, k) for k in SECTIONS}, doc.name
    refused = {_section_of(path) for path, _ in found}
    sections: dict[str, Any] = {}
    for key in SECTIONS:
        present = raw.get(key) is not None
        if key in refused or (key in REQUIRED_SECTIONS and not present):
            sections[key] = None
        else:  # schema-valid on its own: still resolved, so its problems show in the same pass
            sections[key] = SECTION_MODELS[key].model_validate(raw.get(key) or {})
    name = raw.get("name") if "name" not in refused and isinstance(raw.get("name"), str) else None
    return sections, name


def _section_of(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def _in_document_order(found: Problems) -> Problems:
    """Top-level problems first, then section by section; within a section, as found."""
    rank = {key: i for i, key in enumerate(SECTIONS)}
    return sorted(found, key=lambda item: rank.get(_section_of(item[0]), -1))


def spec_only_adds(old_resolved: Mapping[str, Any], new: Spec | Mapping[str, Any]) -> list[Feature] | None:
    """The features `new` adds to a store written from `old_resolved` (a recorded `to_dict()`).

    None when the two differ in anything but added (t, block, pooling) features, or when the new
    spec drops one of the old features; [] when they describe the same features. Run-only settings
    and the name may differ.
    """
    try:
        old = load_spec(old_resolved, check_files=False)
    except SpecError:
        return None
    if not isinstance(new, Spec):
        new = load_spec(new, check_files=False)
    a, b = old.content_dict(), new.content_dict()
    a.pop("features")
    b.pop("features")
    if a != b:
        return None
    old_names = {f.name for f in old.features()}
    new_features = new.features()
    if not old_names <= {f.name for f in new_features}:
        return None
    return [f for f in new_features if f.name not in old_names]


def extension_problem(old_resolved: Mapping[str, Any], new: Spec) -> str:
    """ "" when `new` only adds features to a store written from `old_resolved`, else why not."""
    try:
        added = spec_only_adds(old_resolved, new)
    except Exception as exc:  # a spec it cannot compare is a spec we will not mix into this store
        return str(exc)
    if added is None:
        return "it changes more than the list of (timestep, block, pooling) features, or drops some"
    return ""


def fingerprint_of_resolved(resolved: Mapping[str, Any]) -> str | None:
    """The fingerprint of a recorded spec (`Spec.to_dict()`), or None when it no longer loads."""
    try:
        return load_spec(dict(resolved), check_files=False).fingerprint
    except SpecError:
        return None
