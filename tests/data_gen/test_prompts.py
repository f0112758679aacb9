"""Prompt templates: packaged defaults equal the recipe copies; fields; every hint verbatim.

Assets: stagereason/data_gen/prompts/*.txt and data_gen/prompts/*.txt.
"""

from pathlib import Path

import pytest

from stagereason.data_gen.prompts import judge_messages, language_name, load_template, teacher_messages
from stagereason.data_gen.sources import Example, Turn

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["teacher", "judge"])
def test_recipe_copies_equal_packaged_defaults(kind):
    assert (ROOT / "data_gen" / "prompts" / f"{kind}.txt").read_text() == load_template(kind)


def test_teacher_prompt_has_question_answer_choices_hints_and_language():
    ex = Example(id="x", images=[], turns=[], hints=["F = m a, exactly.", "g = 9.8 m/s^2 {not a field}"],
                 choices={"A": "1 N", "B": "2 N"})
    turn = Turn(question="What force?", answer="B", human="<image>What force?")
    msgs = teacher_messages(load_template("teacher"), ex, turn, ["data:image/png;base64,AAAA"], language="ja")
    content = msgs[0]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    text = content[1]["text"]
    for piece in ["What force?", "\nB\n", "A. 1 N", "B. 2 N", "- F = m a, exactly.", "- g = 9.8 m/s^2 {not a field}",
                  "Japanese", "<SUMMARY>", "</CONCLUSION>", "option letter"]:
        assert piece in text
    plain = teacher_messages(load_template("teacher"), Example(id="y", images=[], turns=[]), turn, [])
    assert "Hints" not in plain[0]["content"][0]["text"] and "Japanese" not in plain[0]["content"][0]["text"]


def test_judge_prompt_and_unknown_fields(tmp_path):
    text = judge_messages(load_template("judge"), "Q?", "5", "five")[0]["content"][0]["text"]
    assert "Standard answer:\n5" in text and "Candidate answer:\nfive" in text
    bad = tmp_path / "t.txt"
    bad.write_text("{question} {colour}")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        load_template("teacher", bad)
    assert language_name("ja") == "Japanese" and "xx" in language_name("xx")


@pytest.mark.parametrize("text,message", [("a {} b", r"unknown field\(s\) \['\{\}'\]"),
                                          ("a } b", "Single '}'"), ("{question} {nope}", "nope")])
def test_a_broken_template_fails_at_load_naming_its_file(tmp_path, text, message):
    path = tmp_path / "mine.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_template("teacher", path)
    assert "mine.txt" in str(err.value)
