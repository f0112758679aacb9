"""The stage schema: parse/render round trip, every malformed family, answer matching.

Assets: traces are built inline or by hypothesis strategies below.
"""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagereason.stages import (
    STAGES,
    StagedTrace,
    TraceFormatError,
    answers_match,
    close_tag,
    open_tag,
    parse_trace,
)

TAG_RE = re.compile("|".join(re.escape(t) for s in STAGES for t in (open_tag(s), close_tag(s))))


def block(stage, content):
    return f"{open_tag(stage)} {content} {close_tag(stage)}"


def good(**over):
    parts = {"SUMMARY": "plan", "CAPTION": "see", "REASONING": "think", "CONCLUSION": "B"} | over
    return "\n\n".join(block(s, parts[s]) for s in STAGES)


def test_render_is_canonical_and_parses_back():
    t = StagedTrace("I will count.", "Three red circles.", "1, 2, 3.", "3")
    text = t.render()
    assert text == ("<SUMMARY> I will count. </SUMMARY>\n\n<CAPTION> Three red circles. </CAPTION>\n\n"
                    "<REASONING> 1, 2, 3. </REASONING>\n\n<CONCLUSION> 3 </CONCLUSION>")
    assert parse_trace(text) == t
    assert t.answer == "3" and t.ok


def test_contents_may_hold_anything_but_the_tags():
    contents = {
        "SUMMARY": "if a < b and b > c then <summary>html</summary> is fine",
        "CAPTION": "数式 $\\frac{1}{2}$ と図形。\r\nline two\r\n",
        "REASONING": "```python\nprint('<SUMMARY')  # not a tag\n```\n" + "long " * 20000,
        "CONCLUSION": "x² ≥ 0 → <B>",
    }
    t = parse_trace("\n".join(block(s, c) for s, c in contents.items()))
    assert t.summary == contents["SUMMARY"]
    assert t.caption == contents["CAPTION"].strip()
    assert t.reasoning == contents["REASONING"].strip()
    assert t.conclusion == "x² ≥ 0 → <B>"


def test_answer_drops_leading_answer_phrase():
    assert parse_trace(good(CONCLUSION="The answer is B.")).answer == "B."
    assert parse_trace(good(CONCLUSION="Therefore, the final answer is 42")).answer == "42"


MALFORMED = {
    "missing": (good().replace(block("CAPTION", "see"), ""), r"missing stage <CAPTION>"),
    "duplicate": (good() + block("REASONING", "again"), r"duplicate <REASONING> at line 7, column \d+"),
    "order": (
        "\n\n".join(block(s, "x") for s in ("SUMMARY", "REASONING", "CAPTION", "CONCLUSION")),
        r"wrong order: <CAPTION> at line 5, column 1 comes after <REASONING>",
    ),
    "unclosed": (good().replace("</SUMMARY>", ""), r"unclosed <SUMMARY> opened at line 1, column 1 \(next tag <CAPTION>"),
    "unclosed_at_end": (good().replace(" </CONCLUSION>", ""), r"unclosed <CONCLUSION> .* \(text ends inside it\)"),
    "stray": (good().replace("\n\n<CAPTION>", "</SUMMARY>\n\n<CAPTION>"), r"stray closing tag </SUMMARY> at line 1"),
    "mismatched": (good().replace("</CAPTION>", "</REASONING>"), r"closing tag </REASONING> .* does not match <CAPTION>"),
    "nested": (good(SUMMARY="plan " + block("CAPTION", "inner")), r"tag <CAPTION> at line 1, column 16 is nested inside <SUMMARY>"),
    "empty": (good(CAPTION="  \n "), r"empty stage <CAPTION> at line 3, column 1"),
    "text_before": ("Sure! Here you go:\n" + good(), r"text outside the tags at line 1, column 1: 'Sure! Here you go:'"),
    "text_after": (good() + "\nHope this helps", r"text outside the tags at line 8, column 1: 'Hope this helps'"),
    "text_between": (good().replace("\n\n<CAPTION>", "\noops\n<CAPTION>"), r"text outside the tags at line 2, column 1: 'oops'"),
    "no_tags": ("The answer is B.", r"no stage tags found"),
    "lowercase_tags_are_text": (good().replace("SUMMARY>", "summary>"), r"missing stage <SUMMARY>"),
}


@pytest.mark.parametrize("family", list(MALFORMED))
def test_each_malformed_family_raises_with_a_message_naming_problem_and_place(family):
    text, pattern = MALFORMED[family]
    with pytest.raises(TraceFormatError) as info:
        parse_trace(text)
    assert isinstance(info.value, ValueError)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert re.search(pattern, info.value.problems[0]) or any(re.search(pattern, p) for p in info.value.problems)


def test_lenient_parse_recovers_and_lists_problems():
    t = parse_trace("Sure!\n<SUMMARY> plan <CAPTION> see </CAPTION><REASONING> r </REASONING>"
                    "<CONCLUSION> B", strict=False)
    assert t.as_dict() == {"summary": "plan", "caption": "see", "reasoning": "r", "conclusion": "B"}
    assert not t.ok
    assert [p.split()[0] for p in t.problems] == ["text", "unclosed", "unclosed"]
    missing = parse_trace(block("SUMMARY", "s") + block("CONCLUSION", "yes"), strict=False)
    assert (missing.caption, missing.reasoning, missing.answer) == ("", "", "yes")
    assert missing.problems == ("missing stages <CAPTION>, <REASONING>",)
    dup = parse_trace(good() + block("CONCLUSION", "C"), strict=False)
    assert dup.conclusion == "B"  # a duplicate keeps its first occurrence


def test_lenient_parse_still_raises_when_nothing_is_recoverable():
    for text in ["no tags at all", "<SUMMARY> </SUMMARY>", "</CAPTION>"]:
        with pytest.raises(TraceFormatError):
            parse_trace(text, strict=False)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_trace(None)


# --- property tests -------------------------------------------------------

content = st.text(min_size=1, max_size=200).map(str.strip).filter(lambda s: s and not TAG_RE.search(s))
traces = st.builds(StagedTrace, content, content, content, content)


@settings(max_examples=300, deadline=None)
@given(traces)
def test_property_render_parse_round_trip(t):
    assert parse_trace(t.render()) == t
    assert parse_trace(t.render().replace("\n", "\r\n")) == parse_trace(t.render().replace("\n", "\r\n"))


def _blocks(t):
    return [block(s, t.stage(s)) for s in STAGES]


MUTATIONS = {
    "missing": (lambda b, i, j, junk: b[:i] + b[i + 1:], "missing stage"),
    "duplicate": (lambda b, i, j, junk: b + [b[i]], "duplicate"),
    "order": (lambda b, i, j, junk: [b[j] if k == i else b[i] if k == j else x for k, x in enumerate(b)],
              "wrong order"),
    "unclosed": (lambda b, i, j, junk: b[:i] + [b[i].rsplit("</", 1)[0]] + b[i + 1:], "unclosed"),
    "stray": (lambda b, i, j, junk: b[:i] + [close_tag(STAGES[j])] + b[i:], "stray closing tag"),
    "nested": (lambda b, i, j, junk: b[:i] + [b[i].replace(" ", f" {block(STAGES[j], 'x')} ", 1)] + b[i + 1:],
               "nested inside"),
    "empty": (lambda b, i, j, junk: b[:i] + [f"{open_tag(STAGES[i])} \n {close_tag(STAGES[i])}"] + b[i + 1:],
              "empty stage"),
    "outside": (lambda b, i, j, junk: b[:i] + [junk] + b[i:], "text outside the tags"),
}


@settings(max_examples=60, deadline=None)
@given(traces, st.sampled_from(sorted(MUTATIONS)), st.integers(0, 3), st.integers(0, 3), content)
def test_property_every_malformed_family_raises(t, family, i, j, junk):
    if family == "order":
        i, j = min(i, j), max(i, j)
        if i == j:
            j = i + 1 if i < 3 else i - 1
            i, j = min(i, j), max(i, j)
    mutate, expected = MUTATIONS[family]
    text = "\n\n".join(mutate(_blocks(t), i, j, junk))
    with pytest.raises(TraceFormatError) as info:
        parse_trace(text)
    assert expected in info.value.problems[0], (family, info.value.problems)


# --- answer matching ------------------------------------------------------

MATCHES = [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), ("B: 5 MPa", "B"), ("Option B", "B"),
    ("option (b)", "B"), ("The answer is B.", "B"), ("**B**", "B"), ("The correct option is (B)", "B"),
    ("B", "(B)"), ("B", "B. 5 MPa"),
    ("5", "5"), ("5.0", "5"), ("5 MPa", "5"), ("five", "5"), ("1/2", "0.5"), ("0.5", "1/2"), ("1,000", "1000"),
    ("-3", "-3.0"), ("50%", "50"), ("The answer is 12.", "12"), ("x = 4", "4"),
    ("Yes", "yes"), ("yes.", "Yes"), ("Yes, there is one red circle.", "yes"), ("No", "no"), ("true", "yes"),
    ("  Red  ", "red"), ("red.", "Red"), ("A red circle", "a red circle"), ("\"blue\"", "blue"),
]
MISMATCHES = [
    ("C", "B"), ("A cat", "A"), ("(C)", "B"), ("Option C", "B"), ("5 MPa", "B"),
    ("6", "5"), ("5 apples and 3 oranges", "5"), ("0.49", "0.5"), ("fifty", "5"),
    ("No", "yes"), ("Yes", "no"), ("Maybe", "yes"), ("", "B"), ("red", ""), ("blue", "red"),
    # a direction is no yes/no, and a stray letter is no answer
    ("yes", "right"), ("right", "yes"), ("Correct", "right"), ("wrong colour", "no"), ("left", "right"),
    ("n withONiang", "No"), ("y", "yes"),
]


@pytest.mark.parametrize("pred,gold", MATCHES)
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", MISMATCHES)
def test_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_answers_match_option_text_with_choices():
    choices = {"A": "3 MPa", "B": "5 MPa", "C": "7 MPa"}
    assert answers_match("5 MPa", "B", choices)
    assert answers_match("5", "B", choices)
    assert not answers_match("7 MPa", "B", choices)
