"""Offline, deterministic tiny Mllama models for tests and the CPU demo.

The builder makes a randomly initialised ``MllamaForConditionalGeneration`` with
the real architecture and the real special-token layout of Llama-3.2-Vision,
plus a processor whose tokenizer is trained here, in code, on an embedded
corpus. Nothing is downloaded.

Layout kept from the real model (so bugs that bite at 11B bite here too):

* the text vocabulary ends with Llama-3's named special tokens, and
  ``<|image|>`` gets the id equal to the text vocabulary size (out of range
  for ``lm_head``, exactly as 128256 is for the real model);
* the chat template has the real structure: ``<|begin_of_text|>``, header
  tokens around each role, ``<|eot_id|>`` after each turn, ``<|image|>`` where
  the image goes, and the dated system block only for text-only prompts;
* cross-attention gates are non-zero (a freshly initialised Mllama has zero
  gates, so the image would never reach the text).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from stagereason.stages import STAGES, close_tag, open_tag

__all__ = ["PRESETS", "TinyPreset", "build_tiny_model", "open_gates", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

# Named special tokens of Llama-3.2-Vision, in the order they follow the text
# vocabulary. `<|image|>` comes last and gets id == text vocab size.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"
LLAMA3_TEXT_VOCAB = 128000  # BPE entries of Llama-3's tokenizer
LLAMA3_SPECIALS = 256  # special tokens after them; <|image|> is 128256

# Llama-3.2-11B-Vision-Instruct's template without the tool branches, read as it reads: the date is today's
# (strftime_now) unless date_string is passed, and a system turn's content is written through `| trim`, so only
# a string reads as text (parts come out as a printed list: see infer.generate.fit_system_turns).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama-3's pre-tokenizer split pattern.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class TinyPreset:
    """Sizes of a tiny model. Names follow MllamaTextConfig / MllamaVisionConfig."""

    vocab_merges: int
    text_hidden: int
    text_layers: int
    cross_attention_layers: tuple[int, ...]
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_global_layers: int
    vision_heads: int
    vision_intermediate: int
    intermediate_layers_indices: tuple[int, ...]
    image_size: int
    patch_size: int
    max_image_tiles: int
    rope_theta: float = 500000.0  # Llama-3.2's; its llama3 scaling is kept either way
    position_scale: float = 1.0  # multiplies the vision tower's initial patch-position embedding
    text_init_std: float = 0.02  # std of the text decoder's initial weights (Llama's initializer_range)


PRESETS = {
    # Smallest that still has every part: self- and cross-attention layers,
    # gated global vision layers, intermediate-layer features, two tiles.
    "test": TinyPreset(
        vocab_merges=240, text_hidden=64, text_layers=4, cross_attention_layers=(1,),
        text_heads=4, text_kv_heads=2, text_intermediate=128,
        vision_hidden=32, vision_layers=2, vision_global_layers=1, vision_heads=2,
        vision_intermediate=64, intermediate_layers_indices=(0, 1),
        image_size=32, patch_size=16, max_image_tiles=2,
    ),
    # A few million parameters: big enough to learn the procedural scenes on
    # two CPU cores in minutes. One 48x48 tile of 16x16 patches: each patch is one cell of the
    # procedural scenes' 3x3 grid. The demo keeps the tower at its random weights, so three choices
    # decide what can be learnt in a few hundred steps:
    # - position_scale: at the default initial scale, where a patch sits explains under 1% of the
    #   variance of the tower's outputs (colour-or-empty explains ~80%), and cross-attention learns
    #   to address a cell too slowly to write captions. Scaled x25 it explains ~44%, colour still ~46%.
    # - rope_theta 1e4 and no key/value sharing: with 32-dim heads, Llama's 5e5 leaves only a few
    #   fast-rotating position pairs, and copying words from the question (summary, reasoning) comes late.
    # - text_init_std 0.06 (~0.8/sqrt(192)): Llama's 0.02 is its value for 4096-wide layers, and it leaves
    #   a 192-wide decoder's initial activations and attention logits small. In the 600-step demo
    #   recipe 0.06 took held-out eval loss from 0.069 to 0.044 (0.045: 0.046, 0.08: 0.047, 0.1: 0.051).
    "demo": TinyPreset(
        vocab_merges=1200, text_hidden=192, text_layers=6, cross_attention_layers=(1, 4),
        text_heads=6, text_kv_heads=6, text_intermediate=512,
        vision_hidden=96, vision_layers=4, vision_global_layers=1, vision_heads=4,
        vision_intermediate=256, intermediate_layers_indices=(1, 3),
        image_size=48, patch_size=16, max_image_tiles=1, rope_theta=1.0e4, position_scale=25.0,
        text_init_std=0.06,
    ),
}

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "gray", "cyan", "black", "white")
_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
_SIZES = ("small", "medium", "large", "big", "tiny")
_PLACES = ("left", "right", "top", "bottom", "above", "below", "center", "middle", "corner")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SENTENCES = (
    "I will look at the image and answer the question step by step.",
    "The image shows {n} {color} {shape}s on a plain background.",
    "There is a {size} {color} {shape} to the {place} of the {shape2}.",
    "How many {color} {shape}s are there in the image?",
    "What color is the {size} {shape}? Answer with a single word.",
    "Is the {color} {shape} {place} the {shape2}? Answer yes or no.",
    "Counting the {shape}s one by one gives {n}, so the answer is {n}.",
    "The bar for {color} reaches {n} on the chart, which is higher than {shape}.",
    "Options: A. {n} B. {color} C. {shape} D. {place}. The answer is B.",
    "First, find all the {color} objects. Then compare their sizes and positions.",
    "The question asks about the {shape}; the relevant details are its color and size.",
    "Therefore the final answer is {color}. Yes, no, true, false, correct.",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "system user assistant: you are a helpful assistant that reasons in stages.",
    "{a} + {b} = {c}; {c} - {a} = {b}; {a} x {b} = {d}. 1/2 = 0.5 and 3.14 > 3.",
)


def _corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """Deterministic training text: stage-tagged traces over scene vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        fill = {
            "n": rng.choice(_NUMBERS + tuple(str(i) for i in range(20))),
            "color": rng.choice(_COLORS), "shape": rng.choice(_SHAPES), "shape2": rng.choice(_SHAPES),
            "size": rng.choice(_SIZES), "place": rng.choice(_PLACES),
            "a": rng.randint(0, 99), "b": rng.randint(0, 99), "c": rng.randint(0, 199), "d": rng.randint(0, 999),
        }
        parts = [rng.choice(_SENTENCES).format(**fill) for _ in STAGES]
        lines.append("\n\n".join(f"{open_tag(s)} {p} {close_tag(s)}" for s, p in zip(STAGES, parts, strict=True)))
    return lines


def _build_tokenizer(preset: TinyPreset, seed: int, llama3_ids: bool = False):
    """Train the BPE tokenizer in code.

    With ``llama3_ids`` the vocabulary gets Llama-3's real size and ids: unused
    fillers pad the BPE vocabulary to 128000 entries (never produced by
    encoding), the named special tokens follow at 128000 (``<|begin_of_text|>``)
    to 128010, reserved special tokens fill up to 128255 and ``<|image|>`` is
    128256. That pairs the tokenizer with the real 11B architecture.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + preset.vocab_merges, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    specials = list(SPECIAL_TOKENS)
    if llama3_ids:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(len(vocab), LLAMA3_TEXT_VOCAB):
            vocab[f"<unused_{i}>"] = i
        tok = Tokenizer.from_str(json.dumps(spec))
        specials += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_SPECIALS - len(SPECIAL_TOKENS))]
    tok.add_special_tokens(specials + [IMAGE_TOKEN])
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(preset: TinyPreset, tokenizer):
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + (IMAGE_TOKEN,)}
    image_id = ids[IMAGE_TOKEN]
    if image_id != len(tokenizer) - 1:
        raise AssertionError(f"{IMAGE_TOKEN} must be the last token, got id {image_id} of {len(tokenizer)}")
    ratios = [[h, w] for h in range(1, preset.max_image_tiles + 1)
              for w in range(1, preset.max_image_tiles + 1) if h * w <= preset.max_image_tiles]
    # Same order as the image processor's get_all_supported_aspect_ratios (width-major).
    ratios = sorted(ratios, key=lambda hw: (hw[1], hw[0]))
    ratios = [[w, h] for h, w in ratios]
    vision = MllamaVisionConfig(
        hidden_size=preset.vision_hidden,
        num_hidden_layers=preset.vision_layers,
        num_global_layers=preset.vision_global_layers,
        attention_heads=preset.vision_heads,
        intermediate_size=preset.vision_intermediate,
        vision_output_dim=preset.vision_hidden * (len(preset.intermediate_layers_indices) + 1),
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        max_num_tiles=preset.max_image_tiles,
        intermediate_layers_indices=list(preset.intermediate_layers_indices),
        supported_aspect_ratios=ratios,
    )
    text = MllamaTextConfig(
        vocab_size=image_id,  # text vocab ends right before <|image|>, as in the real model
        hidden_size=preset.text_hidden,
        num_hidden_layers=preset.text_layers,
        cross_attention_layers=list(preset.cross_attention_layers),
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        intermediate_size=preset.text_intermediate,
        max_position_embeddings=131072,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
        initializer_range=preset.text_init_std,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": preset.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


def _build_processor(preset: TinyPreset, tokenizer):
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(
        size={"height": preset.image_size, "width": preset.image_size},
        max_image_tiles=preset.max_image_tiles,
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def open_gates(model) -> None:
    """Give a freshly initialised Mllama non-zero gates: with the zero defaults the text never sees the image."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
        vision = model.model.vision_model
        for emb in (vision.pre_tile_positional_embedding, vision.post_tile_positional_embedding,
                    vision.gated_positional_embedding):
            emb.gate.fill_(0.5)


def build_tiny_model(out_dir: str | Path | None = None, *, seed: int = 0, preset: str = "demo"):
    """Build a random tiny Mllama, its processor and tokenizer, offline and deterministically.

    Args:
        out_dir: where to save (``save_pretrained`` layout); ``None`` only builds.
        seed: seeds the tokenizer corpus and the weights; same seed, same files.
        preset: ``"test"`` (smallest with every code path) or ``"demo"`` (a few
            million parameters that can learn the procedural scenes on a CPU).

    Returns:
        ``(model, processor)``; the model is in eval mode on the CPU in float32.

    Raises:
        ValueError: unknown preset.

    Example:
        >>> model, processor = build_tiny_model("runs/tiny", preset="test")
        >>> AutoModelForImageTextToText.from_pretrained("runs/tiny")  # loads offline
    """
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    tokenizer = _build_tokenizer(sizes, seed)
    config = _build_config(sizes, tokenizer)
    processor = _build_processor(sizes, tokenizer)

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    open_gates(model)
    with torch.no_grad():
        model.model.vision_model.gated_positional_embedding.embedding.mul_(sizes.position_scale)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        meta = {"builder": "stagereason.tiny", "preset": preset, "seed": seed,
                "parameters": sum(p.numel() for p in model.parameters())}
        (out / "stagereason_tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
    return model, processor


@dataclasses.dataclass
class TinyModelConfig:
    """Options of ``stagereason tiny-model``."""

    out_dir: str = dataclasses.field(metadata={"help": "Directory to write the model, processor and tokenizer to."})
    preset: str = dataclasses.field(
        default="demo", metadata={"help": "test: smallest with every code path; demo: learns the procedural "
                                          "scenes on a CPU.", "choices": list(PRESETS)})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seeds the tokenizer corpus and the weights."})
    force: bool = dataclasses.field(default=False, metadata={"help": "Replace OUT_DIR if it is not empty."})
    json: bool = dataclasses.field(default=False, metadata={"help": "Print one JSON object instead of a table."})


def smoke_generate(path: str | Path, max_new_tokens: int = 8) -> dict:
    """Reload ``path`` with plain transformers and generate from an image and a question.

    Returns:
        ``{"generated_tokens": int, "image_changes_logits": bool}``.
    """
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from stagereason.modeling import load_processor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path, model.config.model_type)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    logits = []
    for color in ((255, 0, 0), (0, 0, 255)):
        inputs = processor(images=Image.new("RGB", (48, 40), color), text=prompt,
                           add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return {"generated_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
            "image_changes_logits": bool((logits[0] - logits[1]).abs().max() > 0)}


def run_tiny_model(cfg: TinyModelConfig) -> dict:
    """``stagereason tiny-model``: build, save atomically, reload with plain transformers, report."""
    from transformers.utils import logging as hf_logging

    from stagereason.console import report
    from stagereason.fsio import atomic_dir

    hf_logging.disable_progress_bar()
    with atomic_dir(cfg.out_dir, force=cfg.force) as tmp:
        model, processor = build_tiny_model(tmp, seed=cfg.seed, preset=cfg.preset)
        check = smoke_generate(tmp)
    size = sum(f.stat().st_size for f in Path(cfg.out_dir).iterdir())
    result = {
        "out_dir": str(cfg.out_dir), "preset": cfg.preset, "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "text_vocab_size": model.config.text_config.vocab_size,
        "image_token_id": model.config.image_token_index,
        "image_tile": f"{PRESETS[cfg.preset].image_size}px x {PRESETS[cfg.preset].max_image_tiles}",
        "size_mb": round(size / 2**20, 2),
        "reload_and_generate": f"ok, {check['generated_tokens']} tokens",
        "image_reaches_text": check["image_changes_logits"],
    }
    report(f"tiny model written to {cfg.out_dir}", result, cfg.json)
    return result
