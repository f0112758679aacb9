"""The stage schema: tags, parsing, validation, rendering and answer matching.

This is the only module that spells the stage tags. Every answer is four
tagged stages, in this order, each exactly once::

    <SUMMARY> how I will approach the problem </SUMMARY>
    <CAPTION> what in the image matters for the question </CAPTION>
    <REASONING> step-by-step logic </REASONING>
    <CONCLUSION> the final answer </CONCLUSION>

Tags are case-sensitive: ``<summary>`` is ordinary text (it is an HTML tag
that code in a reasoning stage may well contain).
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

__all__ = [
    "STAGES",
    "StagedTrace",
    "TraceFormatError",
    "answers_match",
    "close_tag",
    "open_tag",
    "parse_trace",
]

STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")

_TAG_RE = re.compile(r"<(/?)(" + "|".join(STAGES) + r")>")


def open_tag(stage: str) -> str:
    """``"SUMMARY"`` -> ``"<SUMMARY>"``."""
    return f"<{_check_stage(stage)}>"


def close_tag(stage: str) -> str:
    """``"SUMMARY"`` -> ``"</SUMMARY>"``."""
    return f"</{_check_stage(stage)}>"


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return stage


class TraceFormatError(ValueError):
    """A text that is not a well-formed four-stage trace.

    Attributes:
        problems: every problem found, in text order; the message leads with the first.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        more = len(self.problems) - 1
        msg = self.problems[0] + (f" (and {more} more problem{'s' * (more > 1)}: "
                                  + "; ".join(self.problems[1:]) + ")" if more else "")
        super().__init__(msg)


@dataclasses.dataclass(frozen=True)
class StagedTrace:
    """One four-stage answer. Fields hold the stripped text of each stage.

    ``problems`` is empty for a strictly valid trace; ``parse_trace(strict=False)``
    fills it with what it had to repair. It does not take part in equality.
    """

    summary: str
    caption: str
    reasoning: str
    conclusion: str
    problems: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def render(self) -> str:
        """The canonical text: ``<TAG> content </TAG>`` blocks joined by a blank line."""
        return "\n\n".join(f"{open_tag(s)} {self.stage(s)} {close_tag(s)}" for s in STAGES)

    def stage(self, name: str) -> str:
        """Content of stage ``name`` (``"SUMMARY"`` ... ``"CONCLUSION"``)."""
        return getattr(self, _check_stage(name).lower())

    def as_dict(self) -> dict[str, str]:
        """``{"summary": ..., "caption": ..., "reasoning": ..., "conclusion": ...}``."""
        return {s.lower(): self.stage(s) for s in STAGES}

    @property
    def answer(self) -> str:
        """The final answer: the conclusion without a leading "The answer is"-style phrase."""
        return _strip_answer_phrase(self.conclusion.strip())

    @property
    def ok(self) -> bool:
        """True when the trace needed no repair."""
        return not self.problems


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {col}"


def _snippet(s: str, width: int = 40) -> str:
    s = " ".join(s.split())
    return repr(s if len(s) <= width else s[: width - 3] + "...")


def _scan(text: str) -> tuple[dict[str, str], list[str]]:
    """Walk the tags once; return recovered stage contents and problems in text order."""
    problems: list[str] = []
    contents: dict[str, str] = {}
    tags = list(_TAG_RE.finditer(text))
    if not tags:
        raise TraceFormatError([f"no stage tags found (expected {', '.join(open_tag(s) for s in STAGES)})"])
    open_stage: str | None = None
    open_at = 0  # start of the open tag
    body_at = 0  # first character of the open stage's content
    last_end = 0  # end of the last closing tag (or of an implicitly closed stage)
    last_index = -1  # STAGES index of the last opened stage

    def outside(lo: int, hi: int) -> None:
        if text[lo:hi].strip():
            stray = text[lo:hi]
            at = lo + len(stray) - len(stray.lstrip())
            problems.append(f"text outside the tags at {_where(text, at)}: {_snippet(stray)}")

    def finish(stage: str, body: str, at: int) -> None:
        if not body.strip():
            problems.append(f"empty stage {open_tag(stage)} at {_where(text, at)}")
        contents.setdefault(stage, body.strip())

    for m in tags:
        closing, stage = m.group(1) == "/", m.group(2)
        tag = m.group(0)
        if not closing:
            if open_stage is not None:
                closer = close_tag(open_stage)
                if closer in text[m.end():]:
                    problems.append(f"tag {tag} at {_where(text, m.start())} is nested inside "
                                    f"{open_tag(open_stage)} opened at {_where(text, open_at)}")
                else:
                    problems.append(f"unclosed {open_tag(open_stage)} opened at {_where(text, open_at)} "
                                    f"(next tag {tag} at {_where(text, m.start())})")
                finish(open_stage, text[body_at:m.start()], open_at)
                last_end = m.start()
            else:
                outside(last_end, m.start())
            index = STAGES.index(stage)
            if stage in contents:
                problems.append(f"duplicate {tag} at {_where(text, m.start())}")
            elif index < last_index:
                problems.append(f"wrong order: {tag} at {_where(text, m.start())} comes after "
                                f"{open_tag(STAGES[last_index])}")
            last_index = max(last_index, index)
            open_stage, open_at, body_at = stage, m.start(), m.end()
        elif open_stage is None:
            problems.append(f"stray closing tag {tag} at {_where(text, m.start())} closes no open stage")
            outside(last_end, m.start())
            last_end = m.end()
        elif stage != open_stage:
            problems.append(f"closing tag {tag} at {_where(text, m.start())} does not match "
                            f"{open_tag(open_stage)} opened at {_where(text, open_at)}")
            finish(open_stage, text[body_at:m.start()], open_at)
            open_stage, last_end = None, m.end()
        else:
            finish(stage, text[body_at:m.start()], open_at)
            open_stage, last_end = None, m.end()
    if open_stage is not None:
        problems.append(f"unclosed {open_tag(open_stage)} opened at {_where(text, open_at)} "
                        "(text ends inside it)")
        finish(open_stage, text[body_at:], open_at)
    else:
        outside(last_end, len(text))
    missing = [open_tag(s) for s in STAGES if s not in contents]
    if missing:
        problems.append(f"missing stage{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return contents, problems


def parse_trace(text: str, strict: bool = True) -> StagedTrace:
    """Parse a four-stage trace.

    Args:
        text: the model's or teacher's output. Stage contents may hold anything
            but the four tags themselves (``<``, ``>``, math, code, any script,
            CRLF line ends, any length); surrounding whitespace is ignored.
        strict: raise on any problem. With ``strict=False`` return what can be
            recovered (an unclosed stage runs to the next tag or the end; a
            duplicate keeps its first occurrence; missing stages are empty) and
            list the repairs in ``.problems``.

    Returns:
        A ``StagedTrace`` with stripped contents.

    Raises:
        TraceFormatError: with ``strict=True``, on a missing, duplicate, out of
            order, unclosed, nested or empty stage, a stray closing tag, or text
            outside the tags; the message names the problem and its line and
            column. With ``strict=False``, only when no stage has any content.

    Example:
        >>> parse_trace("<SUMMARY> a </SUMMARY><CAPTION> b </CAPTION>"
        ...             "<REASONING> c </REASONING><CONCLUSION> d </CONCLUSION>").answer
        'd'
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_trace expects a str, got {type(text).__name__}")
    contents, problems = _scan(text)
    if problems and (strict or not any(contents.values())):
        raise TraceFormatError(problems)
    return StagedTrace(*(contents.get(s, "") for s in STAGES), problems=tuple(problems))


# ----------------------------------------------------------------------------
# Answer matching
# ----------------------------------------------------------------------------

_ANSWER_PHRASE_RE = re.compile(
    r"^(?:(?:so|thus|therefore|hence)[,\s]+)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)?"
    r"(?:answer|option|choice)\s*(?:is|:|=|would be|should be)\s*[:\-]?\s*",
    re.IGNORECASE,
)
_WRAP_CHARS = "\"'`*_“”‘’「」"
_TRAILING_PUNCT = ".,;:!?。，；：！？"
_LETTER_RE = re.compile(
    r"^(?:option|choice)?\s*(?:\(([a-z])\)|\[([a-z])\]|([a-z])(?:[.):,]|\s*$))(?:\s|$)", re.IGNORECASE
)
_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(rf"^(?:[a-z]\s*=\s*)?({_NUMBER})\s*(%|°|[^\d\s][^\d\s]*(?:\s[^\d\s]+)?)?$", re.IGNORECASE)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
# not "right"/"wrong" (directions and judgements are answers of their own: "right" is no "yes"), nor "y"/"n"
_YES = {"yes", "true", "correct"}
_NO = {"no", "false", "incorrect"}


def _strip_answer_phrase(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _ANSWER_PHRASE_RE.sub("", s, count=1).strip()
    return s


def _normalize(s: str) -> str:
    s = " ".join(str(s).split())
    s = _strip_answer_phrase(s)
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip(_WRAP_CHARS).rstrip(_TRAILING_PUNCT).strip()
    return s.casefold()


def _letter(s: str) -> str | None:
    m = _LETTER_RE.match(s)
    if m:
        return next(g for g in m.groups() if g).upper()
    return None


def _number(s: str) -> Fraction | float | None:
    if s in _NUMBER_WORDS:
        return Fraction(_NUMBER_WORDS[s])
    m = _NUMBER_RE.match(s)
    if not m:
        return None
    raw = m.group(1).replace(",", "").replace("−", "-")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            return Fraction(num) / Fraction(den) if float(den) != 0 else None
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def _yes_no(s: str) -> str | None:
    first = re.split(r"[\s,.;:!]", s, maxsplit=1)[0]
    if first in _YES:
        return "yes"
    if first in _NO:
        return "no"
    return None


def answers_match(pred: str, gold: str, choices: dict[str, str] | None = None) -> bool:
    """Whether a predicted answer agrees with the standard answer.

    Both sides are normalised first: whitespace collapsed, case ignored, a
    leading "the answer is" / "answer:" / "so the final answer is" phrase
    dropped, wrapping quotes, backticks and markdown emphasis removed, and
    trailing punctuation (``. , ; : ! ?`` and full-width forms) ignored. Then
    the first rule that applies decides:

    1. Equal normalised text matches.
    2. Multiple choice: when the gold answer is an option letter in any common
       spelling (``B``, ``B.``, ``(B)``, ``B)``, ``B: 5 MPa``, ``Option B``),
       the prediction must name the same letter in one of those spellings. With
       ``choices`` (``{"A": "3 MPa", "B": "5 MPa"}``) the option's text also
       counts, so ``"5 MPa"`` matches gold ``B``.
    3. Numbers: when the gold answer is a number (optionally with a unit or
       ``%``), the prediction must be a single number with an optional unit and
       equal in value: ``5`` = ``5.0`` = ``5 MPa`` = ``five``, ``1/2`` = ``0.5``,
       ``1,000`` = ``1000`` (relative tolerance 1e-6). Units are not compared.
    4. Yes/no: when the gold answer is yes/no (or true/false, correct/incorrect),
       the prediction's first word decides (``"Yes, there is one."`` is yes).

    Args:
        pred: predicted answer (a trace's conclusion, or any text).
        gold: the standard answer.
        choices: optional map from option letter to option text.

    Returns:
        True when they agree under the rules above.

    Example:
        >>> answers_match("The answer is (B).", "B"), answers_match("5.0 MPa", "5")
        (True, True)
    """
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    gold_letter = _letter(g)
    if gold_letter is not None and (len(g) <= 2 or g[1:2] in ".):" or g.startswith(("(", "[", "option", "choice"))):
        if _letter(p) == gold_letter:
            return True
        if choices:
            text = {k.upper(): _normalize(v) for k, v in choices.items()}.get(gold_letter)
            return text is not None and (p == text or _numbers_equal(p, text))
        return False
    if _numbers_equal(p, g):
        return True
    gold_yn = _yes_no(g) if g.split()[0] == g or g in _YES | _NO else None
    if gold_yn is not None:
        return _yes_no(p) == gold_yn
    return False


def _numbers_equal(p: str, g: str) -> bool:
    gv, pv = _number(g), _number(p)
    if gv is None or pv is None:
        return False
    return math.isclose(float(pv), float(gv), rel_tol=1e-6, abs_tol=1e-9)
