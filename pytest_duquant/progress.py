"""Progress lines for every phase that takes more than a few seconds (quantize, calibrate, evaluate, ...).

The library is silent by default. A front end turns progress on with `report_to(writer)`: the `duquant`
commands write to stderr, the pytest plugin writes to the terminal past pytest's output capture. Library
code only calls `note(...)` and `steps(...)`, which cost nothing while nobody listens.

    with phase("loading /ckpt", announce=True):   # "loading /ckpt ..." then "... done in 31.0 s"
        ...
    for obs in steps(observations, "calibration", unit="policy calls"):   # silent unless it lasts
        ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
EVERY_S = 5.0  # at most one progress line per loop every EVERY_S seconds

_writer: Callable[[str], None] | None = None


def report_to(writer: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Send progress lines to `writer` (None: silence). Returns the previous writer."""
    global _writer
    previous, _writer = _writer, writer
    return previous


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def reporting_to(writer: Callable[[str], None] | None) -> Iterator[None]:
    previous = report_to(writer)
    try:
        yield
    finally:
        report_to(previous)


def enabled() -> bool:
    return _writer is not None


def note(message: str) -> None:
    if _writer is not None:
        _writer(f"[duquant] {message}")


@contextlib.contextmanager
def phase(message: str, *, announce: bool = False) -> Iterator[None]:
    """A line with the phase's duration when it ends, if it took EVERY_S or more; with `announce` (a phase
    known to be long, e.g. loading a multi-GB checkpoint) also a line when it starts."""
    if _writer is None:
        yield
        return
    start = time.perf_counter()
    if announce:
        note(f"{message} ...")
    yield
    seconds = time.perf_counter() - start
    if announce or seconds >= EVERY_S:
        note(f"{message}: done in {seconds:.1f} s")


def steps(items: Iterable[T], what: str, *, total: int | None = None, unit: str = "") -> Iterator[T]:
    """Yield `items`. With progress on and once the loop has run EVERY_S seconds: a count line at most every
    EVERY_S seconds, then an end line with the duration. Short loops print nothing."""
    if _writer is None:
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    unit = f" {unit}" if unit else ""
    of = f"/{total}" if total is not None else ""
    start = last = time.perf_counter()
    done = 0
    spoke = False
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= EVERY_S and (total is None or done < total):
            note(f"{what}: {done}{of}{unit} ({now - start:.0f} s)")
            last, spoke = now, True
    if spoke:
        note(f"{what}: {done}{of}{unit} done in {time.perf_counter() - start:.1f} s")
