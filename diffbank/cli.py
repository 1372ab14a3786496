"""The `diffbank` command: thin click wrappers over the Python API; no logic lives here."""

from __future__ import annotations

import logging

import click

from diffbank import __version__

# Status messages go through logging (and tqdm for bars) under these loggers; -v / -q set their level.
STATUS_LOGGERS = ("diffbank", "extract", "probe")


class _StatusHandler(logging.Handler):
    """Status lines on the stderr of the moment (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffbank")
@click.option("-v", "--verbose", count=True, help="More status messages (debug details); repeatable.")
@click.option("-q", "--quiet", count=True, help="Fewer status messages: warnings and errors only.")
def main(verbose: int, quiet: int) -> None:
    """Feature banks from text-free diffusion U-Nets, and the probes that read them.

    \b
    Typical flow:
      diffbank spec check cache_specs/cpu_small.yaml
      diffbank extract cache_specs/cpu_small.yaml --store runs/small.zarr
      diffbank probe sweep runs/small.zarr --out runs/small-probe
    """
    configure_logging(verbose - quiet)


def _register() -> None:
    # Each stage owns its commands; importing them here keeps this file free of logic.
    import importlib

    for module, names in [
        ("diffbank.commands.spec", ("spec",)),
        ("diffbank.commands.extract", ("extract", "store")),
        ("diffbank.commands.model", ("train", "sample")),
        ("diffbank.commands.probe", ("probe",)),
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
