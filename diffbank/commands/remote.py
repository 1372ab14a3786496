"""Opening a store read-only with the `--storage-option` values of a command
(`diffbank.commands.options.storage_option_option`), as a clean CLI error when it fails."""

from __future__ import annotations

from typing import Any

import click


def open_read_only(url: str, storage_option: tuple[str, ...] | list[str]) -> Any:
    """`open_store(url, options)`; a bad option, URL or store becomes a clean CLI error before any work.

    Options are for remote stores: a local path takes none (as in `store copy`), so options given once for a
    command that reads a local and a remote store, or on the `store` group, do not break the local one. They
    are still parsed, so a malformed one is an error wherever it is given."""
    from extract.store import StoreError, open_store
    from extract.store.layout import is_local
    from extract.store.remote import parse_storage_options
    from extract.store.s3check import check_s3

    try:
        options = parse_storage_options(storage_option)
        if is_local(url):
            options = None
        check_s3(url, options)
        return open_store(url, options)
    except (StoreError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
