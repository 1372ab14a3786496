"""`diffbank spec check|schema`: validate a spec and show what it would extract, before any work."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


@click.group("spec")
def spec_command() -> None:
    """Inspect and validate extraction specs (cache_specs/*.yaml)."""


def echo_problems(spec_path: str, problems: list[str]) -> None:
    """A refused spec's problems, one per line, on stderr."""
    click.echo(f"{spec_path}: {len(problems)} problem(s)", err=True)
    for problem in problems:
        click.echo(f"  - {problem}", err=True)


@spec_command.command("schema")
@click.option(
    "--markdown", "as_markdown", is_flag=True, help="A markdown table per section instead (docs/spec-schema.md)."
)
def schema_command(as_markdown: bool) -> None:
    """Print the JSON Schema of a spec file (for editors' completion and validation): every field's type,
    default, description and examples."""
    if as_markdown:
        from extract.spec.schema_markdown import markdown

        click.echo(markdown(), nl=False)
        return
    from extract.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@spec_command.command("check")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--no-files",
    is_flag=True,
    help="Skip the checkpoint and dataset existence checks (inspect a spec before the data is at hand).",
)
def check_command(spec_path: str, as_json: bool, no_files: bool) -> None:
    """Validate SPEC; print the resolved spec, its fingerprint, its features and the store size.

    With a checkpoint (and without --no-files), one image runs through the model: a model whose features
    at the spec's taps are not finite is refused, naming the first block that goes non-finite.
    Exits with status 2 and lists every problem when the spec is invalid.
    """
    from extract.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path, check_files=not no_files)
    except SpecError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "spec": spec_path, "problems": exc.problems}, indent=2))
        else:
            echo_problems(spec_path, exc.problems)
        sys.exit(2)
    if spec.model.checkpoint is not None and not no_files:
        from extract.prepare import model_output_problem

        problem = model_output_problem(spec)
        if problem:
            if as_json:
                click.echo(json.dumps({"ok": False, "spec": spec_path, "problems": [problem]}, indent=2))
            else:
                echo_problems(spec_path, [f"model.checkpoint: {problem}"])
            sys.exit(2)

    n, n_note = _count_samples(spec, count_files=not no_files)
    report = _report(spec, n)
    if as_json:
        click.echo(json.dumps({"ok": True, **report, "n_samples_note": n_note}, indent=2))
        return
    _print_text(spec, report, n_note)


def _count_samples(spec: Any, count_files: bool) -> tuple[int | None, str]:
    known = spec.known_num_samples()
    if known is not None:
        return known, "from the dataset's fixed size"
    if not count_files:
        return None, "unknown without the dataset (run without --no-files to count it)"
    from extract.sources import SourceError, open_source

    try:
        return len(open_source(spec.dataset)), "counted in the dataset"
    except (SourceError, OSError) as exc:
        return None, f"could not count: {exc}"


def _report(spec: Any, n: int | None) -> dict[str, Any]:
    per_sample = spec.bytes_per_sample()
    return {
        "name": spec.name,
        "fingerprint": spec.fingerprint,
        "resolved": spec.to_dict(),
        "features": [f.to_dict() for f in spec.features()],
        "bytes_per_sample": per_sample,
        "n_samples": n,
        "estimated_bytes": spec.estimated_bytes(n) if n is not None else None,
        "forwards_per_image": spec.forwards_per_image(),
        "cost": spec.cost_summary(n),
    }


def _print_text(spec: Any, report: dict[str, Any], n_note: str) -> None:
    import yaml
    from dask.utils import format_bytes

    click.echo("# resolved spec")
    click.echo(yaml.safe_dump(report["resolved"], sort_keys=False, default_flow_style=None).rstrip())
    click.echo(f"\nfingerprint: {report['fingerprint']}")
    feats = spec.features()
    click.echo(f"\n{len(feats)} feature(s):")
    rows = [("name", "t", "block", "module", "map", "pool", "view", "shape", "bytes/img")]
    for f in feats:
        rows.append(
            (
                f.name,
                str(f.t),
                str(f.block),
                f.module,
                f"{f.resolution}x{f.resolution}",
                f.pool,
                f.view,
                "x".join(map(str, f.shape)),
                format_bytes(f.nbytes(spec.storage.itemsize)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    click.echo(f"\nper image: {format_bytes(report['bytes_per_sample'])} ({spec.storage.dtype}, uncompressed)")
    n = report["n_samples"]
    if n is None:
        click.echo(f"images: {n_note}")
    else:
        click.echo(f"images: {n} ({n_note})")
        click.echo(
            f"estimated store size: {format_bytes(report['estimated_bytes'])} "
            f"(N · Σ C·p²·itemsize · |T| · views · stored noise draws; lossless compression gains little on features)"
        )
    click.echo(f"compute: {report['cost']}")
