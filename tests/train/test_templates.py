"""The training chat template writes every row as the model's own template writes its prompt at inference.

Assets: the `test` tiny Mllama (conftest `tiny_dir`, built by stagereason.tiny, whose template reads as
Llama-3.2-11B-Vision-Instruct's does: today's date, a system turn's content read as a string), and TRL's own
LLaVA-NeXT chat template (shipped in trl/chat_templates), which reads a system turn's content as parts.
"""

import datetime
import shutil
from pathlib import Path

import pytest
import trl
from transformers import AutoProcessor

from stagereason.cli import main
from stagereason.infer.generate import fit_system_turns, prompt_text, system_as_string
from stagereason.tiny import CHAT_TEMPLATE
from stagereason.train.templates import training_chat_template

ANSWER = "<SUMMARY> s </SUMMARY>\n\n<CAPTION> c </CAPTION>\n\n<REASONING> r </REASONING>\n\n<CONCLUSION> yes </CONCLUSION>"
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Answer in four stages."}]}  # as rows hold it
QUESTION = {"role": "user", "content": [{"type": "text", "text": "Is 7 prime?"}]}
REPLY = {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}


@pytest.fixture
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def _today() -> set[str]:
    """Today's date as the template writes it, and tomorrow's (a test run that crosses midnight)."""
    now = datetime.datetime.now()
    return {d.strftime("%d %b %Y") for d in (now, now + datetime.timedelta(days=1))}


@pytest.mark.parametrize("turns", [[QUESTION], [SYSTEM, QUESTION]], ids=["question", "system+question"])
def test_a_row_without_an_image_trains_on_the_prompt_the_model_is_given(processor, turns):
    # Llama-3.2-Vision writes a system header with today's date before a conversation without an image, and
    # its template prints a system turn given as parts as a Python list: training wrote a fixed date and the
    # system text, so a trained row was not the prompt plus its answer
    template = training_chat_template(processor, "mllama")
    trained = processor.apply_chat_template([*turns, REPLY], tokenize=False, chat_template=template)
    prompted = prompt_text(processor, turns, 0)
    assert trained == prompted + ANSWER + "<|eot_id|>"
    assert any(f"Today Date: {day}\n" in prompted for day in _today())
    if turns[0] is SYSTEM:
        assert "Answer in four stages.<|eot_id|>" in prompted
        assert "[{'type': 'text'" in processor.apply_chat_template(turns, tokenize=False)  # the template's own reading


def test_a_model_template_that_writes_another_date_is_refused_before_training(processor, tiny_dir, tmp_path, capsys):
    # a template that fixes the date (as the tiny model's did) renders a row without an image unlike ours
    fixed = CHAT_TEMPLATE.replace("strftime_now('%d %b %Y')", "'26 Jul 2024'")
    processor.chat_template = fixed
    with pytest.raises(ValueError, match="does not render a question without an image like the model's own"):
        training_chat_template(processor, "mllama")
    old = tmp_path / "old-tiny"  # a tiny model built before: train says to build it again
    shutil.copytree(tiny_dir, old)
    (old / "chat_template.jinja").write_text(fixed)
    scenes = tmp_path / "data"
    assert main(["gen", "--out", str(scenes), "--n", "4", "--no_progress"]) == 0
    assert main(["train", "--model_name_or_path", str(old), "--dataset", str(scenes), "--eval_split", "none",
                 "--dry_run", "--output_dir", str(tmp_path / "run")]) == 1
    assert f"build it again (stagereason tiny-model {old} --force)" in capsys.readouterr().err


def test_a_system_turn_keeps_the_form_the_models_template_reads(processor):
    assert system_as_string(processor)
    fitted = fit_system_turns([SYSTEM, QUESTION], processor)
    assert fitted == [{"role": "system", "content": "Answer in four stages."}, QUESTION]
    assert SYSTEM["content"] != fitted[0]["content"]  # the caller's messages are left as they were
    # LLaVA-NeXT's template reads content[0]["text"]: parts stay parts, and its prompt holds the text
    processor.chat_template = (Path(trl.__file__).parent / "chat_templates/llava_next.jinja").read_text()
    assert not system_as_string(processor)
    assert fit_system_turns([SYSTEM, QUESTION], processor) == [SYSTEM, QUESTION]
    assert "Answer in four stages." in prompt_text(processor, [SYSTEM, QUESTION], 0)
