"""Open-set decisions: which threshold is in force, and whether the best match is someone known.

Precedence, first that is set: the query's ``threshold=``, then ``REID_MATCH_THRESHOLD``, then
the checkpoint's calibrated threshold. With none of them a query answers as a plain ranking
(threshold and decision null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["query", "setting", "checkpoint"]
Decision = Literal["known", "unknown"]


@dataclass(frozen=True)
class Threshold:
    value: float
    source: Source


def configured_threshold(setting: float | None, calibrated: float | None) -> Threshold | None:
    """The threshold a query gets when it names none (fixed at start-up)."""
    if setting is not None:
        return Threshold(float(setting), "setting")
    if calibrated is not None:
        return Threshold(float(calibrated), "checkpoint")
    return None


def threshold_for_query(per_query: float | None, configured: Threshold | None) -> Threshold | None:
    return Threshold(float(per_query), "query") if per_query is not None else configured


def passes(score: float, threshold: Threshold | None) -> bool | None:
    """score >= threshold; None when no threshold is in force."""
    return None if threshold is None else score >= threshold.value


def decide(best_score: float | None, threshold: Threshold | None) -> Decision | None:
    """"known" when the best match passes, "unknown" when it does not or nothing matched at all."""
    if threshold is None:
        return None
    return "known" if best_score is not None and best_score >= threshold.value else "unknown"
