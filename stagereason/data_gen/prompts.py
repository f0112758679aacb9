"""Teacher and judge prompts, from editable templates.

The defaults ship with the package (``stagereason/data_gen/prompts/``); the
recipe folder ``data_gen/prompts/`` holds the same files to copy and edit, and
``--prompt_template`` / ``--judge_template`` point gen at an edited copy.
"""

from __future__ import annotations

import string
from pathlib import Path

from stagereason.data_gen.sources import Example, Turn

__all__ = ["load_template", "teacher_messages", "judge_messages", "language_name"]

_DEFAULTS = Path(__file__).with_name("prompts")
_FIELDS = {
    "teacher": {"question", "choices", "answer", "hints", "conclusion_rule", "language"},
    "judge": {"question", "answer", "candidate"},
}
_LANGUAGES = {
    "en": "English", "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "de": "German", "fr": "French",
    "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian", "ar": "Arabic", "hi": "Hindi",
    "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "vi": "Vietnamese", "th": "Thai", "id": "Indonesian",
}


def language_name(code: str) -> str:
    """``"ja"`` -> ``"Japanese"``; an unknown code is described as such."""
    return _LANGUAGES.get(code.lower().split("-")[0], f"the language with code {code!r}")


def load_template(kind: str, path: str | Path | None = None) -> str:
    """Read a ``teacher`` or ``judge`` template (the packaged default when ``path`` is None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the template uses a field that is not provided.
    """
    path = Path(path) if path else _DEFAULTS / f"{kind}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as err:  # a stray "{" or "}"
        raise ValueError(f"prompt template {path}: {err} (write a literal brace as {{{{ or }}}})") from err
    unknown = used - _FIELDS[kind]
    if unknown:
        raise ValueError(f"prompt template {path} uses unknown field(s) {sorted(f or '{}' for f in unknown)}; "
                         f"available: {sorted(_FIELDS[kind])}")
    return text


def teacher_messages(template: str, example: Example, turn: Turn, image_urls: list[str],
                     language: str = "en") -> list[dict]:
    """The chat messages asking the teacher for a four-stage trace of one turn."""
    choices = ""
    if example.choices and "Options:" not in turn.question:
        choices = "Options:\n" + "\n".join(f"{k}. {v}" for k, v in example.choices.items()) + "\n"
    hints = ""
    if example.hints:
        hints = "\nHints (facts you may rely on):\n" + "\n".join(f"- {h}" for h in example.hints) + "\n"
    rule = " (for multiple choice: the option letter)" if example.choices else ""
    lang = ""
    if language and language.lower() not in ("en", "en-us", "en-gb"):
        lang = (f"\nWrite the content of every stage in {language_name(language)}. Keep the four tags exactly "
                "as written above, and give the final answer in CONCLUSION in the form of the standard answer.")
    text = template.format(question=turn.question, choices=choices, answer=turn.answer, hints=hints,
                           conclusion_rule=rule, language=lang)
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def judge_messages(template: str, question: str, answer: str, candidate: str) -> list[dict]:
    """Messages asking the teacher whether ``candidate`` agrees with the standard ``answer``."""
    text = template.format(question=question, answer=answer, candidate=candidate)
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]
