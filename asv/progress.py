"""Progress wherever a person waits: a tqdm bar (rate, ETA) on a terminal; in a log file or CI, where a bar's
carriage returns would make a mess, a plain line at most every `every_s` seconds and at the end.
ASV_PROGRESS_EVERY_S sets that interval for every bar (the tests set 0 to see the lines of short jobs)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from asv.errors import ConfigError


def is_terminal() -> bool:
    return sys.stderr.isatty()


def progress(
    iterable: Iterable,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    size=None,
    every_s: float | None = None,
    enabled: bool = True,
) -> Iterator:
    """Iterate with progress shown on stderr (see the module docstring). `size(item)` counts an item as that
    many units (a batch as its utterances); `total` is then in units."""
    if total is None and hasattr(iterable, "__len__") and size is None:
        total = len(iterable)
    if not enabled:
        yield from iterable
        return
    size = size or (lambda item: 1)
    every_s = line_interval() if every_s is None else every_s
    t0 = last = time.time()
    n = 0
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) if is_terminal() else None
    for item in iterable:
        yield item
        n += size(item)
        now = time.time()
        if bar is not None:
            bar.update(size(item))
            continue
        if now - last >= every_s:
            last = now
            print(status_line(desc, n, total, now - t0, unit), file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    elif n and time.time() - t0 >= every_s:  # short jobs stay silent; long ones end with their totals
        print(status_line(desc, n, total, time.time() - t0, unit), file=sys.stderr, flush=True)


def line_interval() -> float:
    """Seconds between plain progress lines: ASV_PROGRESS_EVERY_S, else 30."""
    value = os.environ.get("ASV_PROGRESS_EVERY_S", "30")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"ASV_PROGRESS_EVERY_S={value!r} is not a number of seconds; unset it or set 30") from None


def status_line(desc: str, n: int, total: int | None, seconds: float, unit: str) -> str:
    """`desc: n/total unit (rate/s, ETA h:mm:ss)` — the same figures tqdm shows, as one line."""
    rate = n / max(seconds, 1e-9)
    line = f"{desc}: {n}" + (f"/{total}" if total else "") + f" {unit} ({rate:.2f} {unit}/s"
    if total and n < total:
        line += f", ETA {tqdm.format_interval((total - n) / max(rate, 1e-9))}"
    return line + ")"


class UpdateBar:
    """Training progress on the main process: on a terminal a tqdm bar (updates, updates/s, ETA, last loss) with
    the log lines printed above it; elsewhere just the log lines, one per log step, so log files stay clean."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and is_terminal():
            self.bar = tqdm(total=total, initial=initial, unit="update", dynamic_ncols=True, leave=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def set_loss(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
