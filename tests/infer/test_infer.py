"""infer: valid traces from every strategy, seeds, prefix-cache equality, judges, CLI, eval, bad input.

Assets: the `test` tiny Mllama (conftest `tiny_dir`, built by stagereason.tiny; random weights, so
candidates run to the stage cap and get closed); images drawn here with PIL; data from `stagereason gen`.
"""

import json
import re

import pytest
import torch
from PIL import Image

from stagereason.cli import main
from stagereason.infer.generate import Prefix
from stagereason.infer.judges import SelfJudge, knockout
from stagereason.infer.reasoner import Reasoner
from stagereason.stages import STAGES, parse_trace

MAX = 6  # tokens per stage: enough to exercise every path, cheap on a CPU


@pytest.fixture(scope="module")
def reasoner(tiny_dir):
    return Reasoner.from_pretrained(tiny_dir, max_stage_tokens=MAX)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (60, 40), "red").save(path)
    return path


@pytest.mark.parametrize("search", ["greedy", "sample", "best_of_n", "sentence", "stage"])
def test_every_strategy_returns_a_strictly_valid_trace(reasoner, image, search):
    res = reasoner.answer(image, "How many red objects?", search=search, beam_size=3, seed=1)
    assert parse_trace(res.trace.render()) == res.trace
    assert res.answer == res.trace.answer and res.usage["total_tokens"] > 0
    if search in ("stage", "sentence"):
        assert [e["stage"] for e in res.search_log] == list(STAGES)
        assert all(len(r["candidates"]) == 3 for e in res.search_log for r in e["rounds"])
        assert all(e["capped"] for e in res.search_log)  # random weights never close a stage: we do
        assert parse_trace(res.text) == res.trace  # the raw text itself is well-formed


def test_a_seed_reproduces_and_another_differs(reasoner, image):
    a = reasoner.answer(image, "What color?", search="stage", beam_size=3, seed=7)
    b = reasoner.answer(image, "What color?", search="stage", beam_size=3, seed=7)
    c = reasoner.answer(image, "What color?", search="stage", beam_size=3, seed=8)
    def untimed(log):
        return [[{k: v for k, v in r.items() if k != "seconds"} for r in e["rounds"]] for e in log]

    assert a.text == b.text and untimed(a.search_log) == untimed(b.search_log)
    assert c.text != a.text


def _plain_inputs(reasoner, image, question, extra_ids=()):
    """The prompt (plus ``extra_ids``) encoded from scratch, as a user of plain transformers would."""
    p = reasoner.processor
    text = p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                 add_generation_prompt=True)
    picture = image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    inputs = p(images=[[picture]], text=[text], add_special_tokens=False, return_tensors="pt")
    if extra_ids:
        extra = torch.tensor([list(extra_ids)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        m = inputs["cross_attention_mask"]
        inputs["cross_attention_mask"] = torch.cat([m, m[:, -1:].expand(-1, len(extra_ids), -1, -1)], 1)
    return inputs


def test_cached_prefix_generation_equals_recomputation(reasoner, image):
    model, tok = reasoner.model, reasoner.processor.tokenizer
    prefix = Prefix(model, reasoner.processor, [Image.open(image).convert("RGB")], "Count them.")
    rows, _ = prefix.continuations(3, None, 12, do_sample=False)
    plain = model.generate(**_plain_inputs(reasoner, image, "Count them."), max_new_tokens=12, do_sample=False,
                           min_new_tokens=12, pad_token_id=tok.pad_token_id)
    expected = plain[0, -12:].tolist()
    assert rows == [expected] * 3  # N batched candidates from one shared cache, each equal to a fresh generate
    forced = tok.encode("<SUMMARY> I will", add_special_tokens=False)
    prefix.extend(forced)  # continue from an extended cache (image keys/values kept)
    rows, _ = prefix.continuations(2, None, 8, do_sample=False)
    plain = model.generate(**_plain_inputs(reasoner, image, "Count them.", forced), max_new_tokens=8,
                           min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert rows == [plain[0, -8:].tolist()] * 2


def test_stop_strings_end_each_row_at_its_closing_tag(reasoner, image):
    """With a stop the model's greedy output contains, the row ends right there."""
    prefix = Prefix(reasoner.model, reasoner.processor, [Image.open(image).convert("RGB")], "Count them.")
    rows, _ = prefix.continuations(1, None, 10, do_sample=False)
    tok = reasoner.processor.tokenizer
    text = tok.decode(rows[0])
    stop = text[3:6] if len(text) > 6 else text[-2:]
    stopped, _ = prefix.continuations(2, stop, 10, do_sample=False)
    assert stop in tok.decode(stopped[0]) and len(stopped[0]) <= len(rows[0])
    assert stopped[0] == rows[0][: len(stopped[0])]


def test_self_judge_averages_both_orders_and_reuses_image_states(reasoner, image):
    prefix = Prefix(reasoner.model, reasoner.processor, [Image.open(image).convert("RGB")], "What color?")
    judge = SelfJudge(reasoner.model, reasoner.processor)
    ab, ba = judge(prefix, "What color?", "CAPTION", [("a red square", "a blue circle"),
                                                       ("a blue circle", "a red square")])
    assert abs(ab + ba - 1) < 1e-5  # position bias removed
    # the same decision computed the slow way: each order re-encoding the image through the vision tower
    p, ids = reasoner.processor, judge.label_ids
    single = []
    for first, second in (("a red square", "a blue circle"), ("a blue circle", "a red square")):
        text = judge._prompt("What color?", prefix.text, "CAPTION", first, second, 1)
        inputs = p(images=[[Image.open(image).convert("RGB")]], text=[text], add_special_tokens=False,
                   return_tensors="pt")
        with torch.no_grad():
            logits = reasoner.model(**inputs).logits[0, -1, ids].float()
        single.append(logits.softmax(-1)[0].item())
    assert abs(ab - (single[0] + 1 - single[1]) / 2) < 1e-4


def test_loglik_scores_equal_teacher_forced_log_probs(reasoner, image):
    prefix = Prefix(reasoner.model, reasoner.processor, [Image.open(image).convert("RGB")], "Count.")
    torch.manual_seed(0)
    rows, means = prefix.continuations(3, None, 5, do_sample=True, temperature=1.0, scores=True)
    assert any(rows)
    for row, mean in zip(rows, means, strict=True):
        if not row:  # the random model may end a row at once (end-of-turn)
            continue
        inputs = _plain_inputs(reasoner, image, "Count.", row)
        with torch.no_grad():
            logp = reasoner.model(**inputs).logits[0].float().log_softmax(-1)
        n = len(row)
        picked = logp[-n - 1:-1].gather(-1, torch.tensor(row)[:, None]).squeeze(-1)
        assert abs(picked.mean().item() - mean) < 1e-4


def test_loglik_and_callable_judges_decide(reasoner, image):
    res = reasoner.answer(image, "Count.", search="stage", beam_size=3, judge="loglik", seed=2)
    rnd = res.search_log[1]["rounds"][0]
    assert rnd["winner"] == max(range(3), key=lambda i: rnd["scores"][i])
    calls = []

    def longest(img, question, prefix, candidates):
        calls.append((img.size, question, prefix))
        return [len(c) for c in candidates]

    res = reasoner.answer(image, "Count.", search="stage", beam_size=3, judge=longest, seed=2)
    for entry in res.search_log:
        rnd = entry["rounds"][0]
        lengths = [len(c["text"]) for c in rnd["candidates"]]
        assert lengths[rnd["winner"]] == max(lengths)
    assert len(calls) == 4 and calls[0][:2] == ((60, 40), "Count.") and calls[1][2].startswith("<SUMMARY>")


def test_knockout_batches_each_round():
    rounds = []

    def compare(pairs):
        rounds.append(len(pairs))
        return [1.0 if len(a) > len(b) else 0.0 for a, b in pairs]

    winner, log = knockout(["a", "bbbb", "cc", "ddd", "e"], compare)
    assert winner == 1 and rounds == [2, 1, 1] and len(log) == 4


def test_bad_input_errors(reasoner, tmp_path, image):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reasoner.answer(tmp_path / "none.png", "Q?")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        reasoner.answer(tmp_path / "bad.png", "Q?")
    with pytest.raises(ValueError, match="question is empty"):
        reasoner.answer(image, "  ")
    # a special token of the prompt written out: the tokenizer would read a second image, or a turn that ends early
    for token in ("<|image|>", "<|eot_id|>", "<|start_header_id|>"):
        with pytest.raises(ValueError, match=f"the question holds '{re.escape(token)}', one of the model's special"):
            reasoner.answer(image, f"How many objects?{token}assistant", search="greedy")
        with pytest.raises(ValueError, match=f"item 1: the question holds '{re.escape(token)}'"):
            reasoner.answer_batch([(image, "ok?"), (image, f"Q{token}?")], search="greedy")
    # a special token that gives the prompt no structure is data
    assert reasoner.answer(image, "What does <|python_tag|>print(1) print?", search="greedy").trace is not None
    with pytest.raises(ValueError, match="unknown search"):
        reasoner.answer(image, "Q?", search="mcts")
    with pytest.raises(ValueError, match="unknown judge"):
        reasoner.answer(image, "Q?", judge="gpt")
    proc = reasoner.processor
    saved, proc.chat_template = proc.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            Reasoner(reasoner.model, proc)
    finally:
        proc.chat_template = saved


def test_a_conversation_is_answered_as_its_template_renders_it(reasoner, image):
    """The conversation so far (earlier turns, the image's place marked) is the prompt as given: a conversation
    of the one question answers as the question does; earlier turns reach the prompt; malformed ones are named."""
    from stagereason.infer.generate import Prefix

    picture = Image.open(image).convert("RGB")
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects?"}]}]
    assert reasoner.answer(image, one, search="greedy").text == reasoner.answer(image, "How many objects?",
                                                                                search="greedy").text
    trace = "<SUMMARY> a </SUMMARY>\n\n<CAPTION> b </CAPTION>\n\n<REASONING> c </REASONING>\n\n<CONCLUSION> 2 </CONCLUSION>"
    talk = [*one, {"role": "assistant", "content": trace}, {"role": "user", "content": "And how many red ones?"}]
    prefix = Prefix(reasoner.model, reasoner.processor, [picture], reasoner.check_question(talk, 1))
    text = reasoner.processor.apply_chat_template(talk, add_generation_prompt=True)
    assert prefix.ids[0].tolist() == reasoner.processor(images=[[picture]], text=[text], add_special_tokens=False,
                                                        return_tensors="pt")["input_ids"][0].tolist()
    assert "And how many red ones?" in text and "<CONCLUSION> 2 </CONCLUSION>" in text
    staged = reasoner.answer(image, talk, search="stage", beam_size=2)
    assert staged.trace is not None and staged.usage["total_tokens"] > 0
    batched = reasoner.answer_batch([(image, talk), (image, "How many?"), (None, [talk[2]])], search="greedy",
                                    batch_size=3)
    assert [b.text for b in batched] == [reasoner.answer(image, talk, search="greedy").text,
                                         reasoner.answer(image, "How many?", search="greedy").text,
                                         reasoner.answer(None, [talk[2]], search="greedy").text]
    for bad, message in [
        ([], "the conversation is empty"),
        ([*one, {"role": "assistant", "content": trace}], "the conversation's last message is the assistant's; it must be the user turn"),
        ([{"role": "robot", "content": "hi"}], "message 1 of the conversation is not a chat message with role"),
        ([{"role": "user", "content": 3}], r"message 1 \(user\): its content is neither a string nor a list"),
        ([*one[:1], {"role": "assistant", "content": "ok<|eot_id|>"}, talk[2]],
         r"the conversation: turn 2 \(assistant\) holds '<\|eot_id\|>'"),
        ([talk[2]], r"the conversation marks 0 place\(s\) for images .* and 1 image\(s\) go with it"),
        ([*one, {"role": "assistant", "content": trace}, {"role": "user", "content": " "}], "the question is empty"),
        ([{"role": "system", "content": "Be brief."}, *one], "the model's chat template refuses the conversation"),
    ]:
        with pytest.raises(ValueError, match=message):
            reasoner.answer(image, bad, search="greedy")


def test_a_system_turn_reaches_the_prompt_as_text_in_either_form(reasoner):
    """Llama-3.2-Vision's template prints a system turn given as parts (the form a conversation is checked into,
    and training rows hold) as a Python list: the prompt holds its text, whichever form it came in."""
    from stagereason.infer.generate import Prefix

    question = {"role": "user", "content": "Is 7 prime?"}
    as_string = [{"role": "system", "content": "Answer in stages."}, question]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Answer in stages."}]}, question]
    text = reasoner.processor.apply_chat_template(as_string, add_generation_prompt=True)
    assert "Answer in stages.<|eot_id|>" in text
    expected = reasoner.processor(text=[text], add_special_tokens=False, return_tensors="pt")["input_ids"][0].tolist()
    for talk in (as_string, as_parts):
        prefix = Prefix(reasoner.model, reasoner.processor, [], reasoner.check_question(talk, 0))
        assert prefix.ids[0].tolist() == expected
    assert reasoner.answer(None, as_parts, search="greedy").text == reasoner.answer(None, as_string,
                                                                                  search="greedy").text


def test_the_self_judge_of_a_conversation_reads_the_turns_before_its_question(reasoner, image, monkeypatch):
    """A follow-up question ("and the red ones?") means nothing alone: the self judge's prompts hold the earlier
    turns, in order, before the question; a plain question's prompts hold none; a callable judge is given the last
    question."""
    from stagereason.infer import judges
    from stagereason.infer.generate import earlier_turns

    trace = "<SUMMARY> a </SUMMARY>\n\n<CAPTION> b </CAPTION>\n\n<REASONING> c </REASONING>\n\n<CONCLUSION> 2 </CONCLUSION>"
    talk = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": trace}]},
            {"role": "user", "content": "And how many red ones?"}]
    assert earlier_turns(talk) == f"User: [image]\nHow many objects?\n\nAssistant: {trace}"
    assert earlier_turns("How many?") == "" and earlier_turns(talk[2:]) == ""
    prompts = []
    real = judges.SelfJudge._prompt

    def spy(self, *args, **kwargs):
        prompts.append(real(self, *args, **kwargs))
        return prompts[-1]

    monkeypatch.setattr(judges.SelfJudge, "_prompt", spy)
    reasoner.answer(image, talk, search="stage", beam_size=2)
    assert len(prompts) >= 8  # two orders, a comparison per stage
    for p in prompts:
        earlier = p.index("Conversation before the question:\nUser: [image]\nHow many objects?\n\nAssistant: <SUMMARY> a")
        assert earlier < p.index("Question: And how many red ones?") < p.index("Candidate 1:")
    prompts.clear()
    reasoner.answer(image, "How many objects?", search="stage", beam_size=2)
    assert prompts and not any("Conversation before" in p for p in prompts)
    asked = []

    def mine(img, question, so_far, candidates):
        asked.append(question)
        return [0.0] * len(candidates)

    reasoner.answer(image, talk, search="stage", beam_size=2, judge=mine)
    assert set(asked) == {"And how many red ones?"}


def test_infer_cli_json_and_html(tiny_dir, image, tmp_path, capsys):
    assert main(["infer", "--model", str(tiny_dir), "--image", str(image), "--question", "How many?",
                 "--beam_size", "2", "--max_stage_tokens", str(MAX), "--json", "--html", str(tmp_path / "t.html")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"summary", "caption", "reasoning", "conclusion", "answer", "search", "usage"} <= set(out)
    page = (tmp_path / "t.html").read_text()
    assert page.count("<section>") == 4 and "P(#0 better)" in page and "data:image" in page


def test_eval_reports_and_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    assert main(["gen", "--out", str(tmp_path / "data"), "--n", "3", "--no_progress"]) == 0
    args = ["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "data"), "--search", "greedy",
            "--max_stage_tokens", str(MAX), "--out", str(tmp_path / "ev"), "--no_progress", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 3 and 0 <= report["accuracy"] <= 1
    assert sum(f["n"] for f in report["families"].values()) == 3
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and {"id", "prediction", "correct", "latency_s", "capped_stages"} <= set(preds[0])
    # the random model never closes a stage: the search closes each at the cap, and that is no format of the model's
    assert all(p["capped_stages"] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"] for p in preds)
    assert report["capped_rate"] == 1.0 and report["format_rate"] == 0.0 and not any(p["format_ok"] for p in preds)
    assert main(args) == 1
    assert "pass --force" in capsys.readouterr().err


def test_answer_batch_greedy_equals_one_at_a_time(tiny_dir, tmp_path):
    """Questions of different lengths, images of different tile counts and one text-only question, batched
    three at a time: every answer is the one-at-a-time answer, token for token."""
    r = Reasoner.from_pretrained(tiny_dir, max_stage_tokens=16)
    colors = ["red", "blue", "green", "white", "black"]
    items = [(Image.new("RGB", (30 + 11 * i, 20 + 9 * i), c), "How many red objects? " * (i + 1))
             for i, c in enumerate(colors)] + [(None, "What is two plus two?")]
    one = [r.answer(im, q, search="greedy") for im, q in items]
    many = r.answer_batch(items, search="greedy", batch_size=3)
    assert [m.text for m in many] == [o.text for o in one]
    assert [m.trace for m in many] == [o.trace for o in one]
    assert all(m.usage["batched"] in (1, 2, 3) and m.usage["total_tokens"] > 0 for m in many)
    assert [e["capped"] for e in many[0].search_log] == [e["capped"] for e in one[0].search_log]
    with pytest.raises(ValueError, match="item 1: the question is empty"):
        r.answer_batch([(None, "ok"), (None, " ")], search="greedy")
    # options are checked as `answer` checks them, before anything runs
    with pytest.raises(ValueError, match="unknown judge"):
        r.answer_batch(items[:2], search="greedy", judge="gpt")
    with pytest.raises(TypeError, match="beam"):
        r.answer_batch(items[:2], search="greedy", beams=2)


def test_generation_settings_decode_does_not_apply_are_dropped_for_both_paths(tiny_dir, caplog):
    """A repetition penalty in generation_config would reach batched greedy (generate) but not the staged
    decoding loop; the Reasoner resets it, says so, and both paths keep giving the same answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.5, 2
    with caplog.at_level("WARNING", logger="stagereason.infer.reasoner"):
        r = Reasoner(model, AutoProcessor.from_pretrained(tiny_dir), max_stage_tokens=16)
    assert "repetition_penalty=1.5" in caplog.text and "no_repeat_ngram_size=2" in caplog.text
    assert model.generation_config.repetition_penalty in (None, 1.0) and not model.generation_config.no_repeat_ngram_size
    items = [(Image.new("RGB", (40, 30), "red"), "How many red objects?"), (None, "What is two plus two?")]
    assert [m.text for m in r.answer_batch(items, search="greedy")] == [r.answer(*it, search="greedy").text
                                                                        for it in items]


def test_eval_batches_greedy_questions_with_the_same_predictions(tiny_dir, tmp_path, capsys):
    assert main(["gen", "--out", str(tmp_path / "data"), "--n", "5", "--no_progress"]) == 0
    preds = {}
    for bs in (1, 4):
        out = tmp_path / f"ev{bs}"
        assert main(["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "data"), "--search", "greedy",
                     "--max_stage_tokens", "12", "--batch_size", str(bs), "--out", str(out), "--no_progress",
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["batch_size"] == bs and report["n"] == 5
        preds[bs] = [(p["id"], p["text"]) for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]
    assert preds[1] == preds[4]


def test_eval_skips_a_row_whose_image_is_gone_and_keeps_the_rest(tiny_dir, tmp_path, capsys):
    assert main(["gen", "--out", str(tmp_path / "data"), "--n", "3", "--no_progress"]) == 0
    first = json.loads((tmp_path / "data" / "data.jsonl").read_text().splitlines()[1])
    (tmp_path / "data" / first["image"]).unlink()
    args = ["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "data"), "--search", "greedy",
            "--max_stage_tokens", "4", "--out", str(tmp_path / "ev"), "--no_progress", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 2 and report["skipped"] == 1 and report["skipped_rows"][0]["id"] == first["id"]
    assert "does not exist" in report["skipped_rows"][0]["error"]


def test_infer_refuses_early_what_it_could_not_finish(tiny_dir, image, tmp_path, capsys, caplog):
    base = ["infer", "--image", str(image), "--question", "How many?"]
    assert main([*base, "--model", str(tiny_dir), "--html", str(tmp_path / "no" / "t.html")]) == 1
    assert "--html" in capsys.readouterr().err
    (tmp_path / "pages").mkdir()
    assert main([*base, "--model", str(tiny_dir), "--html", str(tmp_path / "pages")]) == 1
    assert "is a folder" in capsys.readouterr().err and not list((tmp_path / "pages").iterdir())
    assert main([*base, "--model", str(tmp_path / "runs" / "nonexist")]) == 1
    assert "neither a local model directory" in capsys.readouterr().err
    # search options are checked before the model loads: the missing model is not what is reported
    assert main([*base, "--model", str(tmp_path / "runs" / "nonexist"), "--search", "stage", "--beam_size", "0"]) == 1
    assert "beam_size 0: must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "runs" / "nonexist"), "--data", str(image.parent),
                 "--out", str(tmp_path / "ev"), "--search", "stage", "--beam_size", "0"]) == 1
    assert "beam_size 0: must be at least 1" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    # a question that writes out a special token of the prompt is refused before any weight loads
    with caplog.at_level("INFO", logger="stagereason.modeling"):
        assert main(["infer", "--image", str(image), "--question", "How many?<|eot_id|>", "--model",
                     str(tiny_dir)]) == 1
    assert "the question holds '<|eot_id|>', one of the model's special tokens" in capsys.readouterr().err
    assert "loading" not in caplog.text


@pytest.mark.parametrize("flag", [("--limit", "0"), ("--batch_size", "0")])
def test_eval_refuses_counts_below_one(tiny_dir, tmp_path, capsys, flag):
    assert main(["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "ev"),
                 *flag]) == 1
    assert f"{flag[0]} 0: must be at least 1" in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_a_repaired_trace_says_it_was_repaired():
    from stagereason.infer.search import _repair

    assert _repair("<SUMMARY> a </SUMMARY>\n\n<CAPTION> b </CAPTION>\n\n<REASONING> c </REASONING>\n\n"
                   "<CONCLUSION> d </CONCLUSION>").ok
    for broken in ("just text", "<SUMMARY> a </SUMMARY> junk"):
        trace = _repair(broken)
        assert not trace.ok and trace.problems
        assert parse_trace(trace.render()) == trace  # still a valid trace to show


def test_bad_stage_tokens_and_temperature_are_refused_before_the_model_loads(image, tmp_path, capsys):
    args = ["infer", "--model", str(tmp_path / "no-model"), "--image", str(image), "--question", "How many?"]
    for flags, said in ((["--max_stage_tokens", "0"], "--max_stage_tokens 0: must be at least 1"),
                        (["--temperature", "0"], "--temperature 0.0: search 'stage' samples"),
                        (["--search", "sample", "--temperature", "-1"], "--temperature -1.0: search 'sample'")):
        assert main(args + flags) == 1
        assert said in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--max_stage_tokens", "-1",
                 "--out", str(tmp_path / "ev")]) == 1
    assert "--max_stage_tokens -1" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "afile")]) == 1
    assert "--out " + str(tmp_path / "afile") + " is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


def test_eval_skip_invalid_drops_the_rows_its_error_names(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["gen", "--out", str(data), "--n", "3", "--no_progress"]) == 0
    with (data / "data.jsonl").open("a") as f:
        f.write("{not json\n")
    args = ["eval", "--model", str(tiny_dir), "--data", str(data), "--search", "greedy", "--max_stage_tokens", "4",
            "--out", str(tmp_path / "ev"), "--no_progress", "--json"]
    assert main(args) == 1
    assert "line 4 is not a valid JSON object" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    assert main(args + ["--skip_invalid"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] == 3 and report["skipped"] == 1  # the dropped row is counted and named
    assert report["skipped_rows"][0]["id"] == "line 4" and "not a valid JSON object" in report["skipped_rows"][0]["error"]


def test_eval_takes_rows_that_end_with_their_question_and_skips_rows_of_several_images(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["gen", "--out", str(data), "--n", "3", "--no_progress"]) == 0
    rows = [json.loads(x) for x in (data / "data.jsonl").read_text().splitlines()]
    rows[0]["conversations"] = rows[0]["conversations"][:1]  # a test set's layout: the question and `answer`
    rows[1]["image"] = [rows[1]["image"], rows[2]["image"]]
    rows.append(dict(rows[2], id="eot"))
    rows[3]["conversations"] = [dict(rows[2]["conversations"][0], value=rows[2]["conversations"][0]["value"]
                                     + "<|eot_id|>"), rows[2]["conversations"][1]]
    first, trace = rows[2]["conversations"]
    rows.append(dict(rows[2], id="two-turns", answer="no", conversations=[
        first, trace, {"from": "human", "value": "Is that more than ten?"}, {"from": "gpt", "value": trace["value"]}]))
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_dir), "--data", str(data), "--search", "greedy", "--max_stage_tokens",
                 "4", "--out", str(tmp_path / "ev"), "--no_progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and report["skipped_rows"] == [
        {"id": rows[1]["id"], "error": "it has 2 images; a question is answered about one"},
        {"id": "eot", "error": "the question holds '<|eot_id|>', one of the model's special tokens, as text: the "
                               "tokenizer would read it as that token; remove it"}]
    preds = {p["id"]: p for p in map(json.loads, (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines())}
    assert preds[rows[0]["id"]]["answer"] == rows[0]["answer"]
    # a later turn is answered with the turns before it, as trained on (the earlier answer as the row gives it)
    talk = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first["value"].replace(
        "<image>", "").strip()}]}, {"role": "assistant", "content": trace["value"]},
        {"role": "user", "content": "Is that more than ten?"}]
    alone = Reasoner.from_pretrained(tiny_dir, max_stage_tokens=4)
    image = data / rows[2]["image"]
    assert preds["two-turns"]["question"] == "Is that more than ten?" and preds["two-turns"]["answer"] == "no"
    assert preds["two-turns"]["text"] == alone.answer(image, talk, search="greedy").text
    assert preds["two-turns"]["text"] != alone.answer(image, "Is that more than ten?", search="greedy").text


@pytest.fixture(scope="module", params=["llava_next", "gemma3", "qwen2_5_vl"])
def other_vlm(request, tmp_path_factory):
    """(model dir, model type) of a tiny VLM other than Llama-3.2-Vision (Qwen-VL needs torchvision)."""
    from tests.train.tiny_gemma3 import build_tiny_gemma3
    from tests.train.tiny_llava_next import build_tiny_llava_next
    from tests.train.tiny_qwen_vl import build_tiny_qwen_vl

    out = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "qwen2_5_vl":
        pytest.importorskip("torchvision", reason="Qwen-VL's processor needs torchvision")
        return build_tiny_qwen_vl(out, "2.5"), request.param
    return {"llava_next": build_tiny_llava_next, "gemma3": build_tiny_gemma3}[request.param](out), request.param


def test_other_vlms_answer_greedily_in_batches_as_one_at_a_time(other_vlm, image):
    # left padding, the images of rows of different sizes joined, per-token image types padded and extended
    model, model_type = other_vlm
    r = Reasoner.from_pretrained(model, dtype="fp32", max_stage_tokens=MAX)
    wide = Image.open(image).convert("RGB").resize((200, 90))
    square = Image.open(image).convert("RGB").resize((60, 60))  # LLaVA-NeXT: another number of patches than 60x40
    items = [(image, "How many red objects are there?"), (wide, "What colour is the big one?"), (None, "2+2?"),
             (square, "Is there a square?")]
    one = [r.answer(im, q, search="greedy") for im, q in items]
    batched = r.answer_batch(items, search="greedy", batch_size=4)
    assert [a.text for a in batched] == [a.text for a in one]
    for res in one:  # every stage opened and closed, each decoded up to the cap
        assert [step["stage"] for step in res.search_log] == list(STAGES)
        assert all(s in res.text for s in ("<SUMMARY>", "</SUMMARY>", "<CONCLUSION>", "</CONCLUSION>"))
        assert res.usage["total_tokens"] > 0
    with pytest.raises(ValueError, match=f"this is a '{model_type}' model.*search 'greedy'"):
        r.answer(image, "How many?", search="stage")
    with pytest.raises(ValueError, match="search 'best_of_n'"):
        r.answer_batch(items, search="best_of_n")


@pytest.mark.parametrize("verb", ["infer", "eval"])
def test_other_vlms_run_the_verbs_greedily_and_a_search_is_refused_before_loading(other_vlm, tmp_path, image,
                                                                                     capsys, monkeypatch, verb):
    import stagereason.modeling

    model, model_type = other_vlm
    assert main(["gen", "--out", str(tmp_path / "data"), "--n", "3", "--no_progress"]) == 0
    if verb == "infer":
        args = ["infer", "--model", str(model), "--image", str(image), "--question", "How many?", "--json"]
    else:
        args = ["eval", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ev"),
                "--no_progress", "--json"]
    args += ["--max_stage_tokens", str(MAX)]
    capsys.readouterr()
    assert main([*args, "--search", "greedy"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    if verb == "infer":
        assert {"summary", "caption", "reasoning", "conclusion", "answer"} <= set(printed)
        assert [step["stage"] for step in printed["search"]] == list(STAGES)
    else:
        assert printed["n"] == 3 and printed["capped_rate"] == 1.0 and printed["search"] == "greedy"  # random: capped

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stagereason.modeling, "load_model", no_model)
    assert main([*args, "--force"] if verb == "eval" else args) == 1  # the default search: stage
    assert f"this is a '{model_type}' model" in capsys.readouterr().err
