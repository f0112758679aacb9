"""Verification of a teacher's trace: strict format, no refusal, conclusion agrees with the standard answer."""

from __future__ import annotations

import dataclasses
import re

from stagereason.stages import StagedTrace, TraceFormatError, answers_match, parse_trace

__all__ = ["Verdict", "check_trace", "is_refusal", "REASONS"]

# Reject reasons, by category (the part of a reason before the first colon).
REASONS = ("bad_input", "format", "refusal", "wrong_answer", "teacher_error")

_REFUSAL_RE = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|sorry, (?:but )?i|i can(?:'|no)?t (?:help|assist|determine|answer|"
    r"provide|tell|see|identify)|i (?:am|'m) (?:unable|not able)|unable to (?:determine|answer|tell|identify)|"
    r"can(?:not|'t) be determined|as an ai\b|not possible to (?:determine|tell)|i (?:will|won't) not answer)",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """True when ``text`` declines to answer ("I'm sorry, I can't determine ...")."""
    return bool(_REFUSAL_RE.search(text))


@dataclasses.dataclass
class Verdict:
    """Outcome of one check. ``reason`` is ``category: detail`` when not ok."""

    ok: bool
    reason: str | None = None
    trace: StagedTrace | None = None
    needs_judge: bool = False


def check_trace(text: str, answer: str, choices: dict[str, str] | None = None) -> Verdict:
    """Check one trace against the standard ``answer`` (no judge call; see ``needs_judge``)."""
    try:
        trace = parse_trace(text, strict=True)
    except TraceFormatError as err:
        return Verdict(False, f"format: {err.problems[0]}")
    if is_refusal(trace.conclusion):
        return Verdict(False, f"refusal: {trace.conclusion[:200]}", trace)
    if answers_match(trace.conclusion, answer, choices):
        return Verdict(True, None, trace)
    return Verdict(False, f"wrong_answer: concluded {trace.conclusion[:120]!r}, standard answer {answer[:120]!r}",
                   trace, needs_judge=True)
