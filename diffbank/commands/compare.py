"""`diffbank probe compare RUN_A RUN_B [...]`: paired tests between probe runs, from their files only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from probe.options import COMPARE_SPLITS
from probe.report import format_table


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(COMPARE_SPLITS), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="also write the JSON report to this file")
def compare_command(runs: tuple[str, ...], split: str, as_json: bool, out_file: str | None) -> None:
    """Paired comparison of probe runs (RUN_A RUN_B [RUN_C ...]): accuracies, the difference with a 95%
    interval, discordant counts and the exact McNemar p for every pair (Holm-adjusted p when several)."""
    # Imported when run: probe.compare pulls scipy (1.2 s measured), which --help would pay otherwise.
    from probe.compare import CompareError, compare_runs

    try:
        report = compare_runs(list(runs), split)
    except CompareError as exc:
        raise click.ClickException(str(exc)) from exc
    text = json.dumps(report, indent=1)
    if out_file:
        Path(out_file).write_text(text + "\n")
    if as_json:
        click.echo(text)
        return
    rows = [
        {
            "A": p["a"],
            "B": p["b"],
            "n": p["n"],
            "A top1": p["accuracy_a"],
            "B top1": p["accuracy_b"],
            "A-B": p["difference"],
            "95% CI": f"[{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]",
            "only A": p["only_a"],
            "only B": p["only_b"],
            "McNemar p": f"{p['mcnemar_p']:.3g}",
            **({"Holm p": f"{p['holm_p']:.3g}"} if len(report["pairs"]) > 1 else {}),
        }
        for p in report["pairs"]
    ]
    click.echo(format_table(rows, title=f"paired on {split}", percent=("A top1", "B top1", "A-B")))
    click.echo(f"\n95% CI: {report['interval']}; p: {report['test']}")
    if "multiple_comparisons" in report:
        click.echo(report["multiple_comparisons"])
