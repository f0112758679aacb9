"""The tiny-model builder: offline load with plain transformers, real token layout, determinism.

Assets: models built by stagereason.tiny.build_tiny_model; images drawn with PIL here.
"""

import hashlib

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from stagereason.stages import STAGES, close_tag, open_tag
from stagereason.tiny import PRESETS, SPECIAL_TOKENS, build_tiny_model


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_loads_offline_with_auto_classes_and_generates(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>How many circles?"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    inputs = processor(images=Image.new("RGB", (90, 40), "red"), text=prompt, add_special_tokens=False,
                       return_tensors="pt")
    assert inputs["pixel_values"].shape[2] == 2  # a wide image takes two tiles in the test preset
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


def test_image_token_id_equals_text_vocab_size_and_is_out_of_lm_head_range(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    tok = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == model.config.text_config.vocab_size == model.config.image_token_index
    assert model.lm_head.out_features == image_id  # so an unmasked image label is out of range
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(image_id - len(SPECIAL_TOKENS), image_id))  # specials close the text vocab
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>",
                                                             "<|finetune_right_pad_id|>")


def test_stage_tags_and_any_text_round_trip_through_the_tokenizer(tiny_dir):
    tok = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    text = " ".join(f"{open_tag(s)} 数学 x² < 3 {close_tag(s)}" for s in STAGES) + "\r\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds <|begin_of_text|> like Llama-3


def test_text_only_prompt_gets_the_dated_system_block_and_images_refuse_a_system_message(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    with pytest.raises(Exception, match="incompatible with system messages"):
        processor.apply_chat_template([{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "image"}]}])


def test_cross_attention_gates_are_non_zero_and_the_image_reaches_the_text(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    gates = [p for n, p in model.named_parameters() if "cross_attn_attn_gate" in n or "cross_attn_mlp_gate" in n]
    assert gates and all(g.abs().item() > 0 for g in gates)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
        add_generation_prompt=True)
    logits = []
    for color in ("red", "blue"):
        inputs = processor(images=Image.new("RGB", (32, 32), color), text=prompt, add_special_tokens=False,
                           return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_tiny_model(a, preset="test", seed=1)
    build_tiny_model(b, preset="test", seed=1)
    build_tiny_model(c, preset="test", seed=2)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_presets_sizes():
    test_model, _ = build_tiny_model(None, preset="test")
    demo_model, _ = build_tiny_model(None, preset="demo")
    n_test = sum(p.numel() for p in test_model.parameters())
    n_demo = sum(p.numel() for p in demo_model.parameters())
    assert n_test < 500_000 and 1_000_000 < n_demo < 10_000_000
    assert set(PRESETS) == {"test", "demo"}
    # each preset's text-decoder init std reaches the weights (the demo's is wider than Llama's 0.02)
    for model, preset in ((test_model, PRESETS["test"]), (demo_model, PRESETS["demo"])):
        weight = model.model.language_model.layers[0].self_attn.q_proj.weight
        assert abs(weight.std().item() - preset.text_init_std) < 0.1 * preset.text_init_std
    assert PRESETS["test"].text_init_std == 0.02 and PRESETS["demo"].text_init_std > 0.02
    with pytest.raises(ValueError, match="unknown preset"):
        build_tiny_model(None, preset="huge")


def test_llama3_ids_tokenizer_pairs_with_the_real_11b_architecture():
    """bench/gpu_11b.py builds the real 11B configuration around this tokenizer: ids and size must be the real ones."""
    import sys
    from pathlib import Path

    from transformers import MllamaForConditionalGeneration

    from stagereason.tiny import PRESETS, _build_tokenizer

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from gpu_11b import llama32v_11b_config

    tok = _build_tokenizer(PRESETS["demo"], seed=0, llama3_ids=True)
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>", "<|image|>"])
    assert ids == [128000, 128004, 128009, 128256] and len(tok) == 128257
    text = "<SUMMARY> two red circles </SUMMARY>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert max(tok(text, add_special_tokens=False)["input_ids"]) < 256 + PRESETS["demo"].vocab_merges  # no fillers
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(llama32v_11b_config(tok))
    assert sum(p.numel() for p in model.parameters()) == 10_670_220_835  # Llama-3.2-11B-Vision's count
