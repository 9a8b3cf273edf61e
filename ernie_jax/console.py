"""What the command-line entry points print: our own log lines, on their own lines, around progress bars.

Orbax imports absl, whose logging setup claims the root logger before ours runs, so `logging.basicConfig` does
nothing and INFO lines ("Resumed from ...", the parameter count, "Exported to ...") were lost. The project's
loggers get their own handler instead. It writes through `tqdm.write`, which moves an active progress bar out of
the way, so a warning never lands glued to the end of the bar's line.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

PROJECT_LOGGERS = ("ernie_jax", "sharding", "pallas_kernels", "configs", "benchmarks")


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Idempotent: one TqdmHandler on each project logger, which then stops propagating to absl's root handler."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
            handler = TqdmHandler()
            handler.setFormatter(formatter)
            logger.addHandler(handler)


def fail(message: str, code: int) -> int:
    """One line on stderr for an error the user can fix (no traceback); returns the exit code."""
    tqdm.write(f"error: {message}", file=sys.stderr)
    return code
