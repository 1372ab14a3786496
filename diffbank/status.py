"""Status messages: logging under the project's loggers, printed clear of progress bars; -v / -q set the level."""

from __future__ import annotations

import logging

import click

from extract.progress import write_clear_of_bars

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
