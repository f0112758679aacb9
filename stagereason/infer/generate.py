"""Generation primitives shared by training-time evaluation and inference."""

from __future__ import annotations

import torch

from stagereason.infer.decode import cache_kwarg, output_cache

__all__ = ["Prefix", "encode_prompt", "filler_row", "fit_system_turns", "float_dtype", "generate_greedy",
           "generate_greedy_shared", "earlier_turns", "images_first", "last_question", "prompt_messages", "prompt_text",
           "system_as_string", "user_message"]


def user_message(question: str, n_images: int = 1) -> list[dict]:
    """One user turn: the images first, then the question (the layout the training rows use)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def prompt_messages(question: str | list[dict], n_images: int = 1) -> list[dict]:
    """The chat messages of a prompt: a conversation as given, or one user turn of a question."""
    return question if isinstance(question, list) else user_message(question, n_images)


_SYSTEM_PROBE = "stagereason system probe"
_SYSTEM_AS_STRING: dict[str, bool] = {}  # chat template -> whether it reads a system turn's content as a string


def system_as_string(processor) -> bool:
    """Whether the model's own chat template reads a system turn's content only as a string.

    Llama-3.2-Vision's template writes it through ``| trim``: content given as parts (``[{"type": "text", ...}]``,
    as training rows and checked conversations hold it) comes out as a printed Python list. LLaVA-NeXT's reads
    ``content[0]["text"]`` and needs parts; Qwen-VL's and Gemma 3's take either. Found once per template by
    rendering a system turn both ways.
    """
    template = getattr(processor, "chat_template", None)
    if not isinstance(template, str):
        return False
    if template not in _SYSTEM_AS_STRING:
        def render(content) -> str:
            try:
                return processor.apply_chat_template([{"role": "system", "content": content},
                                                      {"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                                     tokenize=False)
            except Exception:  # noqa: BLE001 - a template that refuses this form: the other one, if it reads it
                return ""
        parts = render([{"type": "text", "text": _SYSTEM_PROBE}])
        read_as_parts = _SYSTEM_PROBE in parts and "{'type'" not in parts
        _SYSTEM_AS_STRING[template] = not read_as_parts and _SYSTEM_PROBE in render(_SYSTEM_PROBE)
    return _SYSTEM_AS_STRING[template]


def fit_system_turns(messages: list[dict], processor) -> list[dict]:
    """``messages`` with each system turn's content in the form the model's chat template reads (see
    :func:`system_as_string`): its text parts joined into a string where the template takes only a string."""
    if not any(m["role"] == "system" and not isinstance(m["content"], str) for m in messages):
        return messages
    if not system_as_string(processor):
        return messages
    return [{**m, "content": _text_of(m["content"])} if m["role"] == "system" else m for m in messages]


def prompt_text(processor, question: str | list[dict], n_images: int = 1) -> str:
    """A question's (or conversation's) prompt as the model's own chat template writes it, ready for its answer."""
    messages = fit_system_turns(prompt_messages(question, n_images), processor)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _text_of(content, image: str | None = None) -> str:
    """A message's text: its text parts joined, each image part written ``image`` (left out if None)."""
    if isinstance(content, str):
        return content
    kinds = ("text", "image") if image is not None else ("text",)
    return "\n".join(image if p["type"] == "image" else p.get("text", "") for p in content
                     if isinstance(p, dict) and p.get("type") in kinds)


def last_question(question: str | list[dict]) -> str:
    """The question itself: a conversation's last user turn, its text parts joined."""
    return _text_of(question[-1]["content"]) if isinstance(question, list) else question


def earlier_turns(question: str | list[dict]) -> str:
    """The turns of a conversation before its last question, one ``Role: text`` paragraph each (an image's
    place written ``[image]``); empty for a plain question or a conversation of one turn."""
    if not isinstance(question, list):
        return ""
    return "\n\n".join(f"{m['role'].capitalize()}: {_text_of(m['content'], '[image]').strip()}"
                       for m in question[:-1])


def filler_row() -> dict:
    """A row with one small blank image and no answer, added to a batch that has no image in a run of several
    processes.

    Under FSDP and ZeRO-3 every process must run the same modules in the same order (each forward gathers the
    weights from all of them), and DDP without ``find_unused_parameters`` waits for every weight's gradient: a
    process whose batch had no image skipped the vision tower (and Mllama's cross-attention layers) while the
    others ran them, and the run crashed or hung. In training its labels are all -100, so the loss is unchanged
    (Mllama's rows without an image ignore the image of another row: ``modeling.skip_cross_attention_without_image``);
    in generation its answer is dropped.
    """
    from PIL import Image

    return {"messages": user_message(".", 1), "images": [Image.new("RGB", (32, 32), "white")]}


def images_first(items: list, images_of) -> list:
    """``items`` with the ones that have images (``images_of(item)`` not empty) first, otherwise in their order.

    A batch for the processor should start with a row that has an image: transformers' Mllama image processor
    (the torchvision one, loaded wherever torchvision is installed) takes the image shape from the first row and
    fails (IndexError) when that row has none.
    """
    return sorted(items, key=lambda item: not images_of(item))


def float_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (the compute dtype under 4-bit)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def generate_greedy(model, processor, items: list[tuple[list, str]], *, max_new_tokens: int = 512,
                    batch_size: int = 8, synced_gpus: bool = False) -> list[str]:
    """Greedy answers for ``(images, question)`` items, batched with left padding.

    Args:
        items: each a list of opened images (possibly empty) and a question, or the chat messages to answer (a
            conversation so far, ending with a user turn whose image placeholders match the images).
        synced_gpus: keep stepping until every process of the run is done (sharded weights: see
            :func:`generate_greedy_shared`); a batch without images then gets a filler item with one (every
            process must run the vision tower alike), whose answer is dropped.

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
            keep = len(chunk)
            if synced_gpus and not any(imgs for imgs, _ in chunk):
                chunk = [*chunk, (filler_row()["images"], ".")]
            order = [k for k, _ in images_first(list(enumerate(chunk)), lambda kc: kc[1][0])]  # answers: in order
            chunk = [chunk[k] for k in order]
            texts = [prompt_text(processor, q, len(imgs)) for imgs, q in chunk]
            images = [imgs for imgs, _ in chunk]
            inputs = processor(images=images if any(images) else None, text=texts, padding=True,
                               padding_side="left", add_special_tokens=False, return_tensors="pt")
            inputs = inputs.to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, synced_gpus=synced_gpus)
            answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            back = dict(zip(order, answers, strict=True))
            outs += [back[k] for k in range(keep)]
    finally:
        model.train(was_training)
    return outs


def generate_greedy_shared(model, processor, n: int, item, *, sharded: bool, max_new_tokens: int = 512,
                           batch_size: int = 8) -> list[str]:
    """:func:`generate_greedy` on ``item(0) .. item(n - 1)``, the work split over the processes of a distributed run.

    Every process gets all ``n`` answers, in order. Each opens only its own
    share of the items. With ``sharded`` weights (FSDP, ZeRO-3) each forward
    gathers them from all processes, so every process must run the same
    forwards: the shares are made equal (the short ones padded with copies of
    an item, whose answers are dropped) and generation keeps every process
    stepping until the slowest is done. One process alone is plain
    :func:`generate_greedy`.

    Args:
        item: ``i -> (images, question)``.
        sharded: the weights are sharded over the processes.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return generate_greedy(model, processor, [item(i) for i in range(n)], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    if n == 0:
        return []
    per = -(-n // world)
    mine = range(dist.get_rank() * per, min((dist.get_rank() + 1) * per, n))
    work = [item(i) for i in mine]
    work += [work[0] if work else item(0)] * (per - len(work))
    texts = generate_greedy(model, processor, work, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            synced_gpus=sharded)[: len(mine)]
    shares: list = [None] * world
    dist.all_gather_object(shares, texts)
    return [t for share in shares for t in share]


def encode_prompt(model, processor, images: list, question: str | list[dict]):
    """One question's prompt (chat template, generation prompt) and images as model inputs on its device; a
    conversation (chat messages ending with the user turn to answer) is the prompt as given."""
    text = prompt_text(processor, question, len(images))
    inputs = processor(images=[images] if images else None, text=[text], add_special_tokens=False,
                       return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(float_dtype(model))
    return inputs


class Prefix:
    """A prompt encoded once: token ids, the KV cache of all but the last token, and the image states.

    For Mllama the cache also holds the image keys/values of the cross-attention
    layers, so continuing from it never re-encodes the image or the prefix.
    ``extend`` appends tokens (a forced tag); they are run through the model,
    all appended tokens in one forward, when the cache is next needed. ``take``
    appends a candidate of the last ``continuations`` together with the cache
    its row already built, so a chosen candidate is never run again.
    ``xstates`` (the projected image features) let judge prompts reuse the image
    without the vision tower.
    """

    def __init__(self, model, processor, images: list, question: str):
        self.model, self.processor = model, processor
        self.tok = processor.tokenizer
        self.images = images
        inputs = encode_prompt(model, processor, images, question)
        self.ids = inputs["input_ids"]
        self.xmask = inputs.get("cross_attention_mask")
        self.xstates = None
        with torch.no_grad():
            if "pixel_values" in inputs:
                self.xstates = _image_states(model, inputs)
            out = model(input_ids=self.ids[:, :-1], attention_mask=inputs["attention_mask"][:, :-1],
                        cross_attention_mask=None if self.xmask is None else self.xmask[:, :-1],
                        cross_attention_states=self.xstates, use_cache=True)
        self.cache = output_cache(out)
        self.cached = self.ids.shape[1] - 1  # positions the cache holds: all but the last token, once synced
        self.prompt_len = self.ids.shape[1]
        self._candidates: tuple[list[list[int]], list] | None = None

    @property
    def text(self) -> str:
        """What has been generated or forced after the prompt."""
        return self.tok.decode(self.ids[0, self.prompt_len:], skip_special_tokens=False)

    def _mask_for(self, length: int):
        if self.xmask is None:
            return None
        extra = length - self.xmask.shape[1]
        mask = self.xmask if extra <= 0 else torch.cat([self.xmask, self.xmask[:, -1:].expand(-1, extra, -1, -1)], 1)
        return mask[:, :length]

    def extend(self, new_ids: list[int]) -> None:
        """Append tokens; they are run through the model when the cache is next needed."""
        if new_ids:
            new = torch.tensor([new_ids], device=self.ids.device, dtype=self.ids.dtype)
            self.ids = torch.cat([self.ids, new], dim=1)
            self._candidates = None

    def take(self, index: int) -> None:
        """Append candidate ``index`` of the last ``continuations`` with the cache its row built."""
        from stagereason.infer.decode import crop_cache, cross_layers

        if self._candidates is None:
            raise RuntimeError("take() picks from the last continuations(); none since the prefix last changed")
        rows, caches = self._candidates
        self._candidates = None
        self.extend(rows[index])
        if caches[index] is not None:  # None: the call generated nothing (no step ran)
            self.cache = crop_cache(caches[index], self.ids.shape[1] - 1, cross_layers(self.model))
            self.cached = self.ids.shape[1] - 1

    @torch.no_grad()
    def _sync(self) -> None:
        """Run the appended tokens (all but the last) through the model, in one forward."""
        length = self.ids.shape[1] - 1
        if self.cached < length:
            self.model(input_ids=self.ids[:, self.cached:length], attention_mask=torch.ones_like(self.ids[:, :length]),
                       cross_attention_mask=self._mask_for(length), use_cache=True, logits_to_keep=1,
                       **{cache_kwarg(self.model): self.cache})
            self.cached = length

    def continuations(self, n: int, stop: str | list[str] | None, max_new_tokens: int, *, do_sample: bool,
                      temperature: float = 0.7, top_p: float = 0.95, scores: bool = False):
        """``n`` continuations of the prefix decoded together, each stopping at ``stop`` (or any of them).

        The stop check is per row and looks only at its last few tokens; a
        finished row leaves the batch while the others go on. Returns
        ``(token_lists, logprob_means)`` (``logprob_means`` is None unless ``scores``).
        """
        from stagereason.infer.decode import decode

        self._sync()
        stops = [] if not stop else [stop] if isinstance(stop, str) else list(stop)
        step_xmask = None if self.xmask is None else self.xmask[:, -1:]
        rows, means, caches = decode(
            self.model, self.tok, self.cache, int(self.ids[0, -1]), self.ids.shape[1] - 1, n, max_new_tokens,
            step_xmask=step_xmask, stops=stops, eos=set(_eos_ids(self.model)), do_sample=do_sample,
            temperature=temperature, top_p=top_p, scores=scores)
        self._candidates = (rows, caches)
        return rows, means


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def _image_states(model, inputs) -> torch.Tensor | None:
    """Mllama's projected image features (what its cross-attention layers attend to), computed once."""
    from stagereason.infer.decode import mllama_parts

    m, _ = mllama_parts(model)
    if m is None:
        raise ValueError(f"{type(model).__name__} is not an Mllama model: stage search reuses Mllama's image states")
    vision = m.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                            aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
    hidden = m.multi_modal_projector(vision)
    return hidden.reshape(-1, hidden.shape[-2], hidden.shape[-1])
