"""`--storage-option KEY=VALUE`, taken by every command that reads or writes a store, and opening a store
read-only with it: one spelling of the flag, one parser (`extract.store.remote.parse_storage_options`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def storage_option_flag(what: str = "STORE") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The option, collected as the tuple `storage_option`; `what` names the store argument in its help."""
    return click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help=f"fsspec option for a remote {what} (repeatable): endpoint_url=http://host:9000; dots nest.",
    )


def open_read_only(url: str, storage_option: tuple[str, ...] | list[str]) -> Any:
    """`open_store(url, options)`; a bad option, URL or store becomes a clean CLI error before any work."""
    from extract.store import StoreError, open_store
    from extract.store.remote import parse_storage_options
    from extract.store.s3check import check_s3

    try:
        options = parse_storage_options(storage_option)
        check_s3(url, options)
        return open_store(url, options)
    except (StoreError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
