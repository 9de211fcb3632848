"""Progress bars for long work (training, `service import`, `reembed`), one rule for all:
a live bar on a terminal; in a log (docker compose logs, CI, a file) a plain line every
LOG_INTERVAL_S instead of a line per redraw."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw ('\\r' + bar) into one line; blank redraws
    (a bar clearing itself) write nothing."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, enabled: bool = True, file: TextIO | None = None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` drawn on ``file`` (stderr): a bar on a terminal, a line every
    LOG_INTERVAL_S elsewhere, nothing when not ``enabled``."""
    stream = file or sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL_S, ascii=True, **kwargs)
