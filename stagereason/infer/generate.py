"""Generation primitives shared by training-time evaluation and inference."""

from __future__ import annotations

import torch

__all__ = ["float_dtype", "generate_greedy", "user_message"]


def user_message(question: str, n_images: int = 1) -> list[dict]:
    """One user turn: the images first, then the question (the layout the training rows use)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def float_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (the compute dtype under 4-bit)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def generate_greedy(model, processor, items: list[tuple[list, str]], *, max_new_tokens: int = 512,
                    batch_size: int = 8) -> list[str]:
    """Greedy answers for ``(images, question)`` items, batched with left padding.

    Args:
        items: each a list of opened images (possibly empty) and a question.

    Returns:
        The decoded continuations, special tokens removed.
    """
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    outs: list[str] = []
    dtype = float_dtype(model)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            texts = [processor.apply_chat_template(user_message(q, len(imgs)), add_generation_prompt=True)
                     for imgs, q in chunk]
            images = [imgs for imgs, _ in chunk]
            inputs = processor(images=images if any(images) else None, text=texts, padding=True,
                               padding_side="left", add_special_tokens=False, return_tensors="pt")
            inputs = inputs.to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id)
            outs += tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outs
