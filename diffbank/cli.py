"""The `diffbank` command: thin click wrappers over the Python API; no logic lives here."""

from __future__ import annotations

import logging
import os
import sys

# Read once, when torch loads OpenMP: waiting threads sleep instead of spinning. With spinning
# threads on a shared 2-core machine the U-Net ran 5-8x slower at 2 threads than at 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from diffbank import __version__  # noqa: E402
from diffbank.teardown import silence_abandoned_requests  # noqa: E402
from extract.progress import force_bars, write_clear_of_bars  # noqa: E402

# Status messages go through logging (and tqdm for bars) under these loggers; -v / -q set their level.
STATUS_LOGGERS = ("diffbank", "extract", "probe")


class _StatusHandler(logging.Handler):
    """Status lines on the stderr of the moment (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            write_clear_of_bars(lambda: click.echo(line, err=True))
        except Exception:  # logging must never take a run down
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """verbosity 0: info; > 0: debug; < 0: warnings and errors only."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    for name in STATUS_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _StatusHandler) for h in logger.handlers):
            handler = _StatusHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


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
@click.option("-v", "--verbose", count=True, help="More status messages (debug details); repeatable.")
@click.option("-q", "--quiet", count=True, help="Fewer status messages: warnings and errors only.")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure instead of a one-line error.")
@click.option("--progress", is_flag=True, help="Draw progress bars even when stderr is not a terminal.")
def main(verbose: int, quiet: int, debug: bool, progress: bool) -> None:
    """Feature banks from text-free diffusion U-Nets, and the probes that read them.

    \b
    Typical flow:
      diffbank spec check cache_specs/cpu_small.yaml
      diffbank extract cache_specs/cpu_small.yaml --store runs/small.zarr
      diffbank probe sweep runs/small.zarr --out runs/small-probe
    """
    configure_logging(verbose - quiet)
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


if __name__ == "__main__":
    main()
