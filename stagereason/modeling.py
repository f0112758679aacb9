"""Load a vision-language model and its processor: precision, quantization, attention, adapters."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import re
from pathlib import Path

import torch

__all__ = ["choose_attention", "load_model", "load_processor", "model_config", "non_quantized_modules", "resolve_dtype",
           "quantization_config", "special_token_in_messages", "structural_special_tokens", "written_special_token"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
# Names VLMs give their vision encoder, and the parts that stay in full precision under 4/8-bit loading.
_TOWER_NAMES = "vision_model|vision_tower|visual"
_VISION_TOWER = re.compile(rf"(^|\.)({_TOWER_NAMES})$")
_KEEP_FULL_PRECISION = re.compile(rf"(^|\.)({_TOWER_NAMES}|multi_modal_projector|mm_projector)$")


# Models whose processor loads with the PIL image backend: transformers' torchvision Mllama image processor (the
# default wherever torchvision is installed) mishandles a batch that mixes rows with and without an image (the
# first row sets the image shape; rows without one lose their aspect-ratio entries), which the PIL one handles.
_PIL_IMAGE_BACKEND = {"mllama"}


def structural_special_tokens(processor, template: str | dict | None = None):
    """A pattern of the special tokens that give a prompt its structure, None if there are none: those the chat
    template writes (turn headers and ends: ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``...; the
    processor's own template when ``template`` is None), the image and video tokens, and begin / end of text,
    padding and unknown. Other special tokens are data a text may hold on purpose (Qwen-VL's ``<|box_start|>``
    grounding, tool-call tags)."""
    tok = getattr(processor, "tokenizer", processor)
    if template is None:
        template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = "\n".join(v for v in template.values() if isinstance(v, str))
    template = template if isinstance(template, str) else ""
    specials = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    specials |= set(getattr(tok, "all_special_tokens", []))
    structural = {t for t in specials if t and t in template}
    structural |= {getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    structural |= {getattr(processor, name, None) for name in ("image_token", "video_token", "boi_token",
                                                                "eoi_token", "image_start_token", "image_end_token")}
    structural = {t for t in structural if isinstance(t, str) and t}
    return re.compile("|".join(map(re.escape, sorted(structural, key=len, reverse=True)))) if structural else None


def written_special_token(text: str | None, pattern) -> str | None:
    """What is wrong with ``text`` if it holds one of the special tokens of ``pattern``
    (:func:`structural_special_tokens`) written out, which the tokenizer would read as that token (an
    ``<|image|>`` without its image, an ``<|eot_id|>`` that ends the turn early); None if nothing."""
    found = pattern.search(text) if pattern is not None and text else None
    if found is None:
        return None
    return (f"holds {found.group()!r}, one of the model's special tokens, as text: the tokenizer would read it as "
            "that token; remove it")


def special_token_in_messages(messages: list[dict], pattern) -> str | None:
    """Where chat messages (contents as parts) write out a special token of ``pattern``: ``turn K (role) holds
    ...`` (:func:`written_special_token`), or None."""
    for k, msg in enumerate(messages):
        for part in msg["content"]:
            found = written_special_token(part.get("text") if isinstance(part, dict) else None, pattern)
            if found:
                return f"turn {k + 1} ({msg['role']}) {found}"
    return None


def load_processor(name_or_path: str | Path, model_type: str | None = None):
    """``AutoProcessor.from_pretrained``, with the PIL image backend for the models in ``_PIL_IMAGE_BACKEND``
    (``model_type`` read from the config when not given)."""
    from transformers import AutoConfig, AutoProcessor

    if model_type is None:
        try:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
        except (OSError, ValueError):
            model_type = None
    kwargs = {"backend": "pil"} if model_type in _PIL_IMAGE_BACKEND else {}
    return AutoProcessor.from_pretrained(name_or_path, **kwargs)


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    """``"auto"`` is bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU.

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}") from None


def _model_class(config):
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"model type {config.model_type!r} is not an image-text-to-text model "
            "(AutoModelForImageTextToText cannot load it)"
        )
    return AutoModelForImageTextToText._model_mapping[type(config)]


def choose_attention(config, requested: str = "auto") -> tuple[str, str]:
    """Pick the attention implementation for a model and say why.

    ``auto`` takes FlashAttention-2 where the model supports it and the
    ``flash-attn`` package and a CUDA GPU are present, else SDPA (PyTorch
    dispatches to its own flash kernels where it can), else eager.

    Args:
        config: the model's ``PretrainedConfig``.
        requested: ``auto``, ``flash_attention_2``, ``sdpa``, ``eager`` or any
            implementation name transformers knows.

    Returns:
        ``(implementation, reason)``.

    Raises:
        ValueError: ``flash_attention_2`` asked for a model or machine that cannot run it.
    """
    cls = _model_class(config)
    name = config.model_type
    supports_fa2 = bool(getattr(cls, "_supports_flash_attn", False))
    has_pkg = importlib.util.find_spec("flash_attn") is not None
    has_gpu = torch.cuda.is_available()
    if requested == "flash_attention_2":
        if not supports_fa2:
            raise ValueError(f"{name} does not support flash_attention_2 in transformers; use sdpa")
        if not (has_pkg and has_gpu):
            raise ValueError("flash_attention_2 needs the flash-attn package and a CUDA GPU "
                             "(pip install 'stagereason[flash]')")
        return requested, "requested"
    if requested != "auto":
        return requested, "requested"
    if supports_fa2 and has_pkg and has_gpu:
        return "flash_attention_2", f"{name} supports it and flash-attn and a GPU are present"
    sdpa = getattr(cls, "_supports_sdpa", False)
    if not supports_fa2:
        why = f"{name} does not support flash_attention_2"
        if name == "mllama":
            why += " (it builds 4-D cross-attention masks)"
    elif not has_pkg:
        why = "flash-attn is not installed"
    else:
        why = "no CUDA GPU"
    return ("sdpa", why) if sdpa else ("eager", why + "; no SDPA support either")


def non_quantized_modules(config) -> list[str]:
    """Full module paths to keep out of 4/8-bit quantization: vision tower, projector, ``lm_head``.

    Found by building the model on the meta device, so it works for any
    image-text-to-text architecture. transformers 5 needs full paths here:
    short names would quantize the vision tower and ``lm_head`` anyway.
    """
    cls = _model_class(config)
    try:  # under DeepSpeed ZeRO-3, _from_config would partition (and initialize) the meta model: it cannot
        from transformers.modeling_utils import set_zero3_state as outside_zero3
    except ImportError:  # an older transformers: no such context
        outside_zero3 = contextlib.nullcontext
    with torch.device("meta"), outside_zero3():
        model = cls._from_config(config)
    keep = []
    for name, _ in model.named_modules():
        if _KEEP_FULL_PRECISION.search(name) and not any(name.startswith(k + ".") for k in keep):
            keep.append(name)
    out_name = "lm_head"
    for name, module in model.named_modules():
        if module is model.get_output_embeddings():
            out_name = name
    return keep + [out_name]


def _named_vision_tower(model) -> tuple[str, torch.nn.Module] | tuple[None, None]:
    return next(((name, m) for name, m in model.named_modules() if _VISION_TOWER.search(name)), (None, None))


def vision_tower(model) -> torch.nn.Module | None:
    """The vision encoder of a loaded VLM (outermost module with a vision-tower name; not the projector)."""
    return _named_vision_tower(model)[1]


def vision_linear_names(model) -> list[str]:
    """The full module names of every linear layer of the vision encoder (:func:`vision_tower`), in model order."""
    prefix, tower = _named_vision_tower(model)
    if tower is None:
        return []
    return [f"{prefix}.{n}" for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear)]


def quantization_config(config, quantization: str | None, compute_dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for ``"4bit"`` (QLoRA: nf4, double quantization) or ``"8bit"``."""
    if quantization is None or quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = non_quantized_modules(config)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown quantization {quantization!r}; use 4bit, 8bit or none")


def _zero3() -> bool:
    """DeepSpeed ZeRO-3 is on: from accelerate's launch config, or a ``--deepspeed`` config given to the Trainer."""
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return True
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def _device_map(device_map, quantized: bool):
    if device_map != "auto":
        return device_map
    if _zero3() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # ZeRO-3 places (and partitions) the weights itself, quantized ones too; it refuses a map
    if not torch.cuda.is_available():  # CPU processes (one or several) keep the weights in host memory
        return {"": "cpu"} if quantized else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not quantized:
            return None  # FSDP places (and shards) the weights itself
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one full copy per process (DDP, QLoRA)
    return "auto"


def recorded_base(run: str | Path) -> str | None:
    """The base model a LoRA/QLoRA run dir records: ``run_info.json``'s, else ``adapter_config.json``'s."""
    for name, key in (("run_info.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            base = json.loads((Path(run) / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if base:
            return base
    return None


def _same_model(a: str | Path, b: str | Path) -> bool:
    """The same name, or the same local folder however it is spelt."""
    if str(a) == str(b):
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def _load_adapter(model, adapter: str | Path, name_or_path: str):
    from peft import PeftModel

    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"adapter {adapter} has no adapter_config.json (is it a LoRA/QLoRA run dir?)")
    trained_on = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if trained_on and not _same_model(trained_on, name_or_path):
        # a same-shaped model (another fine-tune, this adapter's own merged export) takes it without complaint
        logger.warning("adapter %s was trained on %s and is loaded on %s: a same-shaped base takes it, but the "
                       "result is not the trained model unless the two hold the same weights", adapter, trained_on,
                       name_or_path)
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"adapter {adapter} (trained on {trained_on!r}) does not fit base model {name_or_path!r}: {err}"
        ) from err


def model_config(name_or_path: str | Path, flag: str = "model"):
    """The model's config, or an error that says what ``name_or_path`` is instead.

    Raises:
        FileNotFoundError: a local folder without ``config.json`` (an adapter run dir is named as one), or a name
            that is neither a local folder nor a hub model that can be reached.
    """
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        what = (" (it is a LoRA/QLoRA run dir: give it as the adapter, or alone as the model)"
                if (path / "adapter_config.json").is_file() else "")
        raise FileNotFoundError(f"{flag} {name_or_path} is a folder without config.json, not a model{what}")
    try:
        return AutoConfig.from_pretrained(str(name_or_path))
    except OSError as err:
        raise FileNotFoundError(f"{flag} {name_or_path} is neither a local model directory nor a hub model that "
                                f"can be reached ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                ) from err


def load_model(
    name_or_path: str | Path,
    *,
    quantization: str | None = None,
    attn_implementation: str = "auto",
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = "auto",
    check_processor=None,
    processor=None,
    config=None,
):
    """Load an image-text-to-text model and its processor.

    Args:
        name_or_path: a local directory or hub name (Mllama, Qwen2.5-VL, any
            ``AutoModelForImageTextToText`` model).
        quantization: ``None``, ``"4bit"`` (nf4 + double quantization, compute
            in ``dtype``) or ``"8bit"``. The vision tower, the projector and
            ``lm_head`` always stay in full precision.
        attn_implementation: ``"auto"`` (see :func:`choose_attention`) or a
            transformers implementation name.
        adapter: a PEFT adapter directory (a train run dir) to load on top.
            When it holds a processor, that processor is used.
        dtype: ``"auto"`` (bf16 on GPU, fp32 on CPU), ``"bf16"``, ``"fp16"``, ``"fp32"``.
        device_map: ``"auto"`` spreads over GPUs (one device per process under
            accelerate), keeps the CPU otherwise; anything else goes to transformers.
        check_processor: called with the processor before any weight is loaded
            (so a model its caller cannot use fails in seconds, not minutes).
        processor: the processor, when the caller has loaded it already.
        config: the model's config, when the caller has read it already (:func:`model_config`).

    Returns:
        ``(model, processor)``.

    Raises:
        ValueError: not an image-text-to-text model, bad dtype or quantization,
            an attention implementation the model or machine cannot run, or an
            adapter trained for another base.
        FileNotFoundError: an adapter directory without ``adapter_config.json``, or a
            model that is neither a local directory nor reachable on the hub.
    """
    name_or_path = str(name_or_path)
    config = config if config is not None else model_config(name_or_path)
    if processor is None:
        processor_src = name_or_path
        if adapter is not None and ((Path(adapter) / "processor_config.json").is_file()
                                    or (Path(adapter) / "tokenizer_config.json").is_file()):
            processor_src = str(adapter)
        processor = load_processor(processor_src, config.model_type)
    if check_processor is not None:
        check_processor(processor)
    cls = _model_class(config)
    torch_dtype = resolve_dtype(dtype)
    attn, why = choose_attention(config, attn_implementation)
    quant = quantization_config(config, quantization, torch_dtype)
    logger.info("loading %s as %s: dtype %s, quantization %s, attention %s (%s)",
                name_or_path, cls.__name__, str(torch_dtype).removeprefix("torch."),
                quantization or "none", attn, why)
    try:
        model = cls.from_pretrained(
            name_or_path, dtype=torch_dtype, attn_implementation=attn,
            quantization_config=quant, device_map=_device_map(device_map, quant is not None),
        )
    except OSError as err:  # no weights there (a config and processor alone), or none that can be fetched
        raise FileNotFoundError(f"model {name_or_path}: its weights cannot be loaded ({str(err).splitlines()[0]})"
                                ) from err
    if config.model_type == "mllama":
        skip_cross_attention_without_image(model)
    if adapter is not None:
        model = _load_adapter(model, adapter, name_or_path)
    return model, processor


def skip_cross_attention_without_image(model) -> int:
    """Make Mllama's cross-attention layers leave a row without an image as they leave a text-only prompt.

    A text-only prompt skips those layers. In a batch that also holds an image,
    a row without one goes through them: its cross-attention mask is all
    masked, which Mllama turns into attending evenly to the padded image's
    states, and only the feed-forward half is masked out, so the gated
    attention half changes that row (logits off by 2.8 in a tiny model with
    the gates at 0.7). Here the attention half is zeroed for such rows, so the
    layer returns the row unchanged, exactly as skipping it; rows with an image
    are untouched. Returns the number of layers hooked.
    """
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    name = "full_text_row_masked_out_mask"  # [B, 1, T, 1]: 1 where a token sees an image
    params = [p for p in inspect.signature(MllamaCrossAttentionDecoderLayer.forward).parameters if p != "self"]
    if name not in params:
        logger.warning("this transformers' Mllama cross-attention layer takes no %s: rows without an image beside "
                       "rows with one are not made to skip the cross-attention layers", name)
        return 0
    position = params.index(name)

    def remember(layer, args, kwargs):
        mask = kwargs[name] if name in kwargs else args[position] if len(args) > position else None
        layer.cross_attn._rows_with_image = None if mask is None else \
            mask.flatten(1).amax(1).view(-1, 1, 1)

    def zero_rows(attn, args, output):
        rows = getattr(attn, "_rows_with_image", None)
        if rows is None:
            return output
        return (output[0] * rows.to(output[0].dtype), *output[1:])

    hooked = 0
    for layer in model.modules():
        if isinstance(layer, MllamaCrossAttentionDecoderLayer) and not getattr(layer, "_skips_imageless", False):
            layer.register_forward_pre_hook(remember, with_kwargs=True)
            layer.cross_attn.register_forward_hook(zero_rows)
            layer._skips_imageless = True
            hooked += 1
    return hooked
