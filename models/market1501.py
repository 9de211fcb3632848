"""The Market-1501 file-name rule, shared by training's loaders and the service's import.

"0002_c1s1_000451_03.jpg" (Market-1501), "0001_c2_f0046182.jpg" (DukeMTMC-reID),
"-1_c1s1_...": person id, then camera. Person id -1 is junk, 0 a distractor.
"""

from __future__ import annotations

import re

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
JUNK_PID, DISTRACTOR_PID = -1, 0
_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def parse_name(name: str) -> tuple[int, int] | None:
    """(person id, camera) from a Market-1501 / DukeMTMC-reID file name, None if it has neither."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_identity(pid: int) -> bool:
    """Junk and distractors are not people to enroll or train on."""
    return pid not in (JUNK_PID, DISTRACTOR_PID)
