"""A tiny Qwen2.5-VL or Qwen3-VL, built in code: a VLM whose processor turns each image into a run of
``<|image_pad|>`` tokens (one per 2 x 2 patches of 14 or 16 pixels, so their number depends on the image's size)
between vision start/end tokens, with 3-D (multimodal) rotary positions. As in the real models, a turn ends with
``<|im_end|>``. Qwen's processors need torchvision (their video processor), which the CPU test environment
lacks: the tests that use these models skip without it."""

from pathlib import Path

from .tiny_vlm_parts import tiny_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]


def build_tiny_qwen_vl(out: Path, version: str = "2.5") -> Path:
    """``version`` "2.5" (Qwen2.5-VL: 14-pixel patches, windowed vision attention) or "3" (Qwen3-VL: 16-pixel
    patches, vision features also fed to early decoder layers)."""
    import torch
    from transformers import AutoProcessor

    if version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Images
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as Videos
        patch, template = 14, "qwen2_5_vl"
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
    elif version == "3":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
        from transformers import Qwen3VLProcessor as Processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Images
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Videos
        patch, template = 16, "qwen3_vl"
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
    else:
        raise ValueError(f"unknown Qwen-VL version {version!r}")
    tokenizer = tiny_tokenizer(template, SPECIALS, words="system user assistant You are a helpful assistant.",
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    side = patch * 2  # one image token per merged 2 x 2 patches
    images = Images(patch_size=patch, merge_size=2, temporal_patch_size=2,
                    size={"shortest_edge": side * side * 4, "longest_edge": side * side * 16})
    processor = Processor(image_processor=images, video_processor=Videos(), tokenizer=tokenizer,
                          chat_template=tokenizer.chat_template)
    ids = tokenizer.convert_tokens_to_ids
    config = Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
        vision_config=vision, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    model = Model(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)  # loads back as it will be loaded
    return out
