"""A tiny LLaVA-NeXT (CLIP tower + Llama decoder), built in code: a VLM whose processor expands each image
placeholder into many tokens (from the image's size), unlike Mllama's one token per image."""

from pathlib import Path

from .tiny_vlm_parts import tiny_tokenizer

PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build_tiny_llava_next(out: Path) -> Path:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer("llava_next", ["<s>", "</s>", "<pad>", "<image>"], words="[INST]", bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>")
    template = tokenizer.chat_template
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                        image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", chat_template=template,
                                   image_token="<image>", num_additional_image_tokens=1)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=14,
                                       projection_dim=32).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
