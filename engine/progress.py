"""Progress bars for the slow parts of a start (weights read, KV cache allocated): tqdm on stderr when stderr is a
terminal, nothing otherwise (log files, the dashboard's log view and CI get the totals' log lines instead)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """`items`, with a bar while they are consumed; the bar disappears once done (the caller logs the totals)."""
    return iter(tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                     disable=not sys.stderr.isatty(), mininterval=0.25))
