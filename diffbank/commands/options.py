"""The options commands share, each defined once, and the callbacks that check option values.

One grammar: a common option (`--storage-option`, `-q/--quiet`, `-v/--verbose`, `--device`, `--memory-budget`,
`--seed`, `--workers`/`--scheduler`) is written after the subcommand, by every command that uses it. A group that took it before keeps
taking it (`diffbank -q ...`, `diffbank store --storage-option K=V verify ...`): a value given on a group
reaches its commands, where a repeatable option adds to it and a single-valued one given again overrides it.

A value is checked when the command line is parsed, so a bad one is a usage error (exit status 2) named after
its option, before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click
from click.core import ParameterSource

from diffbank.status import configure_logging

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
Callback = Callable[[click.Context, click.Parameter, Any], Any]

# The names of the common options, as click stores them (the test of the grammar walks commands for these).
COMMON_OPTIONS = ("storage_option", "quiet", "verbose", "device", "memory_budget", "seed", "workers", "scheduler")
_GIVEN_ON_GROUPS = "diffbank.common_options"


def checked(parse: Callable[[str], Any]) -> Callback:
    """A callback that keeps the value as given once `parse` accepts it (None passes); a ValueError from
    `parse` becomes a usage error with its message."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return value
        try:
            parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        return value

    return callback


def _spec_device(value: str) -> None:
    from extract.spec.fields import device_problem

    problem = device_problem(value)
    if problem:
        raise ValueError(problem)


def _torch_device(value: str) -> None:
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:<index> or mps") from None


def _memory(value: str) -> None:
    from probe.budget import parse_memory

    parse_memory(value)


# --device of the commands that run a spec's model: the spec's compute.device vocabulary.
spec_device = checked(_spec_device)
# --device of probes and model training: any device torch names.
torch_device = checked(_torch_device)


# ------------------------------------------------------------------------------------ shared across levels


def _given_on_groups(ctx: click.Context) -> dict[str, Any]:
    return ctx.find_root().meta.setdefault(_GIVEN_ON_GROUPS, {})


def _shared(check: Callback | None = None, *, repeatable: bool = False) -> Callback:
    """A callback that joins a value given on a group with the one given on its command: a repeatable
    option collects both (the group's first), a single-valued one takes the command's when given there."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if check is not None:
            value = check(ctx, param, value)
        name = str(param.name)
        seen = _given_on_groups(ctx)
        if repeatable:
            seen[name] = (*seen.get(name, ()), *(value or ()))
            return seen[name]
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            seen[name] = value
            return value
        return seen.get(name, value)

    return callback


def storage_option_option(what: str = "STORE") -> Decorator:
    """`--storage-option KEY=VALUE`, collected as the tuple `storage_option`; `what` names the store argument
    in its help. One spelling, one parser (`extract.store.remote.parse_storage_options`)."""
    return click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_shared(repeatable=True),
        help=f"fsspec option for a remote {what} (repeatable): endpoint_url=http://host:9000; dots nest.",
    )


def seed_option(default: int | None = 0, help: str = "Seed of everything random in the run.") -> Decorator:
    return click.option(
        "--seed", type=int, default=default, show_default=default is not None, callback=_shared(), help=help
    )


def device_option(default: str | None, check: Callback = torch_device, help: str = "torch device.") -> Decorator:
    """`--device`; `check` is `torch_device` (any device torch names) or `spec_device` (a spec's vocabulary)."""
    return click.option(
        "--device", default=default, show_default=default is not None, callback=_shared(check), help=help
    )


def memory_budget_option(
    help: str = "Bytes, 2GiB or 25% of RAM (default 25%): features up to it are held in memory.",
) -> Decorator:
    return click.option("--memory-budget", default=None, callback=_shared(checked(_memory)), help=help)


def cluster_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--workers N` (a local dask cluster of N worker processes) and `--scheduler ADDR` (an existing dask
    scheduler), for the commands that spread their work over dask workers (extra `cluster`)."""
    func = click.option(
        "--scheduler",
        metavar="ADDR",
        default=None,
        callback=_shared(),
        help="Run on an existing dask scheduler (tcp://host:8786).",
    )(func)
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        callback=_shared(),
        help="Run on a local dask cluster of N worker processes.",
    )(func)


def one_cluster(workers: int | None, scheduler: str | None) -> None:
    """--workers and --scheduler exclude each other: a usage error before any work."""
    if workers is not None and scheduler is not None:
        raise click.UsageError("give --workers or --scheduler, not both")


# --------------------------------------------------------------------------------------------- verbosity

_VERBOSITY = "diffbank.verbosity"


def _counted(ctx: click.Context, param: click.Parameter, value: int) -> int:
    counts = ctx.find_root().meta.setdefault(_VERBOSITY, {"verbose": 0, "quiet": 0})
    counts[str(param.name)] += value or 0
    configure_logging(counts["verbose"] - counts["quiet"])
    return counts[str(param.name)]


def _verbosity_options() -> list[click.Option]:
    """-v and -q, counted over the whole command line: `diffbank -q probe knn ... -q` is quieter still."""
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_counted,
            help="More status messages (debug details); repeatable.",
        ),
        click.Option(
            ["-q", "--quiet"],
            count=True,
            expose_value=False,
            callback=_counted,
            help="Fewer status messages: warnings and errors only, no progress bars or per-epoch lines.",
        ),
    ]


def add_verbosity_options(command: click.Command) -> None:
    """Give `command` and every command under it -v/--verbose and -q/--quiet (once each)."""
    for cmd in _walk(command):
        have = {p.name for p in cmd.params}
        cmd.params.extend(p for p in _verbosity_options() if p.name not in have)


def _walk(command: click.Command) -> Iterable[click.Command]:
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def quiet() -> bool:
    """Whether -q was given anywhere on the command line being run."""
    ctx = click.get_current_context()
    return ctx.find_root().meta.get(_VERBOSITY, {}).get("quiet", 0) > 0
