"""Logging and progress: the one mechanism the core uses to talk to the user.

The core never prints. It logs through :data:`logger` and wraps long loops in :func:`progress`.
The CLI sets the verbosity (``--verbose``/``--quiet``); progress bars are shown at INFO level on a
terminal (or when forced) and stay silent otherwise. A registered abort check (RELION External jobs)
is polled on every progress step.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger("disca_tools")
T = TypeVar("T")

_abort_checks: list[Callable[[], None]] = []
_force_bars: bool | None = None


def configure(verbose: bool = False, quiet: bool = False, bars: bool | None = None) -> None:
    """Set the log level for the whole package (WARNING when quiet, DEBUG when verbose)."""
    global _force_bars
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    _force_bars = False if quiet else bars


def add_abort_check(check: Callable[[], None]) -> None:
    """Register a callable polled at every progress step; it raises to stop the job."""
    _abort_checks.append(check)


def clear_abort_checks() -> None:
    _abort_checks.clear()


def check_abort() -> None:
    """Poll the registered abort checks (cheap; call it in long loops without a progress bar)."""
    for check in _abort_checks:
        check()


def bars_enabled() -> bool:
    if _force_bars is not None:
        return _force_bars
    return logger.isEnabledFor(logging.INFO) and sys.stderr.isatty()


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterate with a tqdm progress bar (when enabled) and abort polling."""
    bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=not bars_enabled(), leave=False)
    try:
        for item in bar:
            check_abort()
            yield item
    finally:
        bar.close()
