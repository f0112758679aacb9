"""load_model: attention choice, precision, 4-bit skip modules, adapters.

Assets: tiny Mllama from stagereason.tiny (conftest `tiny_dir`); adapters made here with PEFT.
"""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText

from stagereason.modeling import choose_attention, load_model, non_quantized_modules, resolve_dtype


def test_mllama_gets_sdpa_and_says_why(tiny_dir):
    impl, why = choose_attention(AutoConfig.from_pretrained(tiny_dir))
    assert impl == "sdpa"
    assert "mllama does not support flash_attention_2" in why


def test_flash_attention_refused_for_mllama(tiny_dir):
    with pytest.raises(ValueError, match="does not support flash_attention_2"):
        choose_attention(AutoConfig.from_pretrained(tiny_dir), "flash_attention_2")


def test_qwen2_5_vl_would_take_flash_attention_only_with_package_and_gpu():
    from transformers import Qwen2_5_VLConfig

    impl, why = choose_attention(Qwen2_5_VLConfig())
    assert impl == "sdpa"
    assert why in ("flash-attn is not installed", "no CUDA GPU")


def test_skip_modules_are_full_paths(tiny_dir):
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert non_quantized_modules(cfg) == ["model.vision_model", "model.multi_modal_projector", "lm_head"]


def test_dtype_resolution():
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8x")


def test_load_logs_the_choice(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="stagereason"):
        model, processor = load_model(tiny_dir)
    assert model.config._attn_implementation == "sdpa"
    assert "attention sdpa (mllama does not support flash_attention_2" in caplog.text
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_index


def test_4bit_quantizes_only_the_text_decoder(tiny_dir):
    import bitsandbytes as bnb

    model, _ = load_model(tiny_dir, quantization="4bit")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linear = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert four_bit and all(n.startswith("model.language_model.") for n in four_bit)
    assert "lm_head" in linear and "model.multi_modal_projector" in linear
    assert all(n.startswith(("model.vision_model", "model.multi_modal_projector", "lm_head")) for n in linear)


def test_unknown_quantization_is_an_error(tiny_dir):
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(tiny_dir, quantization="3bit")


def _save_adapter(base_dir, out):
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q|v)_proj", init_lora_weights=False))
    peft.save_pretrained(out)


def test_adapter_loads_on_its_base(tiny_dir, tmp_path):
    _save_adapter(tiny_dir, tmp_path / "run")
    model, _ = load_model(tiny_dir, adapter=tmp_path / "run")
    assert type(model).__name__ == "PeftModel"
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_adapter_for_another_base_is_a_clear_error(tiny_dir, tmp_path):
    from stagereason.tiny import build_tiny_model

    build_tiny_model(tmp_path / "demo", preset="demo")
    _save_adapter(tmp_path / "demo", tmp_path / "run")
    with pytest.raises(ValueError, match="does not fit base model"):
        load_model(tiny_dir, adapter=tmp_path / "run")


def test_adapter_dir_without_adapter_config(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_model(tiny_dir, adapter=tmp_path)


def test_the_imageless_row_hook_reads_the_row_mask_however_it_is_passed(tiny_dir, monkeypatch, caplog):
    # the hook must find the row mask passed by keyword (as transformers does now) or by position; a layer
    # without that parameter (another transformers) is named in a warning, not silently left unguarded
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    from stagereason.modeling import load_model, skip_cross_attention_without_image

    model, _ = load_model(tiny_dir, dtype="fp32")
    layer = next(m for m in model.modules() if isinstance(m, MllamaCrossAttentionDecoderLayer))
    layer.cross_attn_attn_gate.data.fill_(0.7)
    layer.cross_attn_mlp_gate.data.fill_(0.7)
    torch.manual_seed(0)
    size = model.config.text_config.hidden_size
    hidden, states = torch.randn(2, 5, size), torch.randn(2, 7, size)
    cross_mask = torch.zeros(2, 1, 5, 7)
    rows = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 5, 1)  # row 0 has no image
    with torch.no_grad():
        by_keyword = layer(hidden, states, cross_mask, None, full_text_row_masked_out_mask=rows)
        by_position = layer(hidden, states, cross_mask, None, rows)
    assert torch.equal(by_keyword, by_position)
    assert torch.equal(by_position[0], hidden[0])  # left as if skipped
    assert not torch.allclose(by_position[1], hidden[1])  # the image row is attended

    def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask, **kwargs):
        return hidden_states

    monkeypatch.setattr(MllamaCrossAttentionDecoderLayer, "forward", forward)
    with caplog.at_level("WARNING", logger="stagereason.modeling"):
        assert skip_cross_attention_without_image(model.__class__(model.config)) == 0
    assert "full_text_row_masked_out_mask" in caplog.text


def test_a_row_without_an_image_is_computed_alike_alone_and_beside_an_image(tiny_dir):
    # Mllama sends a row without an image through the cross-attention layers when the batch holds an image; with
    # trained (non-zero) gates that changed the row (a text-only prompt alone skips those layers)
    from PIL import Image

    from stagereason.infer.generate import generate_greedy
    from stagereason.modeling import load_model, skip_cross_attention_without_image

    model, proc = load_model(tiny_dir, dtype="fp32")
    model.eval()
    for name, p in model.named_parameters():
        if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
            p.data.fill_(0.7)
    assert skip_cross_attention_without_image(model) == 0  # load_model hooked every layer already, once

    def enc(rows):
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * bool(im) + [
            {"type": "text", "text": q}]}], add_generation_prompt=True) for im, q in rows]
        images = [[im] if im else [] for im, _ in rows]
        return proc(images=images if any(images) else None, text=texts, padding=True, padding_side="right",
                    add_special_tokens=False, return_tensors="pt")

    image = Image.new("RGB", (64, 64), "red")
    text_row, image_row = (None, "How many circles are there?"), (image, "What colour is it?")
    with torch.no_grad():
        alone = model(**enc([text_row])).logits[0]
        mixed = model(**enc([text_row, image_row])).logits
        image_alone = model(**enc([image_row])).logits[0]
    assert torch.equal(mixed[0, : len(alone)], alone)
    assert torch.allclose(mixed[1, : len(image_alone)], image_alone, atol=1e-4)  # image rows as before
    q = text_row[1]
    assert generate_greedy(model, proc, [([], q)], max_new_tokens=12) == \
        generate_greedy(model, proc, [([], q), ([image], "What colour?")], max_new_tokens=12)[:1]
