"""`diffbank analyze ...`: analyses of a store's features (thin click wrappers; the logic is in probe)."""

from __future__ import annotations

import click

from diffbank.commands.options import memory_budget_option, seed_option, storage_option_option
from diffbank.commands.remote import open_read_only


@click.group("analyze")
def analyze_command():
    """Analyses of a store's features."""


@analyze_command.command("cka")
@click.argument("store")
@click.option(
    "--vs",
    "other",
    default=None,
    metavar="OTHER_STORE",
    help="Compare with this store's features, on shared sample ids.",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for cka.json and cka.png."
)
@click.option("--split", default=None, help="Rows of this split only (default: every valid row).")
@click.option(
    "--feature", "features", multiple=True, help="Feature of STORE (repeatable; default: every center-view feature)."
)
@click.option("--vs-feature", "other_features", multiple=True, help="Feature of OTHER_STORE (repeatable).")
@click.option("--batch-size", type=click.IntRange(min=4), default=512, show_default=True, help="Rows per minibatch.")
@memory_budget_option("Bytes, 2GiB, 25% (default 25% of RAM); bounds the minibatch and the read window.")
@seed_option(0, "Seed of the row shuffle that makes the minibatches.")
@storage_option_option()
def cka_command(
    store, other, out_dir, split, features, other_features, batch_size, memory_budget, seed, storage_option
):
    """Linear CKA between every pair of STORE's features (or against OTHER_STORE's): a heat map and a JSON."""
    from probe.cka_stores import store_cka

    result = store_cka(
        open_read_only(store, storage_option),
        open_read_only(other, storage_option) if other else None,
        split=split,
        features=features,
        other_features=other_features,
        batch_size=batch_size,
        memory_budget=memory_budget,
        seed=seed,
    )
    record, image = result.save(out_dir)
    click.echo(
        f"CKA of {len(result.row_features)} x {len(result.col_features)} features on {result.rows} rows "
        f"({result.batches} minibatches of {result.batch_size}) -> {record}" + (f", {image}" if image else "")
    )
