"""The lean decoding loop: equal to transformers' own generate/forward, rows leaving the batch, caches reused.

Assets: the `test` tiny Mllama (conftest `tiny_dir`, built by stagereason.tiny; random weights);
images drawn here with PIL.
"""

import logging

import pytest
import torch
from PIL import Image

from stagereason.infer import decode as D
from stagereason.infer.generate import Prefix, _eos_ids
from stagereason.infer.judges import SelfJudge
from stagereason.infer.reasoner import Reasoner
from tests.infer.test_infer import _plain_inputs


@pytest.fixture(scope="module")
def reasoner(tiny_dir):
    return Reasoner.from_pretrained(tiny_dir, max_stage_tokens=6)


@pytest.fixture(scope="module")
def picture():
    return Image.new("RGB", (60, 40), "red")


def test_a_seeded_sampled_row_draws_what_generate_draws(reasoner, picture):
    """Same warpers (temperature, top-k default, top-p), same random stream: the same tokens as generate."""
    model, tok = reasoner.model, reasoner.processor.tokenizer
    prefix = Prefix(model, reasoner.processor, [picture], "Count them.")
    torch.manual_seed(3)
    rows, _ = prefix.continuations(1, None, 16, do_sample=True, temperature=0.7, top_p=0.9)
    torch.manual_seed(3)
    plain = model.generate(**_plain_inputs(reasoner, picture, "Count them."), max_new_tokens=16, do_sample=True,
                           temperature=0.7, top_p=0.9, pad_token_id=tok.pad_token_id)
    expected = plain[0, -16:].tolist()
    eos = set(_eos_ids(model))
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert rows[0] == expected[:cut] and len(rows[0]) > 3


def test_rows_that_stop_early_leave_the_batch_and_keep_their_own_cache(reasoner, picture):
    """Rows end at different steps (a one-character stop); each row's log-probabilities, computed in a batch
    that shrank under it, equal a from-scratch forward of that row alone."""
    model, tok = reasoner.model, reasoner.processor.tokenizer
    prefix = Prefix(model, reasoner.processor, [picture], "Count.")
    torch.manual_seed(0)
    rows, means = prefix.continuations(6, ["a", "e"], 12, do_sample=True, temperature=1.5, top_p=1.0, scores=True)
    lengths = {len(r) for r in rows}
    assert len(lengths) > 1, "rows should end at different steps"
    for row_cache in prefix._candidates[1]:  # rows that ended early hold the prefix's image keys, not copies
        assert all(row_cache.layers[i].keys is prefix.cache.layers[i].keys for i in D.cross_layers(model))
    for row, mean in zip(rows, means, strict=True):
        if not row:
            continue
        with torch.no_grad():
            logp = model(**_plain_inputs(reasoner, picture, "Count.", row)).logits[0].float().log_softmax(-1)
        picked = logp[-len(row) - 1:-1].gather(-1, torch.tensor(row)[:, None]).squeeze(-1)
        assert abs(picked.mean().item() - mean) < 1e-4
        text = tok.decode(row)
        assert ("a" in text or "e" in text) or len(row) == 12
        assert not any(s in tok.decode(row[:-1]) for s in ("a", "e"))  # it ended at the first stop


def test_a_taken_candidate_continues_as_if_encoded_from_scratch(reasoner, picture):
    """``take`` reuses the chosen row's cache; greedy decoding after it equals generate on prompt + row."""
    model, tok = reasoner.model, reasoner.processor.tokenizer
    prefix = Prefix(model, reasoner.processor, [picture], "Count.")
    image_kv = {i: prefix.cache.layers[i].keys for i in D.cross_layers(model)}
    assert image_kv and all(k is not None and k.shape[0] == 1 for k in image_kv.values())
    torch.manual_seed(1)
    rows, _ = prefix.continuations(3, ["o"], 10, do_sample=True, temperature=1.5, top_p=1.0)
    winner = max(range(3), key=lambda i: len(rows[i]))
    prefix.take(winner)
    # the image keys/values stay the prefix's own one-row tensors: no copy per row, no batch kept alive
    assert all(prefix.cache.layers[i].keys is k for i, k in image_kv.items())
    with pytest.raises(RuntimeError, match="continuations"):
        prefix.take(0)  # taken already: nothing left to take
    prefix.extend(tok.encode(" </SUMMARY>", add_special_tokens=False))  # run lazily, with the next decode
    forced = rows[winner] + tok.encode(" </SUMMARY>", add_special_tokens=False)
    cont, _ = prefix.continuations(2, None, 8, do_sample=False)
    plain = model.generate(**_plain_inputs(reasoner, picture, "Count.", forced), max_new_tokens=8,
                           min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert cont == [plain[0, -8:].tolist()] * 2


@pytest.mark.parametrize("with_image", [True, False])
def test_the_lean_step_equals_the_model_forward(reasoner, picture, with_image):
    model = reasoner.model
    prefix = Prefix(model, reasoner.processor, [picture] if with_image else [], "Count.")
    step = D.Stepper(model, None if prefix.xmask is None else prefix.xmask[:, -1:])
    assert step.lean
    ids = torch.tensor([[int(prefix.ids[0, -1])]] * 3)
    a_cache, b_cache = D.fork_cache(prefix.cache, 3), D.fork_cache(prefix.cache, 3)
    for pos in range(prefix.ids.shape[1] - 1, prefix.ids.shape[1] + 4):
        a, b = step._lean(ids, a_cache, pos), step._forward(ids, b_cache, pos)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        ids = a.argmax(-1, keepdim=True)


def test_the_lean_step_works_through_lora_layers(tiny_dir, picture):
    """A PEFT-wrapped model (LoRA on the text decoder, non-zero B) checks out and decodes like its forward."""
    from peft import LoraConfig, get_peft_model

    from stagereason.modeling import load_model

    model, processor = load_model(tiny_dir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.eval()
    prefix = Prefix(model, processor, [picture], "Count.")
    step = D.Stepper(model, prefix.xmask[:, -1:])
    assert step.lean and step.mllama is not None
    ids = prefix.ids[:, -1:]
    a = step._lean(ids, D.fork_cache(prefix.cache, 1), prefix.ids.shape[1] - 1)
    b = step._forward(ids, D.fork_cache(prefix.cache, 1), prefix.ids.shape[1] - 1)
    with model.disable_adapter():
        c = step._forward(ids, D.fork_cache(prefix.cache, 1), prefix.ids.shape[1] - 1)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)  # the adapter is applied


def test_a_lean_step_that_disagrees_is_dropped_for_the_models_forward(tiny_dir, picture, monkeypatch, caplog):
    from stagereason.modeling import load_model

    model, processor = load_model(tiny_dir)  # a model of its own: the check runs once per model
    prefix = Prefix(model, processor, [picture], "Count.")
    expected, _ = prefix.continuations(2, None, 5, do_sample=False)
    D._LEAN_OK.pop(model, None)
    Prefix(model, processor, [], "Count.").continuations(1, None, 2, do_sample=False)
    assert D._LEAN_OK[model] == {False: True}  # checked without an image: the cross-attention layers were not
    monkeypatch.setattr(D.Stepper, "_lean", lambda self, ids, cache, pos: self._forward(ids, cache, pos) + 0.5)
    with caplog.at_level(logging.WARNING):
        rows, _ = prefix.continuations(2, None, 5, do_sample=False)
    assert rows == expected and D._LEAN_OK[model] == {False: True, True: False} and "disagrees" in caplog.text
    assert not D.Stepper(model, prefix.xmask[:, -1:]).lean  # later calls go straight to forward


def test_the_judge_reuses_its_opening_across_rounds_and_stages(reasoner, picture):
    """One judge kept across a question (its opening cache grown, cropped, reused) decides exactly as a
    fresh judge does for every call."""
    model, proc, tok = reasoner.model, reasoner.processor, reasoner.processor.tokenizer
    prefix = Prefix(model, proc, [picture], "What color?")
    kept = SelfJudge(model, proc)
    calls = [("SUMMARY", [("I will look.", "I will count."), ("Look at it.", "Guess.")]),
             ("SUMMARY", [("I will look.", "Guess.")])]
    for stage, pairs in calls:
        assert kept(prefix, "What color?", stage, pairs) == pytest.approx(
            SelfJudge(model, proc)(prefix, "What color?", stage, pairs), abs=1e-5)
    prefix.extend(tok.encode("<SUMMARY> I will look. </SUMMARY>\n\n<CAPTION>", add_special_tokens=False))
    pairs = [("A red square.", "A blue circle.")]
    assert kept(prefix, "What color?", "CAPTION", pairs) == pytest.approx(
        SelfJudge(model, proc)(prefix, "What color?", "CAPTION", pairs), abs=1e-5)
    assert kept._head[0] and kept._head[2] is prefix


def test_the_cache_goes_by_the_name_the_forward_takes(reasoner, picture):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name a deprecated alias); a name a
    forward does not take would fall into its ``**kwargs`` unnoticed, so the name is read off the signature."""
    import warnings

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    class Wrapped(torch.nn.Module):  # as PeftModel: forward(*args, **kwargs), the model behind get_base_model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    assert D.cache_kwarg(New()) == "cache" and D.cache_kwarg(Old()) == "past_key_values"
    assert D.cache_kwarg(Wrapped(Old())) == "past_key_values" and D.cache_kwarg(Wrapped(New())) == "cache"
    # the names reach the model as it takes them: a stage search with the self judge warns of no deprecated name
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        res = reasoner.answer(picture, "How many?", search="stage", beam_size=2, max_stage_tokens=4)
    assert res.usage["total_tokens"] > 0
    prefix = Prefix(reasoner.model, reasoner.processor, [picture], "Count them.")
    assert prefix.cache is not None and prefix.cache.get_seq_length() == prefix.ids.shape[1] - 1
