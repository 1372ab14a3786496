"""Hostile spec files are refused with exit status 2 and a short, specific message, before they can
expand, recurse or escape: YAML bombs, oversized files, deep nesting, unbounded lists and unsafe names.
(`benchmarks/bench_spec_limits.py` times the bomb and the 50 MB file.)"""

from __future__ import annotations

import pytest
import yaml

from extract.spec import SpecError, load_spec
from extract.spec.document import SPEC_BYTES_ENV

from .conftest import cli, tiny_spec

MAX_OUTPUT = 4000  # characters: a refusal names the problem, it does not echo the document


def billion_laughs(levels: int = 10) -> str:
    """The classic bomb (about 1.5 KB): each level refers to the one below nine times (9**9 strings)."""
    lines = ['l0: &l0 "lol"']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    body = yaml.safe_dump(tiny_spec())
    return "\n".join(lines) + "\n" + body.replace("init_seed: 0", f"init_seed: *l{levels - 1}")


def spec_text(**over) -> str:
    """The tiny spec as YAML; a value "HUGE" is then replaced by `huge` (dumping a huge value is slow)."""
    huge = over.pop("huge", "")
    return yaml.safe_dump(tiny_spec(**over)).replace("HUGE", huge)


def check(path) -> tuple[int, str]:
    result = cli("spec", "check", "--no-files", str(path))
    return result.exit_code, result.output


def test_billion_laughs_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 2000
    status, out = check(path)
    assert status == 2, out
    assert "aliases" in out and len(out) < MAX_OUTPUT


def test_a_single_alias_is_refused_too(tmp_path):
    text = yaml.safe_dump(tiny_spec()).replace("init_seed: 0", "init_seed: &s 0") + "extra: *s\n"
    path = tmp_path / "alias.yaml"
    path.write_text(text)
    status, out = check(path)
    assert status == 2 and "aliases (*name) are not allowed" in out, out


def test_a_50_mb_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:  # a real YAML head and a sparse tail: 50 MB on paper, written at once
        f.write(yaml.safe_dump(tiny_spec()) + "  - 1\n")
        f.truncate(50 * 2**20)
    status, out = check(path)
    assert status == 2, out
    assert f"is {50 * 2**20} bytes" in out and SPEC_BYTES_ENV in out and len(out) < MAX_OUTPUT


def test_the_size_limit_is_overridable(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec()))
    monkeypatch.setenv(SPEC_BYTES_ENV, "100")
    with pytest.raises(SpecError, match="limited to 100 bytes"):
        load_spec(path, check_files=False)
    monkeypatch.setenv(SPEC_BYTES_ENV, "abc")
    with pytest.raises(SpecError, match="expected a positive number of bytes"):
        load_spec(path, check_files=False)
    monkeypatch.setenv(SPEC_BYTES_ENV, str(10 * 2**20))
    assert load_spec(path, check_files=False).name == "faults"


@pytest.mark.parametrize("depth, message", [(40, "nested deeper than 32 levels"), (100_000, "nesting depth")])
def test_deep_nesting_is_refused_without_recursion(tmp_path, depth, message):
    # libyaml refuses flow nesting past 1000 levels itself; below that the spec reader stops at 32
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\nmodel: {flags: {x: " + "[" * depth + "]" * depth + "}}\n")
    status, out = check(path)
    assert status == 2, out
    assert message in out and "Recursion" not in out and len(out) < MAX_OUTPUT


def test_list_lengths_are_bounded(tmp_path):
    # as many timesteps as 1 MiB holds: refused while scanning, long before a list is built
    many = tmp_path / "many.yaml"
    many.write_text(yaml.safe_dump(tiny_spec()).replace("- 10\n", "- 10\n" + "  - 1\n" * 170_000))
    status, out = check(many)
    assert status == 2 and "holds more than 5000 values" in out, out[:500]
    # fewer values, but more timesteps than any schedule is allowed
    spec = tiny_spec(features={"timesteps": list(range(5000))})
    with pytest.raises(SpecError, match=r"features.timesteps: has 5000 items; at most 4096"):
        load_spec(spec, check_files=False)
    # the most a spec may ask for still loads from a file
    longest = tmp_path / "longest.yaml"
    longest.write_text(
        yaml.safe_dump(tiny_spec(model={"diffusion_steps": 4096}, features={"timesteps": list(range(4096))}))
    )
    assert len(load_spec(longest, check_files=False).grid.timesteps) == 4096
    # and never more than the schedule's steps
    spec = tiny_spec(features={"timesteps": list(range(1001))})
    with pytest.raises(SpecError, match=r"features.timesteps: has 1001 entries, more than the 1000 steps"):
        load_spec(spec, check_files=False)


def test_a_huge_value_is_quoted_short(tmp_path):
    path = tmp_path / "big_value.yaml"
    path.write_text(spec_text(storage={"dtype": "HUGE"}, huge="x" * 900_000))
    status, out = check(path)
    assert status == 2 and "storage.dtype: unknown storage dtype 'xxx" in out, out[:500]
    assert "(900000 characters)" in out and len(out) < MAX_OUTPUT


def test_thousands_of_bad_keys_give_a_bounded_list(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({**tiny_spec(), **{f"k{i}": 1 for i in range(2000)}}))
    status, out = check(path)
    assert status == 2 and "more problem(s)" in out and len(out.splitlines()) < 60, out[:500]


@pytest.mark.parametrize(
    "name, message",
    [
        ("../../escaped_by_name", "not a plain file name"),
        ("a/b", "not a plain file name"),
        ("a\\b", "not a plain file name"),
        ("..", "not a plain file name"),
        ("x\0y", "control character"),
        ("line\nbreak", "control character"),
        ("n" * 900_000, "characters long; at most 128"),
    ],
)
def test_unsafe_names_are_refused(tmp_path, name, message):
    path = tmp_path / "named.yaml"
    quoted = name if name.isalnum() else yaml.safe_dump(name).removesuffix("\n...\n").strip()
    path.write_text(spec_text(name="HUGE", huge=quoted))
    status, out = check(path)
    assert status == 2, out
    assert "name: " in out and message in out and len(out) < MAX_OUTPUT


def test_an_unsafe_name_never_reaches_the_filesystem(tmp_path, monkeypatch, no_compute):
    # extract without --store would write stores/<name>.zarr: ../../ would leave stores/
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "escape.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(name="../../escaped_by_name")))
    no_compute()
    result = cli("extract", str(path), "--no-progress")
    assert result.exit_code == 2 and "not a plain file name" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.yaml"]
    assert not (tmp_path.parent / "escaped_by_name.zarr").exists()


def test_a_file_stem_that_is_no_name_must_be_replaced(tmp_path):
    spec = tiny_spec()
    spec.pop("name")
    path = tmp_path / "a\x01b.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="name: is not set, and the file name .* control character"):
        load_spec(path, check_files=False)


def test_a_nul_in_a_path_is_a_spec_problem(tmp_path):
    spec = tiny_spec(model={"checkpoint": "ckpt\0.pt"})
    with pytest.raises(SpecError, match="model.checkpoint: 'ckpt.*holds a NUL byte"):
        load_spec(spec)
