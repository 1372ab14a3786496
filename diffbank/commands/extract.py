"""`diffbank extract` and `diffbank store info|verify|export`: thin wrappers over extract.pipeline / extract.store."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from diffbank.commands.options import (
    cluster_options,
    device_option,
    one_cluster,
    quiet,
    spec_device,
    storage_option_option,
)
from diffbank.commands.remote import open_read_only
from extract.hardware import describe_signature
from extract.provenance import to_jsonable

DEFAULT_STORE_DIR = "stores"
log = logging.getLogger(__name__)


@click.command("extract")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option(
    "--store",
    "store_url",
    metavar="PATH_OR_URL",
    help=f"Where to write (a local path or an fsspec URL such as s3://b/x.zarr); "
    f"default {DEFAULT_STORE_DIR}/<spec name>.zarr.",
)
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of recording it.")
@cluster_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images loaded per batch (run-only: the stored bytes do not depend on it).",
)
@device_option(None, spec_device, "auto (default: the spec's), cpu, cuda, cuda:N or mps.")
@click.option(
    "--micro-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Images per U-Net forward; fixed for a store's lifetime (it decides the last bits).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads per process (default 1); fixed for a store's lifetime (it decides the last bits). "
    "For more cores, prefer --workers.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (-q also hides it).")
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Store NaN/inf features instead of refusing the model and stopping at the first such unit.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON on stdout.")
@click.option(
    "--break-lease",
    is_flag=True,
    help="Take over the store from a writer whose lease is stale (no heartbeat for 10 minutes): "
    "only when that run is gone.",
)
@storage_option_option("--store")
def extract_command(
    spec_path: str,
    store_url: str | None,
    strict: bool,
    workers: int | None,
    scheduler: str | None,
    batch_size: int | None,
    device: str | None,
    micro_batch: int | None,
    threads: int | None,
    no_progress: bool,
    allow_nonfinite: bool,
    as_json: bool,
    break_lease: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Extract SPEC's features into a Zarr store. Rerunning the same command resumes an interrupted run."""
    from diffbank.commands.spec import echo_problems
    from extract.compute import ExtractionInterrupted
    from extract.pipeline import ExtractionError
    from extract.spec import SpecError, load_spec
    from extract.store import StoreError
    from extract.store.remote import parse_storage_options
    from extract.store.s3check import check_s3

    try:
        storage_options = parse_storage_options(storage_option)
    except StoreError as exc:
        raise click.UsageError(str(exc)) from None

    one_cluster(workers, scheduler)
    try:
        spec = load_spec(spec_path)  # every problem reported before anything is created
    except SpecError as exc:
        echo_problems(spec_path, exc.problems)
        sys.exit(2)
    url = store_url or f"{DEFAULT_STORE_DIR}/{spec.name}.zarr"
    check_s3(url, storage_options, store_must_exist=False)  # endpoint and bucket, before any work
    resume = f"diffbank extract {spec_path} --store {url}"
    try:
        if workers is not None or scheduler is not None:
            from extract.cluster import extract_distributed
            from extract.pipeline import nothing_to_do
            from extract.store.lease import acquire

            done = nothing_to_do(spec, url, storage_options)
            if done is not None:
                _report_run(done, as_json)
                return
            with acquire(url, storage_options, break_stale=break_lease):  # the client holds it; prepare reuses it
                summary = extract_distributed(
                    spec,
                    url,
                    workers=workers or 1,
                    scheduler=scheduler,
                    strict=strict,
                    progress=not (no_progress or quiet()),
                    batch_size=batch_size,
                    device=device,
                    micro_batch=micro_batch,
                    threads=threads,
                    storage_options=storage_options,
                    allow_nonfinite=allow_nonfinite,
                )
        else:
            from extract.pipeline import extract

            summary = extract(
                spec,
                url,
                strict=strict,
                progress=not (no_progress or quiet()),
                batch_size=batch_size,
                device=device,
                micro_batch=micro_batch,
                threads=threads,
                break_lease=break_lease,
                storage_options=storage_options,
                allow_nonfinite=allow_nonfinite,
            )
    except ExtractionInterrupted:
        log.warning(f"interrupted: finished units are saved in {url}. Resume with:\n  {resume}")
        sys.exit(130)
    except KeyboardInterrupt:
        log.warning("interrupted before any unit was computed")
        sys.exit(130)
    except ExtractionError as exc:
        log.error(f"error: {exc}")
        if exc.resumable:
            log.error(f"units already marked done are kept; after fixing the cause, resume with:\n  {resume}")
        sys.exit(1)
    _report_run(summary, as_json)


def _report_run(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
        return
    rate = summary.get("images_per_s")
    log.info(
        f"{summary['store']}: computed {len(summary['units_computed'])} unit(s) {summary['units_computed']}, "
        f"{len(summary['units_already_done'])} already done; {summary['images']} images in {summary['seconds']:.1f} s"
        + (f" ({rate:.1f} images/s, U-Net {summary['model_seconds']:.1f} s)" if rate else "")
    )
    if summary["failures"]:
        log.warning(f"{len(summary['failures'])} image(s) failed and are marked invalid (rows zero-filled):")
        for f in summary["failures"][:10]:
            log.warning(f"  - [{f['index']}] {f.get('id', '')}: {f['reason']}")
    log.info("complete" if summary.get("complete") else "incomplete: rerun the same command to finish")


# ---------------------------------------------------------------------------------------------
# diffbank store ...
# ---------------------------------------------------------------------------------------------


@click.group("store")
@storage_option_option()
def store_command(storage_option: tuple[str, ...]) -> None:
    """Inspect, verify, export and copy feature stores (nothing under STORE or SRC is written).

    --storage-option goes after the subcommand (`store verify URL --storage-option K=V`); given here, before
    it, it applies to the subcommand too.
    """


@store_command.command("info")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@storage_option_option()
def info_command(store: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """Features (dims, pooling, chunks, completeness), samples, splits and provenance of STORE."""
    from dask.utils import format_bytes

    from extract.store import info

    s = info(open_read_only(store, storage_option))
    if as_json:
        click.echo(json.dumps(to_jsonable(s), indent=2))
        return
    size = format_bytes(s["bytes_on_disk"]) if s["bytes_on_disk"] is not None else "n/a (remote)"
    click.echo(f"{s['url']}  format {s['format_version']}  diffbank {s['diffbank_version']}  created {s['created']}")
    click.echo(f"fingerprint {s['fingerprint']}  checkpoint sha256 {s['checkpoint_sha256']}")
    for machine in s["machines"]:
        units = "" if machine["units"] is None else f" ({len(machine['units'])} of {s['num_units']} units)"
        click.echo(f"written on {describe_signature(machine['signature'])}{units}")
    click.echo(
        f"{s['num_samples']} samples, {s['num_failures']} failed; units of {s['shard_rows']} rows: "
        f"{s['num_units']}; {'complete' if s['complete'] else 'INCOMPLETE'}; {size} on disk "
        f"({s['compression']})"
    )
    click.echo("splits: " + (", ".join(f"{k} {v}" for k, v in s["splits"].items()) or "none"))
    # max|x| is over the finite values; inf and nan count the rest (an all-NaN feature shows max|x| 0).
    header = (
        f"{'feature':<24} {'shape (N, C, h, w)':<22} {'dtype':<8} {'module':<18} {'res':>4} {'done':>9} "
        f"{'max|x|':>10} {'inf':>5} {'nan':>5}"
    )
    click.echo(header)
    click.echo("-" * len(header))
    for f in s["features"]:
        stats = f["stats"] or {}
        max_abs = stats.get("max_abs")
        click.echo(
            f"{f['name']:<24} {str(tuple(f['shape'])):<22} {f['dtype']:<8} {str(f['module']):<18} "
            f"{str(f['resolution']):>4} {f['units_done']}/{f['units']:<7} "
            f"{'' if max_abs is None else f'{max_abs:.4g}':>10} {stats.get('n_inf', ''):>5} "
            f"{stats.get('n_nan', ''):>5}"
        )


@store_command.command("verify")
@click.argument("store", metavar="STORE")
@click.option("--full", is_flag=True, help="Also read every value and compare NaN/inf counts with the records.")
@storage_option_option()
def verify_command(store: str, full: bool, storage_option: tuple[str, ...]) -> None:
    """Check markers, shapes, dtypes and the fingerprint of STORE; exit 1 on any problem."""
    from extract.spec import fingerprint_of_resolved
    from extract.store import verify

    report = verify(open_read_only(store, storage_option), full_scan=full, fingerprint_of_spec=fingerprint_of_resolved)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


@store_command.command("export")
@click.argument("store", metavar="STORE")
@click.argument("out", metavar="OUT.h5", type=click.Path(dir_okay=False))
@click.option(
    "--compression",
    type=click.Choice(["gzip", "lzf", "none"]),
    default="gzip",
    show_default=True,
    help="gzip reads everywhere but writes slowly; lzf and none write fast.",
)
@click.option("--feature", "features", multiple=True, help="Export only these features (repeatable).")
@click.option("--keep-dtype", is_flag=True, help="Keep the stored dtype (float16) instead of float32.")
@storage_option_option()
def export_command(
    store: str, out: str, compression: str, features: tuple[str, ...], keep_dtype: bool, storage_option: tuple[str, ...]
) -> None:
    """Copy STORE into one HDF5 file (float32, attributes as JSON), shard by shard."""
    from extract.store import export_hdf5

    fs = open_read_only(store, storage_option)
    try:
        path = export_hdf5(
            fs,
            out,
            compression=None if compression == "none" else compression,
            features=list(features) or None,
            keep_dtype=keep_dtype,
        )
    except KeyError as exc:  # a --feature the store does not hold
        raise click.BadParameter(str(exc.args[0]), param_hint="'--feature'") from None
    click.echo(f"wrote {path}")


@store_command.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option(
    "--resume", is_flag=True, help="Continue a copy: objects already at DST with the same size and hash stay."
)
@click.option(
    "--src-option",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for SRC only (repeatable), after --storage-option.",
)
@click.option(
    "--dst-option",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for DST only (repeatable), after --storage-option.",
)
@click.option(
    "--workers",
    "copy_workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Objects copied at once.",
)
@click.option("--full", is_flag=True, help="Then verify DST reading every value (`store verify --full`).")
@storage_option_option("SRC and DST")
def copy_command(
    src: str,
    dst: str,
    resume: bool,
    src_option: tuple[str, ...],
    dst_option: tuple[str, ...],
    copy_workers: int,
    full: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Copy the store SRC to DST (local paths or fsspec URLs: s3://, gs://, ...), writing DST only.

    Data objects first, then progress markers, then metadata with the root's last: a copy stopped
    midway leaves no store at DST, and `--resume` finishes it. Every object is read back and compared
    with the source by size and SHA-256.
    """
    from extract.spec import fingerprint_of_resolved
    from extract.store import StoreError, verify
    from extract.store.copy import copy_store
    from extract.store.layout import is_local
    from extract.store.remote import parse_storage_options
    from extract.store.s3check import check_s3

    try:
        # Options are for remote ends: a local path takes none. storage_option holds those given on `store` too.
        src_options = None if is_local(src) else parse_storage_options((*storage_option, *src_option))
        dst_options = None if is_local(dst) else parse_storage_options((*storage_option, *dst_option))
    except StoreError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        check_s3(src, src_options)
        check_s3(dst, dst_options, store_must_exist=False)
        summary = copy_store(
            src, dst, src_options=src_options, dst_options=dst_options, resume=resume, workers=copy_workers
        )
    except (StoreError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    report = verify(dst, full_scan=full, fingerprint_of_spec=fingerprint_of_resolved, storage_options=dst_options)
    click.echo(f"{summary.copied} objects copied, {summary.skipped} already there, of {summary.objects}; {report}")
    if not report.ok:
        sys.exit(1)
