"""Progress bars: live on a terminal, a few plain lines in a log (docker compose logs, CI)."""

from __future__ import annotations

import io

from models.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_progress_is_a_few_whole_lines_not_a_line_per_redraw():
    log = io.StringIO()
    for _ in progress(range(20_000), file=log, desc="importing", unit="identity"):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 1 <= len(lines) <= 3 and "20000/20000" in lines[-1] and lines[-1].startswith("importing")


def test_on_a_terminal_progress_is_a_bar_redrawn_in_place():
    terminal = Terminal()
    for _ in progress(range(20_000), file=terminal, desc="importing", mininterval=0):
        pass
    assert terminal.getvalue().count("\r") > 10


def test_disabled_progress_writes_nothing():
    log = io.StringIO()
    for _ in progress(range(100), file=log, enabled=False):
        pass
    assert log.getvalue() == ""
