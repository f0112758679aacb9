"""A tiny Gemma 3 (SigLIP tower + Gemma 3 decoder), built in code: a VLM whose images expand to a fixed run of
tokens between begin/end-of-image tokens, whose template folds a system turn into the first user turn, and
which needs ``token_type_ids`` in training (images attend both ways). As in the real model, a turn ends with
``<end_of_turn>``, which is not the tokenizer's eos but one of the generation config's."""

from pathlib import Path

from .tiny_vlm_parts import tiny_tokenizer


def build_tiny_gemma3(out: Path, image_tokens: int = 4) -> Path:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = tiny_tokenizer(
        "gemma3", ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"], words="model user",
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    template = tokenizer.chat_template
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                                image_seq_length=image_tokens)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         sliding_window=64, bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"),
                         pad_token_id=ids("<pad>")),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=7),
        mm_tokens_per_image=image_tokens, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    # as Gemma 3 ships: a turn ends with <end_of_turn>, which is not the tokenizer's eos
    model.generation_config.eos_token_id = [ids("<eos>"), ids("<end_of_turn>")]
    model.generation_config.pad_token_id = ids("<pad>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
