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


class Prefix:
    """A prompt encoded once: token ids, the KV cache of all but the last token, and the image states.

    For Mllama the cache also holds the image keys/values of the cross-attention
    layers, so continuing from it never re-encodes the image or the prefix.
    ``extend`` appends tokens (a chosen candidate, a forced tag) by running only
    those tokens through the model. ``xstates`` (the projected image features)
    let judge prompts reuse the image without the vision tower.
    """

    def __init__(self, model, processor, images: list, question: str):
        self.model, self.processor = model, processor
        self.tok = processor.tokenizer
        self.images = images
        text = processor.apply_chat_template(user_message(question, len(images)), add_generation_prompt=True)
        inputs = processor(images=[images] if images else None, text=[text], add_special_tokens=False,
                           return_tensors="pt").to(model.device)
        self.dtype = float_dtype(model)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.ids = inputs["input_ids"]
        self.xmask = inputs.get("cross_attention_mask")
        self.xstates = None
        with torch.no_grad():
            if "pixel_values" in inputs:
                self.xstates = _image_states(model, inputs)
            out = model(input_ids=self.ids[:, :-1], attention_mask=inputs["attention_mask"][:, :-1],
                        cross_attention_mask=None if self.xmask is None else self.xmask[:, :-1],
                        cross_attention_states=self.xstates, use_cache=True)
        self.cache = out.past_key_values
        self.prompt_len = self.ids.shape[1]

    @property
    def text(self) -> str:
        """What has been generated or forced after the prompt."""
        return self.tok.decode(self.ids[0, self.prompt_len:], skip_special_tokens=False)

    def _mask_for(self, length: int, batch: int = 1):
        if self.xmask is None:
            return None
        extra = length - self.xmask.shape[1]
        mask = self.xmask if extra <= 0 else torch.cat([self.xmask, self.xmask[:, -1:].expand(-1, extra, -1, -1)], 1)
        return mask[:, :length].expand(batch, -1, -1, -1)

    @torch.no_grad()
    def extend(self, new_ids: list[int]) -> None:
        """Append tokens; the cache grows by the old last token and all but the last new one."""
        if not new_ids:
            return
        new = torch.tensor([new_ids], device=self.ids.device, dtype=self.ids.dtype)
        ids = torch.cat([self.ids, new], dim=1)
        feed = ids[:, self.ids.shape[1] - 1: -1]
        self.model(input_ids=feed, attention_mask=torch.ones_like(ids[:, :-1]), past_key_values=self.cache,
                   cross_attention_mask=self._mask_for(ids.shape[1] - 1), use_cache=True)
        self.ids = ids

    @torch.no_grad()
    def continuations(self, n: int, stop: str | list[str] | None, max_new_tokens: int, *, do_sample: bool,
                      temperature: float = 0.7, top_p: float = 0.95, scores: bool = False):
        """``n`` continuations of the prefix in one batched ``generate``, each stopping at ``stop`` (or any of them).

        The stop check is token-level (``stop_strings``), per row: finished rows
        are padded while the others go on. Returns ``(token_lists, logprob_means)``
        (``logprob_means`` is None unless ``scores``).
        """
        import copy

        cache = copy.deepcopy(self.cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        length = self.ids.shape[1]
        kwargs = {"do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=[stop] if isinstance(stop, str) else list(stop), tokenizer=self.tok)
        out = self.model.generate(
            input_ids=self.ids.expand(n, -1), attention_mask=torch.ones(n, length, dtype=torch.long,
                                                                         device=self.ids.device),
            cross_attention_mask=self._mask_for(length, n), past_key_values=cache, max_new_tokens=max_new_tokens,
            pad_token_id=self.tok.pad_token_id, return_dict_in_generate=True, output_logits=scores, **kwargs)
        new = out.sequences[:, length:]
        eos = set(_eos_ids(self.model))
        rows = []
        for r in range(n):
            toks = new[r].tolist()
            end = len(toks)
            for i, t in enumerate(toks):
                if t == self.tok.pad_token_id or t in eos:
                    end = i
                    break
            rows.append(toks[:end])
        means = None
        if scores:
            logp = torch.stack(out.logits, 1).float().log_softmax(-1)  # raw logits: the model's own probabilities
            picked = logp.gather(-1, new[:, : logp.shape[1]].unsqueeze(-1)).squeeze(-1)
            means = [picked[r, : max(len(rows[r]), 1)].mean().item() for r in range(n)]
        return rows, means


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def _image_states(model, inputs) -> torch.Tensor | None:
    """Mllama's projected image features (what its cross-attention layers attend to), computed once."""
    inner = getattr(model, "model", None)
    base = getattr(model, "base_model", None)
    for m in (inner, getattr(getattr(base, "model", None), "model", None)):
        if m is not None and hasattr(m, "vision_model") and hasattr(m, "multi_modal_projector"):
            vision = m.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                    aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
            hidden = m.multi_modal_projector(vision)
            return hidden.reshape(-1, hidden.shape[-2], hidden.shape[-1])
    raise ValueError(f"{type(model).__name__} is not an Mllama model: stage search reuses Mllama's image states")
