"""Option callbacks shared by commands: a value is checked when the command line is parsed, so a bad one
is a usage error (exit status 2) named after its option, before any work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def checked(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
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
    from extract.spec.schema import device_problem

    problem = device_problem(value)
    if problem:
        raise ValueError(problem)


def _torch_device(value: str) -> None:
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:<index> or mps") from None


# --device of the commands that run a spec's model: the spec's compute.device vocabulary.
spec_device = checked(_spec_device)
# --device of probes and model training: any device torch names.
torch_device = checked(_torch_device)
