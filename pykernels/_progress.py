"""Progress on long work: tqdm bars on stderr, the one way pykernels shows progress.

tqdm renders in terminals, notebooks and logs alike; results and tables stay plain text
on stdout. `enabled=None` shows the bar only when stderr is a terminal (tqdm's disable=None).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

from tqdm.auto import tqdm


def progress_bar(total: Optional[int], desc: str, enabled: Optional[bool] = None, unit: str = "it") -> tqdm:
    """A bar on stderr for `total` steps (None: a counter); close it, or use it as a context manager."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=None if enabled is None else not enabled,
        dynamic_ncols=True,
    )


def progress_callback(desc: str, unit: str = "it") -> Callable[[int, int], None]:
    """For loops that report (done, total): one bar, opened at the first report, closed when done == total."""
    bar: Optional[tqdm] = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, desc, enabled=True, unit=unit)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
