"""The `diffbank` command: thin click wrappers over the Python API; no logic lives here."""

from __future__ import annotations

import os
import sys

# Read once, when torch loads OpenMP: waiting threads sleep instead of spinning. With spinning
# threads on a shared 2-core machine the U-Net ran 5-8x slower at 2 threads than at 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from diffbank import __version__  # noqa: E402
from diffbank.commands.options import add_verbosity_options  # noqa: E402
from diffbank.teardown import silence_abandoned_requests  # noqa: E402
from extract.progress import force_bars  # noqa: E402

# Exit statuses: 1 for a run that failed, 2 for a command given wrongly (click's own usage errors too).
EXIT_FAILURE, EXIT_USAGE = 1, 2


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the command or its inputs were given wrongly: exit status 2."""
    from extract.spec import SpecError

    return (SpecError,)


def error_lines(exc: BaseException) -> list[str]:
    """An exception as the lines a user reads: its message, never its traceback."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    lines = text.splitlines()
    if not _is_ours(exc) and not isinstance(exc, OSError):
        lines[0] = f"{type(exc).__name__}: {lines[0]}"
    return lines


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("extract", "probe", "diffbank")


class CleanErrors(click.Group):
    """Every failure ends as a clean message and an exit status, never a traceback (unless --debug)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            lines = error_lines(exc)
            click.echo(f"error: {lines[0]}", err=True)
            for line in lines[1:]:
                click.echo(line, err=True)
            if not _is_ours(exc) and not isinstance(exc, OSError):
                click.echo("(an unexpected error: rerun with --debug for the traceback)", err=True)
            sys.exit(EXIT_USAGE if isinstance(exc, _usage_errors()) else EXIT_FAILURE)


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffbank")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure instead of a one-line error.")
@click.option("--progress", is_flag=True, help="Draw progress bars even when stderr is not a terminal.")
def main(debug: bool, progress: bool) -> None:
    """Feature banks from text-free diffusion U-Nets, and the probes that read them.

    \b
    Typical flow:
      diffbank spec check cache_specs/cpu_small.yaml
      diffbank extract cache_specs/cpu_small.yaml --store runs/small.zarr
      diffbank probe sweep runs/small.zarr --out runs/small-probe
    """
    if progress:
        force_bars()
    if not debug:
        silence_abandoned_requests()


def _register() -> None:
    # Each stage owns its commands; importing them here keeps this file free of logic.
    import importlib

    for module, names in [
        ("diffbank.commands.spec", ("spec",)),
        ("diffbank.commands.extract", ("extract", "store")),
        ("diffbank.commands.model", ("train", "sample", "model")),
        ("diffbank.commands.probe", ("probe",)),
        ("diffbank.commands.analyze", ("analyze",)),
        ("diffbank.demo", ("demo",)),
    ]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            cmd = getattr(mod, f"{name}_command", None)
            if cmd is not None:
                main.add_command(cmd, name)


_register()
# -v and -q are taken by every command, after it as on the groups above it (`diffbank.commands.options`).
add_verbosity_options(main)


if __name__ == "__main__":
    main()
